"""From shards to batches: a global sample order, per-rank slices, decode + augment in workers.

The order of an epoch is a pure function of (seed, epoch): a permutation of the split's sample
indices. It is cut into *global* batches of `data.batch_size`; rank r of W takes slice r of each
global batch. So 1 or N processes see the same samples in the same optimizer steps, and resuming
at global batch k of an epoch is just "start the order at k" (no saved RNG state).

DataLoader workers receive whole batches of (index, epoch) pairs (the batch sampler below): each
worker reads the bytes (wids indexed tar), decodes, augments with key fold(seed, epoch, index)
and collates, so per-sample tensors never cross a process boundary one by one.

Training drops the last incomplete global batch (logged); evaluation pads the last batch with
index -1 samples marked `valid=False`, so every rank runs the same number of steps and the
gathered predictions are exactly the split, once each. A sample that fails to decode is kept in
the batch as a blank image with `valid=False` (and counted): shapes never change.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, default_collate

from attrdist import rng as rnglib
from attrdist.config import DataConfig
from attrdist.shards import Manifest, ShardReader
from attrdist.transforms import decode_image, eval_transform, train_transform

IMAGE_KEYS = ("jpg", "jpeg", "png")


def epoch_order(n: int, seed: int, epoch: int, shuffle: bool = True) -> np.ndarray:
    """The global sample order of one epoch: a pure function of (n, seed, epoch)."""
    if not shuffle:
        return np.arange(n, dtype=np.int64)
    return rnglib.generator(seed, rnglib.ORDER, epoch).permutation(n).astype(np.int64)


@dataclass(frozen=True)
class BatchPlan:
    """Which samples rank `rank` of `world` reads in each step of one epoch."""

    n: int
    global_batch: int
    world: int
    rank: int
    seed: int
    epoch: int
    shuffle: bool
    drop_last: bool
    start: int = 0  # first global batch (mid-epoch resume)

    def __post_init__(self):
        if self.global_batch % self.world:
            raise ValueError(f"global batch {self.global_batch} is not divisible by {self.world} processes")

    @property
    def num_batches(self) -> int:
        return self.n // self.global_batch if self.drop_last else math.ceil(self.n / self.global_batch)

    def __len__(self) -> int:
        return max(0, self.num_batches - self.start)

    def __iter__(self):
        order = epoch_order(self.n, self.seed, self.epoch, self.shuffle)
        total = self.num_batches * self.global_batch
        if total > self.n:  # pad (eval only): index -1 = no sample
            order = np.concatenate([order, np.full(total - self.n, -1, dtype=np.int64)])
        local = self.global_batch // self.world
        for b in range(self.start, self.num_batches):
            sl = order[b * self.global_batch + self.rank * local: b * self.global_batch + (self.rank + 1) * local]
            yield [(int(i), self.epoch) for i in sl]


class SampleDataset(Dataset):
    """Map (index, epoch) -> one decoded, transformed sample dict."""

    def __init__(self, reader: ShardReader, num_attributes: int, label_fields: list[str], cfg: DataConfig,
                 seed: int, train: bool):
        self.reader, self.A, self.fields = reader, num_attributes, list(label_fields)
        self.cfg, self.seed, self.train = cfg, seed, train

    def __len__(self) -> int:
        return len(self.reader)

    def _labels(self, meta: dict) -> dict[str, torch.Tensor]:
        out = {}
        for f in self.fields:
            y = torch.zeros(self.A, dtype=torch.float32)
            y[meta.get(f, [])] = 1.0
            m = torch.ones(self.A, dtype=torch.bool)
            if f"{f}_ignore" in meta:  # indices of unlabelled entries: left out of loss and metrics
                m[meta[f"{f}_ignore"]] = False
            out[f"labels/{f}"], out[f"mask/{f}"] = y, m
        return out

    def blank(self, index: int) -> dict:
        s = self.cfg.image_size
        out = {"image": torch.zeros(3, s, s), "index": index, "valid": False, "corrupt": False}
        for f in self.fields:
            out[f"labels/{f}"] = torch.zeros(self.A)
            out[f"mask/{f}"] = torch.zeros(self.A, dtype=torch.bool)
        return out

    def __getitem__(self, item: tuple[int, int]) -> dict:
        index, epoch = item
        if index < 0:
            return self.blank(index)
        raw = self.reader[index]
        try:
            meta = json.loads(raw["json"])
            data = next(raw[k] for k in IMAGE_KEYS if k in raw)
            size = self.cfg.image_size
            if self.train:
                min_side = int(math.ceil(size / math.sqrt(self.cfg.augment.crop_scale[0])))
                img = decode_image(bytes(data), min_side)
                key = rnglib.fold(self.seed, rnglib.AUGMENT, epoch, index)
                x = train_transform(img, key, size, self.cfg.augment)
            else:
                img = decode_image(bytes(data), int(size * self.cfg.eval_resize))
                x = eval_transform(img, size, self.cfg.eval_resize)
        except Exception as e:  # corrupt JPEG, truncated sample, missing field, decompression bomb
            out = self.blank(index)
            out["corrupt"] = True
            out["error"] = f"{raw.get('__key__', index)}: {type(e).__name__}: {e}"[:300]
            return out
        return {"image": x, "index": index, "valid": True, "corrupt": False, **self._labels(meta)}


def collate(samples: list[dict]) -> dict:
    """Stack tensors; keep the decode errors of this batch as a list of strings."""
    # default_collate stacks straight into shared memory inside a worker (torch.stack then a copy made two)
    out = {k: default_collate([s[k] for s in samples]) for k in samples[0] if isinstance(samples[0][k], torch.Tensor)}
    out["index"] = torch.tensor([s["index"] for s in samples], dtype=torch.int64)
    out["valid"] = torch.tensor([s["valid"] for s in samples], dtype=torch.bool)
    out["errors"] = [s["error"] for s in samples if s.get("corrupt")]
    return out


def make_loader(dataset: SampleDataset, plan: BatchPlan, num_workers: int, pin_memory: bool = False) -> DataLoader:
    return DataLoader(dataset, batch_sampler=plan, num_workers=num_workers, collate_fn=collate,
                      pin_memory=pin_memory, persistent_workers=False,
                      prefetch_factor=2 if num_workers else None)

