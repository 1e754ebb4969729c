"""cocottributes: object-level attributes on COCO box crops (experiment 3, COCO Attributes).

Each sample is one COCO object cropped from its image with a context margin; its 204 labels come
from the annotators' votes (>= 0.5 -> positive) and entries nobody labelled are *ignored* in the
loss and in every metric (the experiment's mistake was binarising them as negatives, giving ~103
"true" attributes per object and a chance-level 51.5 % "accuracy"). Model: ImageNet ResNet-50
(weights from a local file/cache when there are any) + head 2048 -> 512 -> 204 with dropout,
masked BCE, Adam lr 1e-4 wd 1e-4, StepLR(15 epochs, 0.5), 30 epochs, batch 8, a permanent
checkpoint every 10 epochs + the best one.

    python recipes/cocottributes.py                     # demo: crops of the demo scenes, simulated votes
    python shards/cocottributes.py --out /data/cocottributes-shards --pkl cocottributes_eccv_version.pkl \
        --instances instances_train2017.json instances_val2017.json --images /data/coco/train2017 /data/coco/val2017
    python recipes/cocottributes.py data.shards=/data/cocottributes-shards   # full profile
    accelerate launch recipes/cocottributes.py          # any of these under accelerate

What changed from the seed (seeds/002), and why:
- Votes thresholded (>= 0.5 positive) and unlabelled entries ignored in the loss and every metric: the
  seed's binarisation made ~103 of 204 attributes "true" per object and its 51.5 % was chance.
- Objects are found through their annotation id in the 2017 (or 2014) instances; the ones not found
  are counted by reason in the pack's report (the seed kept 275 of 1,000 without saying why).
- mAP/F1 beside the trivial predictors instead of accuracy.
- Train augmentation: the seed only cropped and resized; here also a random crop of 60-100 % of the
  box crop, a horizontal flip and mild jitter (hue 0: colour attributes keep their colour).
- ImageNet weights are required (lr 1e-4 fine-tunes): model.pretrained=auto takes them from the local
  timm/HF cache and the run stops if there are none; model.pretrained=none trains from scratch on purpose.
"""

import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from attrdist.core.config import (AugmentConfig, Config, DataConfig, ModelConfig, OptimConfig, RunConfig,  # noqa: E402
                             ScheduleConfig)
from attrdist.demo.packs import cocottributes_demo_shards  # noqa: E402
from attrdist.recipe import main


def full() -> Config:
    return Config(
        data=DataConfig(image_size=224, eval_resize=1.0, batch_size=8, num_workers=4, labels="labels",
                        eval_labels=("labels",), test_split="",  # COCO Attributes has train/val only
                        augment=AugmentConfig(crop_scale=(0.6, 1.0), hflip=0.5, brightness=0.2, contrast=0.2,
                                              saturation=0.2, hue=0.0, erase=0.0)),
        model=ModelConfig(name="classifier", backbone="resnet50", pretrained="auto", head_dims=(512,), dropout=0.5),
        optim=OptimConfig(name="adam", lr=1e-4, weight_decay=1e-4, clip_grad_norm=0.0, contrastive_weight=0.0),
        schedule=ScheduleConfig(name="step", step_epochs=15, step_gamma=0.5),
        run=RunConfig(name="cocottributes", epochs=30, patience=0, monitor="val/labels/mAP", ckpt_every_epochs=10),
    )


def demo() -> Config:
    """Crops of the demo's objects (14 attributes: shape, colour, size, texture) at 48 px, ResNet-18 from scratch
    on purpose (model.pretrained=none: nothing depends on the local weight caches)."""
    cfg = full()
    return replace(
        cfg,
        data=replace(cfg.data, image_size=48, batch_size=64, num_workers=1,
                     augment=replace(cfg.data.augment, crop_scale=(0.7, 1.0), brightness=0.1, contrast=0.1,
                                     saturation=0.1)),
        model=replace(cfg.model, backbone="resnet18", pretrained="none", dropout=0.2),
        optim=replace(cfg.optim, lr=2e-3, weight_decay=1e-5),
        schedule=replace(cfg.schedule, step_epochs=3),
        run=replace(cfg.run, name="cocottributes-demo", epochs=6, eval_every=2, ckpt_every_epochs=2, curves_every=2),
    )


if __name__ == "__main__":
    main("cocottributes", full, demo, demo_data=cocottributes_demo_shards)
