"""data.decode=device (issue 21): the workers hand over JPEG bytes and the parameters drawn with the worker
path's keys; `batch_images` decodes and crops on the run's device. On a CPU device the decode is
libjpeg-turbo through torchvision, the same pixels as the workers' full-size decode, so these tests can
hold the device path to the worker path exactly where both decode at full size, and closely where the
workers decode at a DCT-reduced scale. Real shards (conftest's demo pack), real PNG/CMYK/truncated bytes.
"""

from __future__ import annotations

import io
import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from PIL import Image

from attrdist.core.config import AugmentConfig, DataConfig
from attrdist.core.rng import AUGMENT, fold
from attrdist.core.transforms import Preprocess, apply_geometry, decode_image, draw_train_params, train_geometry
from attrdist.data.loader import make_loader
from attrdist.data.reader import ShardReader, load_manifest
from attrdist.data.samples import SampleDataset, SampleError, batch_images, collate, decoded_batch
from attrdist.core.order import BatchPlan
from attrdist.errors import AttrdistError
from tests.conftest import FAST, run_recipe
from tests.test_reliability_data import members, rewrite, with_crc

AUG = AugmentConfig(crop_scale=(0.7, 1.0), hflip=0.5, vflip=0.3, rotate=10, blur=0.4, hue=0.05, saturation=0.2,
                    erase=0.5)


def dataset(root: Path, decode: str, size: int = 64, train: bool = True, split: str = "train") -> SampleDataset:
    m = load_manifest(root)
    cfg = DataConfig(image_size=size, eval_resize=1.0, augment=AUG, decode=decode)
    return SampleDataset(ShardReader(m, split), len(m.attributes), ["labels"], cfg, seed=7, train=train)


def batch_of(ds: SampleDataset, indices, epoch: int = 0) -> dict:
    return collate([ds[(i, epoch)] for i in indices])


def test_the_device_path_draws_the_worker_paths_parameters(small_shards):
    """Same key: the same parameters. At size 64 the workers decode the demo's 80 px JPEGs at full size, so
    the device sample's geometry applied to the full decode is the worker's crop, bit for bit. At size 24
    they decode at 1/2 scale (DCT): the device sample carries that same draw, its crop box doubled to
    full-size pixels, and the same colour map and erasing box as the worker's sample."""
    for size, scale in ((64, 1), (24, 2)):
        dev_ds, work_ds = dataset(small_shards, "device", size), dataset(small_shards, "workers", size)
        for i, epoch in [(0, 0), (5, 0), (5, 1), (17, 3), (41, 0), (90, 2), *((k, 4) for k in range(12))]:
            d, w = dev_ds[(i, epoch)], work_ds[(i, epoch)]
            assert d["valid"] and w["valid"] and "image" not in d and isinstance(d["jpeg"], bytes)
            assert torch.equal(d["colour"], w["colour"]) and torch.equal(d["erase"], w["erase"]), (size, i, epoch)
            for k in ("labels/labels", "mask/labels"):
                assert torch.equal(d[k], w[k])
            full = decode_image(d["jpeg"])
            assert d["geometry"][:2].tolist() == list(full.shape[1:])
            if scale == 1:
                assert torch.equal(apply_geometry(full, d["geometry"], size), w["image"]), (i, epoch)
                continue
            small = decode_image(d["jpeg"], 29)  # what the workers decode at size 24 (crop_scale 0.7: >= 29 px)
            assert [scale * n for n in small.shape[1:]] == list(full.shape[1:])
            p = draw_train_params(fold(7, AUGMENT, epoch, i), *small.shape[1:], size, AUG)  # the worker's draw
            assert torch.equal(train_geometry(small, fold(7, AUGMENT, epoch, i), size, AUG)["image"], w["image"])
            assert d["geometry"][2:6].tolist() == [scale * n for n in p.crop]
            assert d["geometry"][6:].tolist() == [p.hflip, p.vflip, p.angle, p.sigma]


