"""Models from config: shapes, pretrained weights from local files only, frozen stages."""

import logging
import pickle

import pytest
import timm
import torch
from safetensors.torch import save_file

from attrdist.core.config import ModelConfig
from attrdist.errors import AttrdistError
from attrdist.models import build_model, count_parameters

SMALL = dict(backbone="resnet18", feature_level=3, dim=64, heads=8, contrastive_dim=32)


def test_cross_modal_shapes_and_no_label_input():
    m = build_model(ModelConfig(pretrained="", **SMALL), 7)
    out = m(torch.randn(2, 3, 64, 64))  # the only input is the image
    assert out["logits"].shape == (2, 7) and out["img_emb"].shape == (2, 32) and out["attr_emb"].shape == (7, 32)


def test_pretrained_from_local_safetensors(tmp_path):
    ref = timm.create_model("resnet18", pretrained=False, features_only=True, out_indices=(3,))
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(tmp_path / "w.safetensors"))
    m = build_model(ModelConfig(pretrained=str(tmp_path / "w.safetensors"), **SMALL), 5)
    assert torch.equal(m.backbone.state_dict()["layer1.0.conv1.weight"], ref.state_dict()["layer1.0.conv1.weight"])
    assert "w.safetensors" in m.weights_source


@pytest.fixture
def empty_caches(tmp_path, monkeypatch):
    """Every cache the weight lookups read points into tmp_path (empty): nothing depends on this machine's."""
    import huggingface_hub.constants as c

    for var, sub in (("HF_HOME", "hf-home"), ("HF_HUB_CACHE", "hf"), ("TORCH_HOME", "torch"), ("XDG_CACHE_HOME", "xdg")):
        monkeypatch.setenv(var, str(tmp_path / sub))
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "torch" / "hub"))
    return tmp_path / "hf"


def test_auto_without_cached_weights_stops_in_one_line(empty_caches):
    with pytest.raises(AttrdistError) as e:
        build_model(ModelConfig(pretrained="auto", **SMALL), 5)
    msg = str(e.value)
    assert "\n" not in msg and "model.pretrained=auto: no pretrained weights for resnet18" in msg
    assert "model.pretrained=none to train from scratch" in msg and "nothing is downloaded" in msg


@pytest.mark.parametrize("value", ["none", ""])
def test_none_trains_from_scratch_and_says_so(value, empty_caches, caplog):
    with caplog.at_level(logging.INFO, logger="attrdist"):
        m = build_model(ModelConfig(pretrained=value, **SMALL), 5)
    assert m.weights_source == "random init (model.pretrained=none)" and "trains from scratch" in caplog.text


def test_text_tower_auto_finds_only_weights_of_its_activation_else_stops(empty_caches):
    from attrdist.models.text import cached_open_clip_file, encode_names

    assert cached_open_clip_file("RN50-quickgelu") is None
    with pytest.raises(AttrdistError, match=r"model.text_pretrained=auto: no open_clip RN50 checkpoint .*"
                                            r"model.text_pretrained=none for a random text tower"):
        encode_names(["red"], "RN50", "auto")
    # OpenAI's RN50 weights as the HF cache holds them (timm/resnet50_clip.openai): found for RN50-quickgelu,
    # whose QuickGELU they were trained with, never for RN50 (GELU)
    repo = empty_caches / "models--timm--resnet50_clip.openai"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    (repo / "snapshots" / "abc123").mkdir(parents=True)
    (repo / "snapshots" / "abc123" / "open_clip_model.safetensors").write_bytes(b"")
    assert cached_open_clip_file("RN50-quickgelu").endswith("open_clip_model.safetensors")
    assert cached_open_clip_file("RN50") is None
    emb, source = encode_names(["red", "striped"], "RN50", "none")
    assert emb.shape[0] == 2 and "random weights (model.text_pretrained=none)" in source


def test_detector_clip_auto_without_cached_weights_stops(empty_caches):
    from attrdist.models.detector import build_clip

    with pytest.raises(AttrdistError, match="model.pretrained=auto: no open_clip tiny checkpoint.*model.pretrained=none"):
        build_clip("tiny", "auto")
    clip, report = build_clip("tiny", "none")
    assert report is None


def test_pickle_checkpoint_is_never_executed(tmp_path):
    class Evil:
        def __reduce__(self):
            return (exec, ("open(%r, 'w').write('pwned')" % str(tmp_path / "pwned"),))

    with open(tmp_path / "evil.pth", "wb") as f:
        pickle.dump({"state_dict": Evil()}, f)
    with pytest.raises(AttrdistError, match="weights-only"):
        build_model(ModelConfig(pretrained=str(tmp_path / "evil.pth"), **SMALL), 5)
    assert not (tmp_path / "pwned").exists()


def test_frozen_stages_and_classifier():
    m = build_model(ModelConfig(pretrained="", frozen_stages=2, **{**SMALL, "feature_level": 4}), 5)
    frozen = {n for n, p in m.backbone.named_parameters() if not p.requires_grad}
    assert any(n.startswith("layer2.") for n in frozen) and not any(n.startswith("layer3.") for n in frozen)
    m.train()
    assert not m.backbone.bn1.training  # frozen BN keeps its statistics
    c = build_model(ModelConfig(name="classifier", backbone="efficientnet_b0", pretrained="", dropout=0.2), 26)
    assert c(torch.randn(1, 3, 64, 64))["logits"].shape == (1, 26)
    assert c.net.get_classifier().in_features == 1280 and c.net.drop_rate == 0.2
    total, trainable = count_parameters(c)
    assert total == trainable > 4_000_000
