"""Preprocessing from the model (attrdist/models/preprocess.py): which values a run resolves, what it keeps,
what it refuses; the config keys' parsing and checks. The end-to-end checks through `attrdist predict`
(a converted EfficientNet-Lite0 against the package's own model) are in tests/test_pretrained_real.py."""

from dataclasses import replace

import pytest
import timm

from attrdist.core.config import Config, DataConfig, ModelConfig, apply_overrides, from_dict, to_dict
from attrdist.core.transforms import IMAGENET_MEAN, IMAGENET_STD, Preprocess
from attrdist.errors import AttrdistError
from attrdist.models.preprocess import CLIP_MEAN, CLIP_STD, resolve


def cfg_for(backbone: str, name: str = "classifier", **data) -> Config:
    return Config(data=DataConfig(**data), model=ModelConfig(name=name, backbone=backbone))


@pytest.mark.parametrize("arch", ["tf_efficientnet_lite0", "resnet18", "vit_base_patch16_clip_224.openai",
                                  "resnet10t"])
def test_open_keys_take_timm_pretrained_cfg(arch):
    pc = timm.models.get_pretrained_cfg(arch)  # offline: timm's own table
    cfg, notes = resolve(cfg_for(arch))
    d = cfg.data
    assert (d.mean, d.std, d.interpolation) == (tuple(pc.mean), tuple(pc.std), pc.interpolation)
    assert d.image_size == pc.input_size[-1] and d.eval_resize == pytest.approx(1 / pc.crop_pct)
    assert len(notes) == 5 and all(f"(timm's pretrained cfg of {arch})" in n for n in notes)
    assert resolve(cfg)[0] == cfg  # resolving twice changes nothing (a resumed run records the same)


def test_values_the_recipe_sets_are_kept_and_said():
    cfg, notes = resolve(cfg_for("tf_efficientnet_lite0", image_size=64, eval_resize=1.0, interpolation="bilinear",
                                 mean=IMAGENET_MEAN, std=IMAGENET_STD))
    d = cfg.data
    assert (d.image_size, d.eval_resize, d.interpolation, d.mean, d.std) == (64, 1.0, "bilinear", IMAGENET_MEAN,
                                                                             IMAGENET_STD)
    line = next(n for n in notes if n.startswith("data.mean="))
    assert "set by the recipe or command line; the model's is (0.5, 0.5, 0.5)" in line


def test_the_detector_records_the_clip_values_it_applies_and_refuses_others():
    cfg, notes = resolve(cfg_for("tiny", name="open_vocab_detector"))
    assert cfg.data.mean == tuple(CLIP_MEAN) and cfg.data.std == tuple(CLIP_STD)
    assert cfg.data.image_size == cfg.model.detector.min_size and "GeneralizedRCNNTransform" in notes[-1]
    with pytest.raises(AttrdistError, match="normalises its images itself .* leave data.mean and data.std empty"):
        resolve(cfg_for("tiny", name="open_vocab_detector", mean=IMAGENET_MEAN, std=IMAGENET_STD))


def test_an_arch_without_a_pretrained_cfg_keeps_attrdists_earlier_values():
    cfg, notes = resolve(cfg_for("no_such_arch_xyz"))
    p = Preprocess.of(cfg.data)
    assert p == Preprocess() and (p.mean, p.interpolation, p.image_size) == (IMAGENET_MEAN, "bilinear", 224)
    assert "no timm pretrained cfg for no_such_arch_xyz" in notes[0]


def test_a_config_from_before_these_keys_means_imagenet_bilinear():
    """config.json / checkpoint meta written before data.interpolation/mean/std existed (image_size and
    eval_resize were always recorded): the values attrdist used then."""
    old = to_dict(replace(Config(), data=DataConfig(image_size=64, eval_resize=256 / 224)))
    for key in ("interpolation", "mean", "std"):
        del old["data"][key]
    p = Preprocess.of(from_dict(Config, old).data)
    assert p == Preprocess(image_size=64, eval_resize=256 / 224, interpolation="bilinear", mean=IMAGENET_MEAN,
                           std=IMAGENET_STD)


@pytest.mark.parametrize("override, message", [
    ("data.mean=0.5,0.5", "data.mean takes 3 values"),
    ("data.std=0.5,0,0.5", "data.std takes 3 positive values"),
    ("data.eval_resize=0.875", "data.eval_resize must be >= 1"),
    ("data.interpolation=lanczos", "must be one of 'auto', 'bilinear', 'bicubic', 'nearest'"),
])
def test_bad_values_are_one_line_errors(override, message):
    extra = ["data.std=0.5,0.5,0.5"] if override.startswith("data.mean") else \
        ["data.mean=0.5,0.5,0.5"] if override.startswith("data.std") else []
    with pytest.raises(AttrdistError, match=message):
        apply_overrides(Config(), [override, *extra])
    with pytest.raises(AttrdistError, match="data.mean and data.std go together"):
        apply_overrides(Config(), ["data.mean=0.5,0.5,0.5"])
    cfg = apply_overrides(Config(), ["data.mean=0.5,0.5,0.5", "data.std=0.5,0.5,0.5", "data.mean=", "data.std="])
    assert cfg.data.mean == cfg.data.std == ()