def loader_batches(root: Path, decode: str, size: int, epoch: int = 0) -> list[dict]:
    """Two batches of 8 through a real DataLoader worker process (shared memory, pickled lists)."""
    ds = dataset(root, decode, size)
    plan = BatchPlan(16, 8, 1, 0, seed=7, epoch=epoch, shuffle=True, drop_last=True)
    return list(make_loader(ds, plan, num_workers=1))


def test_device_batches_on_a_cpu_match_the_worker_path(small_shards):
    """At size 64 both paths decode at full size: batch_images gives the same floats, bit for bit. At size 24
    the workers decode at 1/2 scale in the DCT domain and resample their crop of that; the device resamples
    the same box of the full-size decode (antialiased): the uint8 crops differ by that resampling only, at
    most 2.5 grey levels on average per image (measured 0.1-1.4 over 48 samples, up to 19 at single pixels
    on the demo's sharp edges), where the same image under another key differs by 7-58 on average."""
    pre = Preprocess(image_size=64)
    for d, w in zip(loader_batches(small_shards, "device", 64), loader_batches(small_shards, "workers", 64)):
        assert "image" not in d and d["jpeg_len"].min() > 0 and d["jpeg"].numel() == d["jpeg_len"].sum()
        assert torch.equal(d["index"], w["index"])
        assert torch.equal(batch_images(d, "cpu", pre=pre), batch_images(w, "cpu", pre=pre))
    pre = Preprocess(image_size=24)
    ds_w = dataset(small_shards, "workers", 24)
    for d, w in zip(loader_batches(small_shards, "device", 24), loader_batches(small_shards, "workers", 24)):
        got = decoded_batch(d, torch.device("cpu"), pre)
        assert got.shape == w["image"].shape == (8, 3, 24, 24) and got.dtype == torch.uint8
        assert (got.float() - w["image"].float()).abs().mean(dim=(1, 2, 3)).max() <= 2.5
        other = torch.stack([ds_w[(i, 5)]["image"] for i in d["index"].tolist()])  # the same images, epoch 5
        assert (got.float() - other.float()).abs().mean(dim=(1, 2, 3)).min() > 5.0


def garbled(jpeg: bytes) -> bytes:
    """The JPEG with its entropy-coded data overwritten by marker-like bytes after the first 20 of its scan
    (header and end-of-image marker intact): libjpeg-turbo and PIL both refuse it."""
    out = bytearray(jpeg)
    sos = out.find(b"\xff\xda")
    for i in range(sos + 20, len(out) - 2, 7):
        out[i] = 0xFF if i % 2 else 0x00
    return bytes(out)


