"""One sample from the shards: read, decode, augment (keyed), collate; corrupt samples counted per shard.

Workers receive whole batches of (index, epoch) pairs (`core.order.BatchPlan`, the loader's batch
sampler): each worker reads the bytes (`ShardReader`: its own tar index, pread), decodes, does the
spatial augmentation with key fold(seed, epoch, index) on uint8 pixels and collates. For an
accelerator, batches cross it as uint8 (4x fewer bytes) and the pixel-wise augmentation (colour,
erasing, whose parameters each sample carries) and normalisation run on the batch where it lands
(`batch_images`, on the device); for a CPU device the workers run that stage too
(`pixels_in_workers`) and hand over finished float images. With data.decode=device the workers do not
decode the JPEGs they can hand over: they check the sample, draw its augmentation for the full-size image
and pass the bytes on; `batch_images` decodes and crops them on the device (`device_decode`).

Training drops the last incomplete global batch (logged); evaluation pads the last batch with
index -1 samples marked `valid=False`, so every rank runs the same number of steps and the
gathered predictions are exactly the split, once each. A sample that fails to decode is kept in
the batch as a blank image with `valid=False` (and counted): shapes never change.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch
from torch.utils.data import Dataset, default_collate

from attrdist.core import rng as rnglib
from attrdist.core.config import DataConfig
from attrdist.core.transforms import (IDENTITY_COLOUR, NO_ERASE, Preprocess, decode_image, draw_full_size_params,
                                      eval_geometry, photometric, train_geometry)
from attrdist.data.device_decode import decode_device, device_decodable, device_images, pack_jpegs
from attrdist.data.foreign import sample_meta
from attrdist.data.reader import ShardError, ShardReader, check_checksums
from attrdist.errors import AttrdistError

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
log = logging.getLogger("attrdist")


class SampleError(str):
    """Why one sample was skipped: the line "<key> in <shard file>: <reason>", carrying `.shard` and `.key`
    too, so the counts per shard survive DataLoader workers and ranks (it pickles as itself)."""

    def __new__(cls, shard: str, key: str, reason: str):
        self = super().__new__(cls, f"{key} in {shard}: {reason}"[:400])
        self.shard, self.key, self.reason = shard, key, reason
        return self

    def __reduce__(self):
        return SampleError, (self.shard, self.key, self.reason)


def sample_source(reader, index: int, raw: dict) -> tuple[str, str]:
    """(shard file name, sample key) of sample `index` of `reader` (`raw`: what was read of it)."""
    shard, key = "?", raw.get("__key__", f"#{index}")
    if hasattr(reader, "locate"):  # a ShardReader (tests use stand-ins)
        s, pos = reader.locate(index)
        shard, key = Path(reader.paths[s]).name, raw.get("__key__", f"#{pos}")
    return shard, str(key)


def sample_error(reader, index: int, raw: dict, e: Exception) -> SampleError:
    """The SampleError of sample `index` of `reader` that failed with `e` (`raw`: what was read of it)."""
    shard, key = sample_source(reader, index, raw)
    if isinstance(e, ShardError):
        return SampleError(e.shard, e.key, e.reason)
    if isinstance(e, KeyError) and e.args == ("json",):
        reason = "the sample has no json member (its labels)"
    elif isinstance(e, StopIteration):
        reason = f"the sample has no image member ({'/'.join(IMAGE_KEYS)}; it has: {', '.join(k for k in raw if k != '__key__')})"
    else:
        reason = f"{type(e).__name__}: {' '.join(str(e).split())}"
    return SampleError(shard, key, reason[:300])


class CorruptTally:
    """Samples skipped as corrupt, counted per shard file into `counts` (a dict, updated in place: pass
    one held by the loop state to keep it in checkpoints). One warning per sample for the first
    `log_first`, then a single line saying that further ones are only counted."""

    def __init__(self, what: str, counts: dict[str, int] | None = None, log_first: int = 20):
        self.what, self.counts, self.log_first, self.logged = what, {} if counts is None else counts, log_first, 0

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def add(self, errors: list, log_them: bool = True) -> None:
        for e in errors:
            shard = getattr(e, "shard", "?")
            self.counts[shard] = self.counts.get(shard, 0) + 1
            if log_them and self.logged < self.log_first:
                log.warning("%s: skipped undecodable sample %s", self.what, e)
            elif log_them and self.logged == self.log_first:
                log.warning("%s: more undecodable samples: from now on only counted per shard (report.md)", self.what)
            self.logged += 1

    def worst(self, n: int = 8) -> str:
        """The `n` shards with the most skipped samples, as "file count, file count, ..."."""
        top = sorted(self.counts.items(), key=lambda kv: (-kv[1], kv[0]))
        return ", ".join(f"{s} {c}" for s, c in top[:n]) + (f" and {len(top) - n} more shards" if len(top) > n else "")


class SampleDataset(Dataset):
    """Map (index, epoch) -> one decoded, transformed sample dict."""

    def __init__(self, reader: ShardReader, num_attributes: int, label_fields: list[str], cfg: DataConfig,
                 seed: int, train: bool, pixels_in_workers: bool = False, image_dtype: torch.dtype = torch.float32):
        """`pixels_in_workers`: also run the pixel-wise stage (`transforms.photometric`) here, per sample,
        and hand out finished float images. For a CPU device: there the training process's threads are
        busy with the step, and the stage run there competes with the workers for the same cores
        (bench/input.py: 528 vs 727 images/s). Off (an accelerator): uint8 images plus their parameters,
        finished on the device by `batch_images`. `image_dtype`: of those finished images (bfloat16 for a bf16
        run: data.worker_dtype)."""
        self.reader, self.A, self.fields = reader, num_attributes, list(label_fields)
        self.cfg, self.seed, self.train, self.pixels_in_workers = cfg, seed, train, pixels_in_workers
        self.image_dtype = image_dtype
        self.pre = Preprocess.of(cfg)  # size, eval crop, resampling, mean/std: the run's (config.json)
        self.on_device = cfg.decode == "device"  # JPEGs decoded in `batch_images` (device_decode)
        if self.on_device and pixels_in_workers:
            raise AttrdistError("data.decode=device with the pixel stage in the workers: the workers hand over JPEG "
                                "bytes, not pixels; set data.pixel_stage=device (or auto) or data.decode=workers")
        self.labels_from = getattr(reader, "labels_from", None)  # foreign shards (attrdist index): data.foreign

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
        pre = self.pre
        img = blank_pixels(pre)
        out = {"image": photometric(img[None], mean=pre.mean, std=pre.std)[0].to(self.image_dtype)
               if self.pixels_in_workers else img.contiguous(),
               "index": index, "valid": False, "corrupt": False}
        if self.train and not self.pixels_in_workers:
            out.update(colour=IDENTITY_COLOUR, erase=NO_ERASE)
        if self.on_device:
            out.update(jpeg=None, source=("?", f"#{index}"), **({"geometry": NO_GEOMETRY} if self.train else {}))
        for f in self.fields:
            out[f"labels/{f}"] = torch.zeros(self.A)
            out[f"mask/{f}"] = torch.zeros(self.A, dtype=torch.bool)
        return out

    def __getitem__(self, item: tuple[int, int]) -> dict:
        index, epoch = item
        if index < 0:
            return self.blank(index)
        raw: dict = {}
        try:
            raw = self.reader[index]  # ShardError: the sample's shard is truncated, damaged or refused
            meta = sample_meta(raw, self.labels_from, self.A)  # LabelError: no label member, label out of range
            check_checksums(raw, meta)  # ChecksumError: flipped bits since packing
            labels = self._labels(meta)  # IndexError/TypeError: label indices that do not fit the attributes
            data = next(raw[k] for k in IMAGE_KEYS if k in raw)
            pre = self.pre
            size = pre.image_size
            min_side = int(math.ceil(size / math.sqrt(self.cfg.augment.crop_scale[0])))
            full = device_decodable(data) if self.on_device else None  # (h, w): the device decodes it
            if full and self.train:  # its bytes, and the worker path's parameters for the full-size image
                p = draw_full_size_params(rnglib.fold(self.seed, rnglib.AUGMENT, epoch, index), *full, size,
                                          self.cfg.augment, min_side)
                x = {"jpeg": data, "geometry": p.geometry(), "colour": p.colour,
                     "erase": torch.tensor(p.erase, dtype=torch.int64)}
            elif full:
                x = {"jpeg": data}
            elif self.train:
                img = decode_image(bytes(data), min_side)
                key = rnglib.fold(self.seed, rnglib.AUGMENT, epoch, index)
                # uint8 image + colour/erase parameters
                x = train_geometry(img, key, size, self.cfg.augment, pre.interpolation)
            else:
                img = decode_image(bytes(data), int(size * pre.eval_resize))
                x = {"image": eval_geometry(img, size, pre.eval_resize, pre.interpolation)}
            if self.pixels_in_workers:
                x = {"image": photometric(x["image"][None], x["colour"][None] if "colour" in x else None,
                                          x["erase"][None] if "erase" in x else None, mean=pre.mean,
                                          std=pre.std)[0].to(self.image_dtype)}
        except Exception as e:  # unreadable sample, corrupt JPEG, missing field, bad labels, decompression bomb
            out = self.blank(index)
            out["corrupt"] = True
            out["error"] = sample_error(self.reader, index, raw, e)
            if self.on_device:
                out["source"] = (out["error"].shard, out["error"].key)
            return out
        if self.on_device:  # a sample decoded here goes as in data.decode=workers, beside the others' bytes
            x = {"jpeg": None, **({"geometry": NO_GEOMETRY} if self.train else {}), **x,
                 "source": sample_source(self.reader, index, raw)}
        return {**x, "index": index, "valid": True, "corrupt": False, **labels}


NO_GEOMETRY = torch.zeros(10, dtype=torch.float64)  # the "geometry" of a sample decoded in its worker (unused)


def blank_pixels(pre: Preprocess) -> torch.Tensor:
    """uint8 [3, size, size] (a broadcast view) of the mean colour, what erasing paints: the image of a sample
    that failed, neutral for BatchNorm; the loss and the metrics leave it out (valid=False)."""
    s = pre.image_size
    return torch.tensor([round(255 * m) for m in pre.mean], dtype=torch.uint8).view(3, 1, 1).expand(3, s, s)


def worker_image_dtype(worker_dtype: str, mixed_precision: str) -> torch.dtype:
    """data.worker_dtype for a run computing in `mixed_precision`: auto = bfloat16 for a bf16 run (autocast
    casts the first layer's input to bf16 anyway), else float32."""
    if worker_dtype == "auto":
        worker_dtype = "bfloat16" if mixed_precision == "bf16" else "float32"
    return getattr(torch, worker_dtype)


def collate(samples: list[dict]) -> dict:
    """Stack tensors; keep the decode errors of this batch as a list of strings.

    data.decode=device (samples carry "jpeg"): "jpeg" is the batch's JPEG bytes in one flat uint8 tensor
    with "jpeg_len" int64 [B] (`pack_jpegs`; 0 = decoded in its worker), "image" uint8 [K, 3, S, S] holds
    only the K images decoded in the workers, in batch order (absent when K = 0: B placeholder images would
    cross shared memory, pinning and the host-to-device copy for nothing), "source" is [B] (shard, key) to
    name a sample the device cannot decode; every other tensor is stacked as [B, ...] as always."""
    if "jpeg" in samples[0]:
        made = [s["image"] for s in samples if s["jpeg"] is None]
        out = {k: default_collate([s[k] for s in samples]) for k in samples[0]
               if k != "image" and isinstance(samples[0][k], torch.Tensor)}
        out["jpeg"], out["jpeg_len"] = pack_jpegs([s["jpeg"] for s in samples])
        out["source"] = [s["source"] for s in samples]
        if made:
            out["image"] = default_collate(made)
    else:
        # default_collate stacks straight into shared memory inside a worker (torch.stack then a copy made two)
        out = {k: default_collate([s[k] for s in samples]) for k in samples[0] if isinstance(samples[0][k], torch.Tensor)}
    out["index"] = torch.tensor([s["index"] for s in samples], dtype=torch.int64)
    out["valid"] = torch.tensor([s["valid"] for s in samples], dtype=torch.bool)
    out["errors"] = [s["error"] for s in samples if s.get("corrupt")]
    return out


def batch_images(batch: dict, device, memory_format=torch.contiguous_format, pre: Preprocess | DataConfig | None = None
                 ) -> torch.Tensor:
    """A batch's uint8 images -> the model's float input on `device`: the pixel-wise augmentation (train
    batches carry each sample's colour map and erasing box) and normalisation run there, on the whole
    batch at once (`transforms.photometric`). `pre`: the run's preprocessing (its mean/std are used), or the
    DataConfig holding it; None = `Preprocess()` (ImageNet's, what a DataConfig left unresolved means).

    A data.decode=device batch (`collate`: "jpeg") is decoded and cropped on `device` first (`device_images`,
    the run's size and resampling from `pre`); a sample that neither the device nor the CPU can decode
    becomes what a worker makes of a corrupt sample: the blank image, valid=False, no labels, its
    `SampleError` in batch["errors"] (counted by the trainer after the forward, like the workers' ones)."""
    dev = torch.device(device)
    pre = pre if isinstance(pre, Preprocess) else Preprocess.of(pre) if pre is not None else Preprocess()
    if "jpeg" in batch:
        images = decoded_batch(batch, decode_device(dev), pre)
    elif batch["image"].is_floating_point():  # already finished (a benchmark's batches held in memory)
        return batch["image"].to(dev, non_blocking=True).contiguous(memory_format=memory_format)
    else:
        images = batch["image"].to(dev, non_blocking=True)
    colour = batch["colour"].to(dev, non_blocking=True) if "colour" in batch else None
    # the erasing boxes stay on the host: they are read as numbers (no device sync)
    return photometric(images, colour, batch.get("erase"), memory_format, mean=pre.mean, std=pre.std)


def decoded_batch(batch: dict, dev: torch.device, pre: Preprocess) -> torch.Tensor:
    """uint8 [B, 3, S, S] on `dev` of a data.decode=device batch: the device's decodes and crops, the
    workers' images in their places, the blank image for a sample that failed (its row of the batch made
    a corrupt sample's, in place, before anything of it moves to the device)."""
    images, failed = device_images(batch, dev, pre)
    made = iter(batch["image"].to(dev, non_blocking=True)) if "image" in batch else iter(())
    for i, n in enumerate(batch["jpeg_len"].tolist()):
        if not n:
            images[i] = next(made)
    for i, reason in failed.items():
        shard, key = batch["source"][i]
        batch["errors"].append(SampleError(shard, key, f"undecodable on {dev.type}, then on the CPU: {reason}"))
        batch["valid"][i] = False
        for k in batch:
            if k.startswith(("labels/", "mask/")):
                batch[k][i] = 0
        if "colour" in batch:
            batch["colour"][i], batch["erase"][i] = IDENTITY_COLOUR, NO_ERASE
        images[i] = blank_pixels(pre).to(dev)
    return torch.stack(images)
