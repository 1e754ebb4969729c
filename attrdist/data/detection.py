"""Detection samples from packed DIOR-style shards, in the same world-size-independent order as
`attrdist.data.samples` (BatchPlan: global batches of (index, epoch), rank r takes slice r).

    reader = ShardReader(load_manifest(shards), "train")
    base = [i for i, n in enumerate(manifest.attributes) if n not in novel]    # label k+1 = base[k]
    ds = DetectionDataset(reader, seed=3, train=True, classes=base)            # novel objects dropped
    plan = BatchPlan(len(ds), global_batch=16, world=W, rank=r, seed=3, epoch=e, shuffle=True, drop_last=True)
    for batch in make_loader(ds, plan, num_workers=2, collate_fn=collate):   # attrdist.data.loader
        keep = batch["valid"].tolist()
        images = [x for x, k in zip(batch["images"], keep) if k]; targets = ...  # -> model(images, targets)

A sample (shards written by attrdist.pack.dior: "boxes" [x, y, w, h] in stored-image pixels,
"box_labels" indices into the manifest's class list, "image_id" of coco_<split>.json) becomes

    {"image": float [3, H, W] in 0..1, "target": {"boxes": float [n, 4] xyxy, "labels": int64 [n]},
     "image_id": int, "scale": input px per stored px, "index": int, "valid": bool}

Labels are 1 + the position of the object's class in `classes` (None: all manifest classes, in
order); objects of other classes are dropped: training on base classes makes held-out (novel)
objects background, as open-vocabulary detectors do. `max_side` > 0 shrinks images whose longer
side exceeds it (boxes follow; `scale` undoes it for evaluation). Training augmentation
`augment(image, boxes, key)` is a pure function of its inputs with key = fold(seed, AUGMENT,
epoch, index): a uniformly drawn element of the square's symmetry group (horizontal flip,
vertical flip, 90-degree rotation, each with p=0.5; valid for nadir aerial images), applied to
the boxes too by torchvision, then mild brightness/contrast/saturation jitter. A sample that fails
to decode comes back as a blank image with no boxes and `valid=False` (its error in `errors`);
index -1 (evaluation padding) is also invalid. Leave invalid samples out of the forward pass.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import torch
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.ops import box_convert, remove_small_boxes
from torchvision.transforms.v2 import functional as F

from attrdist.core import rng as rnglib
from attrdist.data.samples import IMAGE_KEYS, sample_error
from attrdist.data.reader import ShardReader, check_checksums
from attrdist.core.transforms import decode_image

JITTER = 0.2  # brightness, contrast and saturation factors in [1 - JITTER, 1 + JITTER]


def augment(image: torch.Tensor, boxes: torch.Tensor, key: int,
            jitter: float = JITTER) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 [3, H, W], xyxy [n, 4]) -> the same, flipped/rotated together and colour-jittered."""
    g = rnglib.generator(key)
    flips = g.uniform(size=3) < 0.5  # hflip, vflip, rot90: all drawn, whatever is applied
    factors = 1.0 + jitter * g.uniform(-1.0, 1.0, size=3)
    img = tv_tensors.Image(image)
    bxs = tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=tuple(image.shape[-2:]))
    for op, on in zip((F.horizontal_flip, F.vertical_flip, lambda x: F.rotate(x, 90, expand=True)), flips):
        if on:
            img, bxs = op(img), op(bxs)
    img = F.adjust_brightness(img, float(factors[0]))
    img = F.adjust_contrast(img, float(factors[1]))
    img = F.adjust_saturation(img, float(factors[2]))
    return img.as_subclass(torch.Tensor), bxs.as_subclass(torch.Tensor)


class DetectionDataset(Dataset):
    """Map (index, epoch) -> one detection sample (see the module docstring)."""

    def __init__(self, reader: ShardReader, seed: int, train: bool, classes: Sequence[int] | None = None,
                 max_side: int = 0):
        self.reader, self.seed, self.train, self.max_side = reader, seed, train, max_side
        self.label_of = None if classes is None else {c: k + 1 for k, c in enumerate(classes)}

    def __len__(self) -> int:
        return len(self.reader)

    def blank(self, index: int, error: str = "") -> dict:
        side = self.max_side or 32
        empty = _target(torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64))
        return {"image": torch.zeros(3, side, side), "target": empty,
                "image_id": -1, "scale": 1.0, "index": index, "valid": False, **({"error": error} if error else {})}

    def _labels(self, box_labels: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(mask of the objects kept, their labels 1..C)."""
        if self.label_of is None:
            return torch.ones(len(box_labels), dtype=torch.bool), torch.tensor(box_labels, dtype=torch.int64) + 1
        keep = torch.tensor([c in self.label_of for c in box_labels], dtype=torch.bool)
        return keep, torch.tensor([self.label_of[c] for c in box_labels if c in self.label_of], dtype=torch.int64)

    def _load(self, raw: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict, float]:
        meta = json.loads(raw["json"])
        check_checksums(raw, meta)  # ChecksumError: flipped bits since packing
        data = next(raw[k] for k in IMAGE_KEYS if k in raw)
        h, w = meta["height"], meta["width"]
        scale = min(1.0, self.max_side / max(h, w)) if self.max_side else 1.0
        image = decode_image(bytes(data), self.max_side or None)  # JPEG draft: sides stay >= max_side
        size = [round(h * scale), round(w * scale)]
        if list(image.shape[-2:]) != size:
            image = F.resize(image, size, antialias=True)
        boxes = box_convert(torch.tensor(meta["boxes"], dtype=torch.float32).reshape(-1, 4), "xywh", "xyxy") * scale
        keep, labels = self._labels(meta["box_labels"])
        return image, boxes[keep], labels, meta, scale

    def __getitem__(self, item: tuple[int, int]) -> dict:
        index, epoch = item
        if index < 0:
            return self.blank(index)
        raw: dict = {}
        try:
            raw = self.reader[index]  # ShardError: the sample's shard is truncated, damaged or refused
            image, boxes, labels, meta, scale = self._load(raw)
            image_id = int(meta["image_id"])
        except Exception as e:  # unreadable sample, corrupt image, missing field
            return self.blank(index, sample_error(self.reader, index, raw, e))
        if self.train:
            image, boxes = augment(image, boxes, rnglib.fold(self.seed, rnglib.AUGMENT, epoch, index))
        ok = remove_small_boxes(boxes, 1e-2)  # torchvision refuses boxes without area in training
        return {"image": F.to_dtype(image, torch.float32, scale=True), "target": _target(boxes[ok], labels[ok]),
                "image_id": image_id, "scale": scale, "index": index, "valid": True}


def _target(boxes: torch.Tensor, labels: torch.Tensor) -> dict:
    return {"boxes": boxes.float(), "labels": labels}


def collate(samples: list[dict]) -> dict:
    """Lists of images/targets (sizes differ), plus ids, scales, validity and the batch's decode errors."""
    return {"images": [s["image"] for s in samples], "targets": [s["target"] for s in samples],
            "image_ids": [s["image_id"] for s in samples], "scales": [s["scale"] for s in samples],
            "index": torch.tensor([s["index"] for s in samples], dtype=torch.int64),
            "valid": torch.tensor([s["valid"] for s in samples], dtype=torch.bool),
            "errors": [s["error"] for s in samples if "error" in s]}