@pytest.fixture(scope="module")
def mixed(small_shards, tmp_path_factory) -> dict:
    """A copy of small_shards whose train-000000.tar holds, among its JPEGs, a PNG (sample 1), a CMYK JPEG
    (2), a JPEG cut in half (3), a greyscale JPEG (4) and a garbled one (5), packed so (crc32s match)."""
    root = tmp_path_factory.mktemp("mixed") / "shards"
    shutil.copytree(small_shards, root)
    shard = root / "train-000000.tar"
    items, keys = [], []
    for m, data in members(shard):
        key, ext = m.name.split(".", 1)
        if key not in keys:
            keys.append(key)
        k = keys.index(key)
        if ext == "jpg" and k in (1, 2, 3, 4, 5):
            img = Image.open(io.BytesIO(data))
            buf = io.BytesIO()
            if k == 1:
                img.save(buf, "PNG")
                ext = "png"
            elif k == 2:
                img.convert("CMYK").save(buf, "JPEG", quality=90)
            elif k == 4:
                img.convert("L").save(buf, "JPEG", quality=90)
            new = data[:len(data) // 2] if k == 3 else garbled(data) if k == 5 else buf.getvalue()
            items.append((f"{key}.{ext}", new))
            replaced = (ext, new)
            continue
        if ext == "json" and k in (1, 2, 3, 4, 5):
            data = with_crc(data, **dict([replaced]))
        items.append((m.name, data))
    rewrite(shard, items, manifest_root=root)
    return {"root": root, "png": keys[1], "cmyk": keys[2], "cut": keys[3], "grey": keys[4], "garbled": keys[5]}


@pytest.mark.parametrize("train", [True, False])
def test_png_cmyk_cut_and_garbled_jpegs_in_a_device_batch(mixed, train):
    """The PNG, the CMYK JPEG and the JPEG cut short are decoded in the worker (no bytes handed over; the cut
    one fails there, as with data.decode=workers), the greyscale JPEG on the device. The garbled JPEG passes
    the worker's header check and fails on the device and then on the CPU: it becomes the blank image,
    valid=False, no labels, its SampleError in the batch's errors, exactly what the worker path makes of it.
    Every other sample is bit for bit the worker path's (full-size decodes on both paths)."""
    root = mixed["root"]
    d = batch_of(dataset(root, "device", train=train), range(8), epoch=1)
    w = batch_of(dataset(root, "workers", train=train), range(8), epoch=1)
    assert d["jpeg_len"][[1, 2, 3]].tolist() == [0, 0, 0] and d["jpeg_len"][[0, 4, 5, 6, 7]].min() > 0
    assert d["image"].shape[0] == 3 and [e.key for e in d["errors"]] == [mixed["cut"]]
    assert [e.key for e in w["errors"]] == [mixed["cut"], mixed["garbled"]]
    pre = Preprocess(image_size=64)
    got, want = batch_images(d, "cpu", pre=pre), batch_images(w, "cpu", pre=pre)
    err = d["errors"][1]
    assert isinstance(err, SampleError) and (err.shard, err.key) == ("train-000000.tar", mixed["garbled"])
    assert err.startswith(f"{mixed['garbled']} in train-000000.tar: undecodable on cpu, then on the CPU: ")
    assert torch.equal(got, want)
    for k in ("valid", "labels/labels", "mask/labels", *(("colour", "erase") if train else ())):
        assert torch.equal(d[k], w[k]), k
    assert d["valid"].tolist() == [True, True, True, False, True, False, True, True]


def test_config_that_cannot_be_honoured_stops(small_shards):
    m = load_manifest(small_shards)
    with pytest.raises(AttrdistError, match="data.decode=device with the pixel stage in the workers"):
        SampleDataset(ShardReader(m, "train"), len(m.attributes), ["labels"], DataConfig(decode="device"), seed=0,
                      train=True, pixels_in_workers=True)
    from attrdist.core.config import Config, validate
    cfg = Config()
    with pytest.raises(AttrdistError, match="data.pixel_stage=auto or device"):
        validate(replace(cfg, data=replace(cfg.data, decode="device", pixel_stage="workers")))


def test_a_training_run_decodes_on_the_device(mixed, tmp_path):
    """recipes/coconut.py, demo profile, data.decode=device on a CPU: one epoch over the mixed shards with a
    DataLoader worker trains, evaluates and reports; the cut JPEG (in the worker) and the garbled one (on the
    device) are the samples skipped, named and counted for their shard."""
    run_dir = tmp_path / "run"
    p = run_recipe(["--profile", "demo", f"data.shards={mixed['root']}", f"run.run_dir={run_dir}", *FAST,
                    "run.epochs=1", "data.num_workers=1", "data.decode=device", "run.device=cpu"])
    log = (run_dir / "train.log").read_text()
    assert "data.decode=device" in log and "decoded and cropped/flipped on cpu" in log
    assert f"train: skipped undecodable sample {mixed['cut']} in train-000000.tar: OSError" in log
    assert f"train: skipped undecodable sample {mixed['garbled']} in train-000000.tar: undecodable on cpu" in log
    report = json.loads((run_dir / "report.json").read_text())
    assert report["corrupt_samples"]["training"] == {"train-000000.tar": 2}
    assert report["corrupt_samples"]["val"] == {} and report["results"]["val"]["val/corrupt"] == 0
    steps = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in steps if r.get("type") == "train"] == list(range(1, 7))
    assert all(r["loss"] == r["loss"] for r in steps if r.get("type") == "train")  # finite (not NaN)
    assert "Traceback" not in p.stderr


# ------------------------------------------------------------------------------------------------
# On a CUDA GPU only (issue 21's GPU run): nvJPEG through torchvision, the crops on the device
# ------------------------------------------------------------------------------------------------

