"""Preprocessing from the model: the values a run's images are resized and normalised with.

    cfg, notes = resolve(cfg)    # data.image_size / eval_resize / interpolation / mean / std made concrete

The Trainer calls `resolve` before it writes config.json, so config.json and every checkpoint's meta
record concrete values; the workers, the device-side `photometric`, evaluation and `attrdist predict`
all read them from there (`attrdist.core.transforms.Preprocess.of`). A key the recipe or the command
line set is kept; a key left at its 'from the model' value (0, auto, empty) takes

  - a timm backbone (model.name=classifier or cross_modal): timm's pretrained cfg of model.backbone
    (`timm.models.get_pretrained_cfg`, offline, no weights needed; a tag such as resnet18.a1_in1k picks
    that tag's cfg): mean, std, interpolation, crop_pct (eval_resize = 1/crop_pct) and input_size.
    E.g. tf_efficientnet_lite0: mean = std = 0.5, bicubic, crop 0.875; resnet50: ImageNet's, bicubic,
    crop 0.95; vit_base_patch16_clip_224.openai: OpenAI CLIP's. An arch without a pretrained cfg gets
    the values attrdist used before (ImageNet, bilinear, no eval margin, 224 px), said in the notes.
  - the open-vocabulary detector (model.name=open_vocab_detector): OpenAI CLIP's mean/std
    (`CLIP_MEAN`/`CLIP_STD`, open_clip's constants). The detector applies them itself, inside
    torchvision's GeneralizedRCNNTransform, to the 0..1 images its data path hands it
    (attrdist/data/detection.py normalises nothing): the values recorded here are the very ones the model
    uses (models/detector.py reads them from this module), and a run that sets other ones is refused.

Pure: reads timm's/open_clip's tables, touches no file and no weights.
"""

from __future__ import annotations

from dataclasses import replace

from attrdist.core.config import Config
from attrdist.errors import AttrdistError

try:  # open_clip's constants: the single place these numbers are spelt out
    from open_clip.constants import OPENAI_DATASET_MEAN as CLIP_MEAN, OPENAI_DATASET_STD as CLIP_STD
except ImportError:  # pragma: no cover - open_clip is a dependency; the values are OpenAI's
    CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_FILTERS = ("bilinear", "bicubic", "nearest")


def model_preprocess(cfg: Config) -> tuple[dict, str]:
    """(the model's own values {image_size, eval_resize, interpolation, mean, std}, where they come from)."""
    m = cfg.model
    if m.name == "open_vocab_detector":
        # GeneralizedRCNNTransform resizes (bilinear) to model.detector.min_size itself; the eval crop is unused
        return ({"image_size": m.detector.min_size, "eval_resize": 1.0, "interpolation": "bilinear",
                 "mean": tuple(CLIP_MEAN), "std": tuple(CLIP_STD)},
                "OpenAI CLIP's mean/std, applied inside the detector (GeneralizedRCNNTransform)")
    import timm

    try:
        pc = timm.models.get_pretrained_cfg(m.backbone)
    except Exception:  # an unknown arch: build_model says so, with the fix
        pc = None
    if pc is None or not getattr(pc, "mean", None):
        return ({"image_size": 224, "eval_resize": 1.0, "interpolation": "bilinear", "mean": IMAGENET_MEAN,
                 "std": IMAGENET_STD}, f"no timm pretrained cfg for {m.backbone}: attrdist's defaults (ImageNet)")
    crop = float(pc.crop_pct or 1.0)
    interp = pc.interpolation if pc.interpolation in _FILTERS else "bicubic"
    return ({"image_size": int(pc.input_size[-1]), "eval_resize": 1.0 / crop, "interpolation": interp,
             "mean": tuple(float(v) for v in pc.mean), "std": tuple(float(v) for v in pc.std)},
            f"timm's pretrained cfg of {m.backbone}")


def resolve(cfg: Config) -> tuple[Config, list[str]]:
    """`cfg` with data.image_size, eval_resize, interpolation, mean and std concrete, and one line per key
    saying where its value comes from."""
    d = cfg.data
    own, source = model_preprocess(cfg)
    if cfg.model.name == "open_vocab_detector" and d.mean and (tuple(d.mean), tuple(d.std)) != (own["mean"], own["std"]):
        raise AttrdistError(f"data.mean={','.join(map(str, d.mean))} / data.std: the open-vocabulary detector normalises "
                            f"its images itself with its CLIP's mean/std ({source}); leave data.mean and data.std empty")
    unset = {"image_size": d.image_size == 0, "eval_resize": d.eval_resize == 0, "interpolation": d.interpolation == "auto",
             "mean": not d.mean, "std": not d.std}
    new = {k: own[k] if unset[k] else getattr(d, k) for k in unset}
    notes = []
    for k, was_unset in unset.items():
        v = new[k]
        shown = ",".join(f"{x:.6g}" for x in v) if isinstance(v, tuple) else f"{v:.6g}" if isinstance(v, float) else v
        if was_unset:
            notes.append(f"data.{k}={shown} ({source})")
        else:
            differs = "" if v == own[k] else f"; the model's is {own[k]!r:.60} ({source})"
            notes.append(f"data.{k}={shown} (set by the recipe or command line{differs})")
    return replace(cfg, data=replace(d, **new)), notes