needs_cuda = pytest.mark.cuda  # skipped without a GPU by tests/conftest.py, run by `make gpu-check`


@needs_cuda
def test_nvjpeg_batches_match_the_cpu_device_path(mixed):
    """The mixed batch decoded by nvJPEG (one batched call; the garbled JPEG makes it fail, then one by one) and
    cropped on the GPU: the same samples named and left out as on a CPU device, and every image within 3 grey
    levels on average of the CPU device path's (nvJPEG's IDCT and chroma upsampling are not libjpeg-turbo's,
    and CUDA resamples uint8 through float where the CPU has native uint8 kernels). Then through
    batch_images from pinned memory, as the loader hands a batch over."""
    from torch.utils.data._utils.pin_memory import pin_memory

    dev = torch.device("cuda", torch.cuda.current_device())
    pre = Preprocess(image_size=64)
    for train in (True, False):
        ds = dataset(mixed["root"], "device", train=train)
        on_gpu, on_cpu = batch_of(ds, range(8), epoch=1), batch_of(ds, range(8), epoch=1)
        g, c = decoded_batch(on_gpu, dev, pre), decoded_batch(on_cpu, torch.device("cpu"), pre)
        assert g.device == dev and g.dtype == torch.uint8 and g.shape == c.shape
        assert [e.key for e in on_gpu["errors"]] == [e.key for e in on_cpu["errors"]] == [mixed["cut"], mixed["garbled"]]
        assert torch.equal(on_gpu["valid"], on_cpu["valid"])
        diff = (g.cpu().float() - c.float()).abs().mean(dim=(1, 2, 3))
        assert diff.max() <= 3.0, diff
        x = batch_images(pin_memory(batch_of(ds, range(8), epoch=1)), dev, pre=pre)
        assert x.device == dev and x.dtype == torch.float32 and torch.isfinite(x).all()


@needs_cuda
def test_the_device_decode_never_writes_into_memory_queued_kernels_still_read(small_shards):
    """torchvision's CUDA decoder allocates its outputs on the current stream and writes them from its own
    stream without waiting (vision PR #9606). 20 rounds: tensors of the outputs' size filled with known bytes,
    a long kernel queued, one sum per tensor queued behind it, the tensors freed, the batch decoded
    (`_decode_on`: under a side stream): every sum must still be exact."""
    from attrdist.data.device_decode import _decode_on

    dev = torch.device("cuda", torch.cuda.current_device())
    reader = ShardReader(load_manifest(small_shards), "train")
    jpegs = [reader[i]["jpg"] for i in range(16)]
    views = [torch.frombuffer(bytearray(j), dtype=torch.uint8) for j in jpegs]
    n = decode_image(jpegs[0]).numel()  # the demo's JPEGs are all 80 x 80
    for _ in range(20):
        xs = [torch.full((n,), k + 1, dtype=torch.uint8, device=dev) for k in range(len(views))]
        torch.cuda.synchronize()
        torch.cuda._sleep(50_000_000)  # tens of ms of a queued kernel
        sums = [x.sum(dtype=torch.int64) for x in xs]
        del xs
        imgs = _decode_on(views, dev)
        torch.cuda.synchronize()
        assert [s.item() for s in sums] == [n * (k + 1) for k in range(len(views))]
        assert all(img.shape == (3, 80, 80) for img in imgs)


@needs_cuda
def test_a_training_run_decodes_with_nvjpeg(mixed, tmp_path):
    """The recipe on the GPU with data.decode=device: the input line names nvJPEG, training and evaluation
    run, the two bad JPEGs are counted."""
    run_dir = tmp_path / "run"
    run_recipe(["--profile", "demo", f"data.shards={mixed['root']}", f"run.run_dir={run_dir}", *FAST,
                "run.epochs=1", "data.num_workers=2", "data.decode=device", "run.device=cuda"])
    log = (run_dir / "train.log").read_text()
    assert "decoded and cropped/flipped on cuda" in log and "nvJPEG" in log
    report = json.loads((run_dir / "report.json").read_text())
    assert report["corrupt_samples"]["training"] == {"train-000000.tar": 2}
