"""Issue 8, the data side: faults injected for real (a full disk under the packer, shards cut short,
flipped bytes, samples missing a field, decompression bombs, hostile tar members, annotation files
that point outside their dataset, hostile pickles, enormous JSON) against the real packers, shard
reader and training loop. Every message must name the file (and the shard / sample) and say what to do.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import struct
import subprocess
import sys
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from attrdist.core.config import DataConfig
from attrdist.data.samples import CorruptTally, SampleDataset, SampleError
from attrdist.errors import AttrdistError
from attrdist.pack.writer import PackWriter
from attrdist.data.reader import ShardError, ShardReader, load_manifest
from attrdist.atomic import sha256_file
from tests.conftest import DEMO_VOCAB, FAST, ROOT, run_env, run_recipe

pytestmark = pytest.mark.reliability


# ------------------------------------------------------------------------------------------------
# Helpers: real shard surgery
# ------------------------------------------------------------------------------------------------


def members(shard: Path) -> list[tuple[tarfile.TarInfo, bytes]]:
    with tarfile.open(shard) as t:
        return [(m, t.extractfile(m).read()) for m in t.getmembers()]


def rewrite(shard: Path, items: list[tuple[str, bytes]], manifest_root: Path | None = None) -> None:
    """Write `items` [(member name, bytes)] as the shard (and, with `manifest_root`, record its new size and
    sha256 in the manifest: a pack that really holds these samples)."""
    with tarfile.open(shard, "w") as t:
        for name, data in items:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    if manifest_root is not None:
        path = manifest_root / "manifest.json"
        m = json.loads(path.read_text())
        for info in m["splits"].values():
            for s in info["shards"]:
                if s["file"] == shard.name:
                    s["bytes"], s["sha256"] = shard.stat().st_size, sha256_file(shard)
        path.write_text(json.dumps(m))


def flip_jpeg_bytes(shard: Path, sample: int, at: int = 700, n: int = 16) -> str:
    """Invert `n` bytes inside the JPEG of the `sample`-th sample of a shard, in place (size unchanged, like
    bit rot on disk); returns the sample key. At byte 700 of these JPEGs the entropy-coded data decodes
    to wrong pixels WITHOUT an error: only the crc32 stored at packing can tell."""
    jpgs = [(m, d) for m, d in members(shard) if m.name.endswith(".jpg")]
    m, data = jpgs[sample]
    with open(shard, "r+b") as f:
        f.seek(m.offset_data + at)
        f.write(bytes(b ^ 0xFF for b in data[at:at + n]))
    return m.name.split(".")[0]


def bomb_png(side: int = 30000) -> bytes:
    """A real PNG header declaring side x side RGB pixels (2.7 GB decoded) with a tiny zlib stream of
    zeros: PIL sees the size at open, before any decoding."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(bytes(side * 3 + 1) * 4)) \
        + chunk(b"IEND", b"")


def bomb_jpeg(real_jpeg: bytes, side: int = 30000) -> bytes:
    """A real JPEG whose SOF0 frame header is patched to declare side x side pixels."""
    i = 2
    while real_jpeg[i + 1] != 0xC0:
        i += 2 + int.from_bytes(real_jpeg[i + 2:i + 4], "big")
    return real_jpeg[:i + 5] + struct.pack(">HH", side, side) + real_jpeg[i + 9:]


def with_crc(meta: bytes, **data: bytes) -> bytes:
    """The json of a sample with its crc32 updated for replaced members (as the packer would have written)."""
    m = json.loads(meta)
    m["crc32"] = {**m.get("crc32", {}), **{k: zlib.crc32(v) for k, v in data.items()}}
    return json.dumps(m).encode()


# The damage done to the copy of small_shards (train: 40 + 40 + 16 samples; val 32; test 32).
CUT_SAMPLE = 25  # train-000001.tar is cut inside the json of its sample 25: samples 25..39 are lost
TRAIN_BAD = {"train-000000.tar": 2, "train-000001.tar": 15, "train-000002.tar": 5}
VAL_BAD = {"val-000000.tar": 1}


@pytest.fixture(scope="module")
def damaged(small_shards, tmp_path_factory) -> dict:
    """A copy of small_shards with every kind of corrupt sample; returns what was done to it."""
    root = tmp_path_factory.mktemp("damaged") / "shards"
    shutil.copytree(small_shards, root)
    done = {"root": root, "flipped": [flip_jpeg_bytes(root / "train-000000.tar", k) for k in (3, 30)]}
    done["val_flipped"] = flip_jpeg_bytes(root / "val-000000.tar", 1)
    # cut short inside the json member of sample 25 (after its jpg): a real truncated copy
    shard = root / "train-000001.tar"
    json_25 = [m for m, _ in members(shard) if m.name.endswith(".json")][CUT_SAMPLE]
    with open(shard, "r+b") as f:
        f.truncate(json_25.offset_data + 10)
    done["cut_key"] = json_25.name.split(".")[0]
    # train-000002.tar: a sample without json, one without image, decompression bombs (PNG, JPEG: packed with
    # their crc32, as if the source images were bombs), labels out of range
    shard = root / "train-000002.tar"
    items, keys, bombs = [], [], {}
    for m, data in members(shard):
        key, ext = m.name.split(".", 1)
        if key not in keys:
            keys.append(key)
        k = keys.index(key)
        if (k, ext) in ((2, "json"), (4, "jpg")):
            continue
        if k in (6, 10) and ext == "jpg":
            bombs[k] = ("png", bomb_png()) if k == 6 else ("jpg", bomb_jpeg(data))
            items.append((f"{key}.{bombs[k][0]}", bombs[k][1]))
            continue
        if k in bombs:
            data = with_crc(data, **dict([bombs[k]]))
        if k == 8 and ext == "json":
            data = json.dumps({**json.loads(data), "labels": [9999]}).encode()
        items.append((m.name, data))
    rewrite(shard, items, manifest_root=root)
    done.update(no_json=keys[2], no_jpg=keys[4], bomb_png=keys[6], bad_labels=keys[8], bomb_jpeg=keys[10])
    return done


def dataset(root: Path, split: str, train: bool = False) -> SampleDataset:
    m = load_manifest(root)
    return SampleDataset(ShardReader(m, split), len(m.attributes), ["labels"], DataConfig(image_size=32), seed=0,
                         train=train)


# ------------------------------------------------------------------------------------------------
# 6. Corrupt shards: the reader and the dataset, sample by sample
# ------------------------------------------------------------------------------------------------


def test_every_corrupt_sample_is_skipped_named_and_counted_per_shard(damaged, caplog):
    root = damaged["root"]
    with caplog.at_level("WARNING", logger="attrdist"):
        ds = dataset(root, "train")
    # the truncated shard is reported once, up front, by name, with what is lost and what to do
    (line,) = [r.getMessage() for r in caplog.records if "train-000001.tar" in r.getMessage()]
    assert line.startswith(str(root / "train-000001.tar")) and "holds 26 of its 40 samples" in line
    assert "member '" + damaged["cut_key"] + ".json' is cut short" in line  # 25 kept its jpg only
    assert "14 of its 40 samples cannot be read" in line and "restore the shard or re-pack" in line
    assert ds.reader.unreadable == 14
    tally = CorruptTally("test")
    errors = {}
    for i in range(len(ds)):
        s = ds[(i, 0)]
        assert s["image"].shape == (3, 32, 32)  # shapes never change
        if s["corrupt"]:
            assert not s["valid"] and isinstance(s["error"], SampleError)
            errors[s["error"].key] = s["error"]
            tally.add([s["error"]], log_them=False)
    assert tally.counts == TRAIN_BAD
    for key in damaged["flipped"]:
        assert errors[key] == (f"{key} in train-000000.tar: ChecksumError: its jpg bytes fail the crc32 stored when "
                               f"it was packed (flipped bits or an edit after packing); restore the shard or re-pack "
                               f"the dataset")
    assert "has no json member" in errors[damaged["cut_key"]] and errors[damaged["cut_key"]].shard == "train-000001.tar"
    assert "#39 in train-000001.tar: cannot be read: the shard holds 26 of its 40 samples" in errors["#39"]
    assert "restore it or re-pack the dataset" in errors["#39"]
    assert "has no json member" in errors[damaged["no_json"]]
    assert "has no image member (jpg/jpeg/png/webp; it has: json)" in errors[damaged["no_jpg"]]
    for bomb in ("bomb_png", "bomb_jpeg"):  # refused from the header, before a pixel is decoded
        assert "DecompressionBombError: Image size (900000000 pixels) exceeds limit" in errors[damaged[bomb]]
    assert "IndexError" in errors[damaged["bad_labels"]]
    # the reader itself: ShardError, a one-line AttrdistError naming the shard and the sample
    with pytest.raises(ShardError, match=r"train-000001\.tar: sample #30: cannot be read: the shard holds 26 of its "
                                         r"40 samples .*restore it or re-pack the dataset$"):
        ds.reader[40 + 30]


def test_truncation_anywhere_costs_only_the_samples_it_cuts(small_shards, tmp_path):
    """Cut a real shard at 60 points (in headers, in JPEG data, in json, on member boundaries): the reader
    never fails, and gives back exactly the samples whose members all lie before the cut."""
    src = small_shards / "train-000002.tar"
    shard_members = members(src)
    full = src.read_bytes()
    root = tmp_path / "cut"
    shutil.copytree(small_shards, root)
    m = load_manifest(root)
    cuts = sorted(set(np.linspace(0, len(full), 50).astype(int).tolist()
                      + [mm.offset for mm, _ in shard_members[:6]] + [mm.offset_data + 3 for mm, _ in shard_members[:4]]))
    for cut in cuts:
        (root / "train-000002.tar").write_bytes(full[:cut])
        reader = ShardReader(m, "train")
        complete: dict[str, set] = {}
        for mm, _ in shard_members:
            if mm.offset_data + mm.size <= cut:
                complete.setdefault(mm.name.split(".")[0], set()).add(mm.name.split(".", 1)[1])
        whole = [k for k, exts in complete.items() if exts == {"jpg", "json"}]
        got = []
        for i in range(80, 96):
            try:
                s = reader[i]
            except ShardError as e:
                assert str(e).startswith(str(root / "train-000002.tar")) and "re-pack" in str(e)
                continue
            if {"jpg", "json"} <= set(s):
                got.append(s["__key__"])
                assert s["jpg"] == dict(((mm.name, d) for mm, d in shard_members))[f"{s['__key__']}.jpg"]
        assert got == whole, cut


def hostile_shard(path: Path, how: str) -> None:
    """A tar shard a hostile or broken tool wrote: member names or types that escape an unpacking dir."""
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as t:
        def add(name, data=b"x", **kw):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            for k, v in kw.items():
                setattr(info, k, v)
            t.addfile(info, io.BytesIO(data) if info.isreg() else None)
        add("000000000001.json", b"{}")
        if how == "dotdot":
            add("../../escaped/000000000001.jpg")
        elif how == "absolute":
            add("/tmp/escaped/000000000001.jpg")
        elif how == "symlink":
            add("000000000001.jpg", type=tarfile.SYMTYPE, linkname="/etc/passwd", size=0)
        elif how == "pax":  # an innocent ustar name, the real (PAX) name points outside
            add("000000000001.jpg", pax_headers={"path": "../../../escaped.jpg"})


@pytest.mark.parametrize("how", ["dotdot", "absolute", "symlink", "pax"])
def test_hostile_tar_members_refuse_the_shard(small_shards, tmp_path, how, caplog):
    root = tmp_path / "shards"
    shutil.copytree(small_shards, root)
    m = json.loads((root / "manifest.json").read_text())
    hostile_shard(root / "test-000000.tar", how)
    m["splits"]["test"] = {**m["splits"]["test"], "nsamples": 1,
                           "shards": [{**m["splits"]["test"]["shards"][0], "nsamples": 1}]}
    m["splits"]["test"]["label_counts"] = {f: [0] * len(m["attributes"]) for f in m["label_fields"]}
    (root / "manifest.json").write_text(json.dumps(m))
    before = sorted(p for p in tmp_path.rglob("*"))
    with caplog.at_level("WARNING", logger="attrdist"):
        reader = ShardReader(load_manifest(root), "test")
    (line,) = [r.getMessage() for r in caplog.records]
    assert line.startswith(str(root / "test-000000.tar")) and "restore the shard or re-pack" in line
    assert "refusing the whole shard" in line and ("not a regular file" in line) == (how == "symlink")
    with pytest.raises(ShardError, match=r"test-000000\.tar: sample #0: cannot be read: the shard .*re-pack"):
        reader[0]
    assert sorted(p for p in tmp_path.rglob("*")) == before and not Path("/tmp/escaped").exists()


def test_pack_writer_never_writes_a_member_name_that_escapes(tmp_path):
    """Keys with '/', '..', '.', a backslash or control characters: refused before a byte is written."""
    kw = dict(dataset="t", attributes=["a"], label_fields=["labels"])
    for key in ("../../etc/passwd", "/abs", "a/b", "a.b", "..", "a\\b", "a\x00b", "a\nb", ""):
        with pytest.raises(AttrdistError, match=r"out: sample key .* is not a plain name .*fix the ids in the input"):
            with PackWriter(tmp_path / "out", **kw) as w:
                w.add("train", key, {"jpg": b"x", "json": {"labels": []}})
        assert not (tmp_path / "out").exists()
    with pytest.raises(AttrdistError, match="not a plain name"):
        with PackWriter(tmp_path / "out", **kw) as w:
            w.add("train", "k", {"../jpg": b"x", "json": {"labels": []}})


# ------------------------------------------------------------------------------------------------
# 6. Corrupt shards: real training runs (2 DataLoader workers; 2 ranks x 2 workers)
# ------------------------------------------------------------------------------------------------


def train_args(root: Path, run_dir: Path, *extra: str) -> list[str]:
    return ["--profile", "demo", f"data.shards={root}", f"run.run_dir={run_dir}", *FAST, "data.num_workers=2", *extra]


def check_corrupt_report(run_dir: Path, epochs: int) -> None:
    report = json.loads((run_dir / "report.json").read_text())
    assert report["corrupt_samples"]["training"] == {k: v * epochs for k, v in TRAIN_BAD.items()}
    assert report["corrupt_samples"]["val"] == VAL_BAD and report["corrupt_samples"]["test"] == {}
    assert report["results"]["val"]["val/corrupt"] == 1 and report["results"]["test"]["test/corrupt"] == 0
    md = (run_dir / "report.md").read_text()
    assert f"failed to decode and were skipped: train {sum(TRAIN_BAD.values()) * epochs}, val 1, test 0" in md
    assert "## Samples skipped as corrupt, per shard" in md
    for shard, n in TRAIN_BAD.items():
        assert f"| training (all epochs) | `{shard}` | {n * epochs} |" in md
    assert "| val evaluation (latest) | `val-000000.tar` | 1 |" in md


def test_training_skips_counts_per_shard_reports_and_stops_past_the_limit(damaged, tmp_path):
    root = damaged["root"]
    # (1) a limit above what the shards hold: the run completes; every skip is in the log and the report
    run_dir = tmp_path / "tolerant"
    p = run_recipe(train_args(root, run_dir, "data.max_corrupt=1000"))
    log = (run_dir / "train.log").read_text()
    assert f"{root / 'train-000001.tar'}: holds 26 of its 40 samples" in log  # up front, once per reader
    for key in damaged["flipped"]:
        assert f"train: skipped undecodable sample {key} in train-000000.tar: ChecksumError" in log
    assert f"eval val: skipped undecodable sample {damaged['val_flipped']} in val-000000.tar: ChecksumError" in log
    # one warning per sample up to 20, then one line: later skips are counted, not logged one by one
    assert log.count("train: skipped undecodable sample") == 20
    assert log.count("train: more undecodable samples: from now on only counted per shard") == 1
    check_corrupt_report(run_dir, epochs=2)
    assert "Traceback" not in p.stderr
    # (2) the default limit: the first step that passes it saves a checkpoint and stops, naming the shards
    stop_dir = tmp_path / "strict"
    p = run_recipe(train_args(root, stop_dir, "data.max_corrupt=5"), check=False)
    assert p.returncode == 2, p.stdout[-3000:] + p.stderr[-3000:]
    (err,) = p.stderr.strip().splitlines()
    assert err.startswith(f"attrdist: error: {root}: ") and "more than data.max_corrupt=5; per shard: train-0000" in err
    assert "restore or re-pack those shards, or raise data.max_corrupt to skip them, then continue with --resume" in err
    step = int(err.rsplit("checkpoint saved at step ", 1)[1].rstrip(")"))
    assert (stop_dir / "checkpoints" / f"step-{step:08d}").is_dir()
    # (3) resume once the limit allows the rest: no step is redone, counts carry over the resume
    p = run_recipe(train_args(root, stop_dir, "data.max_corrupt=1000") + ["--resume"])
    assert f"checkpoints/step-{step:08d}: epoch 0, batch {step} of the epoch, step {step}" in p.stdout
    check_corrupt_report(stop_dir, epochs=2)


@pytest.mark.distributed
@pytest.mark.slow  # ~25 s; the 1-rank, 2-worker run above stays in `make test`
def test_two_ranks_count_every_skipped_sample_once_per_shard(damaged, tmp_path):
    """2 ranks x 2 DataLoader workers: the per-shard counts are the whole split's (gathered from every rank
    and worker), the same as one process; past the limit every rank stops at the same step (no hang)."""
    from tests.test_distributed import launch

    run_dir = tmp_path / "ddp"
    launch(2, train_args(damaged["root"], run_dir, "data.max_corrupt=1000"), timeout=150)
    assert "distributed run verified: 2 ranks" in (run_dir / "train.log").read_text()
    check_corrupt_report(run_dir, epochs=2)
    p = launch(2, train_args(damaged["root"], tmp_path / "ddp-strict", "data.max_corrupt=5"), timeout=150, check=False)
    assert p.returncode != 0 and "more than data.max_corrupt=5; per shard: train-0000" in p.stderr


# ------------------------------------------------------------------------------------------------
# 3b. A full disk while packing
# ------------------------------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path):
    """A 3 MiB tmpfs (root only): a real disk that fills up."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    mnt = tmp_path / "disk"
    mnt.mkdir()
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if p.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {p.stderr.strip()}")
    try:
        yield mnt
    finally:
        if subprocess.run(["umount", str(mnt)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def shards_intact(out: Path) -> dict:
    """Check a published pack completely (every shard's sha256 and samples); return its manifest data."""
    m = load_manifest(out)
    for split, info in m.data["splits"].items():
        for s in info["shards"]:
            assert sha256_file(out / s["file"]) == s["sha256"] and (out / s["file"]).stat().st_size == s["bytes"]
        reader = ShardReader(m, split)
        assert reader.unreadable == 0 and all(json.loads(reader[i]["json"])["index"] == i for i in range(len(reader)))
    return m.data


def test_disk_full_while_packing_keeps_the_previous_pack_and_resumes(small_demo, small_disk, caplog):
    from attrdist.pack.coco import SplitSource, pack_coco_captions
    from attrdist.pack.vocab import load_vocabulary

    vocab, ann = load_vocabulary(DEMO_VOCAB), small_demo / "annotations"
    splits = [SplitSource(s, small_demo / "images", ann / f"captions_{s}.json") for s in ("train", "val", "test")]
    out = small_disk / "pack"
    pack = dict(vocab_path=DEMO_VOCAB, max_samples=10, progress=False, workers=1)
    first = pack_coco_captions(out, splits[:1], vocab, limit=12, **pack)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    # leave room for about half of the next pack (160 images): it fails half-way through
    free = os.statvfs(small_disk).f_bavail * os.statvfs(small_disk).f_frsize
    (small_disk / "filler").write_bytes(bytes(max(0, free - 600_000)))
    with pytest.raises(AttrdistError) as e:
        pack_coco_captions(out, splits, vocab, overwrite=True, **pack)
    msg = str(e.value)
    staging = small_disk / ".pack.staging"
    assert "\n" not in msg and msg.startswith(str(staging)) and "no space left on device while packing " + str(out) in msg
    assert "free space on that disk or pack to another --out, then run the same command again: the pack resumes" in msg
    # the previous pack: untouched and complete
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert shards_intact(out)["created"] == first["created"]
    # nothing half-written under a shard name: every *.tar in the staging dir is a finished shard
    progress = json.loads((staging / "progress.json").read_text())
    finished = {s["file"] for info in progress["splits"].values() for s in info["shards"]}
    assert finished and {p.name for p in staging.glob("*.tar")} == finished
    assert all(sha256_file(staging / s["file"]) == s["sha256"] for i in progress["splits"].values() for s in i["shards"])
    kept = {n: (staging / n).stat().st_mtime_ns for n in finished}
    # space freed: the same command resumes (finished shards kept as they are) and publishes the pack
    (small_disk / "filler").unlink()
    with caplog.at_level("INFO", logger="attrdist"):
        m = pack_coco_captions(out, splits, vocab, overwrite=True, **pack)
    assert any("resuming an interrupted pack" in r.getMessage() for r in caplog.records)
    assert {n: (out / n).stat().st_mtime_ns for n in kept} == kept
    assert {s: m["splits"][s]["nsamples"] for s in m["splits"]} == {"train": 96, "val": 32, "test": 32}
    shards_intact(out)
    assert not staging.exists()


# ------------------------------------------------------------------------------------------------
# 7. Hostile files: annotation entries that point outside the dataset, pickles that run code,
#    enormous JSON
# ------------------------------------------------------------------------------------------------


def real_jpeg(seed: int = 0, side: int = 48) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (side, side, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


OUTSIDE = ["../../outside.jpg", "/ABS/outside.jpg"]  # /ABS is replaced by the test's real absolute path


@pytest.fixture
def outside(tmp_path) -> Path:
    """A real image OUTSIDE the dataset that a hostile entry points at: without the check it would be packed."""
    (tmp_path / "outside.jpg").write_bytes(real_jpeg(7))
    return tmp_path


def hostile_names(outside: Path) -> list[str]:
    return [n.replace("/ABS", str(outside)) if n.startswith("/ABS") else n for n in OUTSIDE]


def test_coco_packers_refuse_file_names_outside_the_images(small_demo, outside, tmp_path):
    from attrdist.pack.coco import AnnSource, SplitSource, pack_coco_captions, pack_coco_images, pack_coco_objects
    from attrdist.pack.vocab import load_vocabulary

    data = tmp_path / "data"
    shutil.copytree(small_demo, data)
    images = data / "images" / "train"  # file names "../../outside.jpg" climb from here to tmp_path
    for mode in ("captions", "images", "objects"):
        for name in hostile_names(outside):
            ann = data / "annotations" / f"{mode}-hostile.json"
            src = "captions_train.json" if mode == "captions" else "instances_train.json"
            d = json.loads((data / "annotations" / src).read_text())
            for im in d["images"]:
                im["file_name"] = im["file_name"].removeprefix("train/")
            d["images"][3]["file_name"] = name
            ann.write_text(json.dumps(d))
            out = tmp_path / "out"
            with pytest.raises(AttrdistError) as e:
                if mode == "captions":
                    pack_coco_captions(out, [SplitSource("train", images, ann)], load_vocabulary(DEMO_VOCAB),
                                       progress=False, workers=1)
                elif mode == "images":
                    pack_coco_images(out, [AnnSource("train", images, ann)], progress=False, workers=1)
                else:
                    pack_coco_objects(out, [AnnSource("train", images, ann)], progress=False, workers=1)
            assert str(e.value) == (f"{ann}: image file name {name!r} is absolute or contains '..'; refusing to read "
                                    f"outside {images}: fix that entry (file names are relative to the image directory)")
            assert not out.exists()


def test_cocottributes_refuses_file_names_outside_the_images(outside, tmp_path):
    from attrdist.pack.cocottributes import pack_cocottributes

    images = tmp_path / "coco" / "images"
    images.mkdir(parents=True)
    (images / "000000000001.jpg").write_bytes(real_jpeg(1))
    for name in hostile_names(outside):
        inst = tmp_path / "instances.json"
        inst.write_text(json.dumps({
            "images": [{"id": 1, "file_name": "000000000001.jpg", "width": 48, "height": 48},
                       {"id": 2, "file_name": name, "width": 48, "height": 48}],
            "annotations": [{"id": 10, "image_id": 1, "category_id": 1, "bbox": [2, 2, 40, 40], "iscrowd": 0},
                            {"id": 11, "image_id": 2, "category_id": 1, "bbox": [2, 2, 40, 40], "iscrowd": 0}],
            "categories": [{"id": 1, "name": "thing"}]}))
        pkl = tmp_path / "cocottributes_eccv_version.pkl"
        pkl.write_bytes(pickle.dumps({"ann_vecs": {1: np.ones(2), 2: np.ones(2)}, "patch_id_to_ann_id": {1: 10, 2: 11},
                                      "split": {1: "train2014", 2: "train2014"},
                                      "attributes": [{"id": 0, "name": "a"}, {"id": 1, "name": "b"}]}))
        with pytest.raises(AttrdistError, match=rf"^{inst}: image file name {name!r} is absolute or contains '\.\.'; "
                                                rf"refusing to read outside {images}: fix that entry"):
            pack_cocottributes(tmp_path / "out", pkl, [inst], [images], progress=False, workers=1, min_size=1)
        assert not (tmp_path / "out").exists()


def dior_tree(root: Path, filename: str = "00001.jpg", ids: str = "00001\n") -> Path:
    (root / "JPEGImages-trainval").mkdir(parents=True, exist_ok=True)
    (root / "JPEGImages-trainval" / "00001.jpg").write_bytes(real_jpeg(3))
    xml = root / "Annotations" / "Horizontal Bounding Boxes" / "00001.xml"
    xml.parent.mkdir(parents=True, exist_ok=True)
    xml.write_text(f"<annotation><filename>{filename}</filename><size><width>48</width><height>48</height></size>"
                   f"<object><name>airplane</name><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>30</xmax><ymax>30</ymax>"
                   f"</bndbox></object></annotation>")
    (root / "ImageSets" / "Main").mkdir(parents=True, exist_ok=True)
    (root / "ImageSets" / "Main" / "train.txt").write_text(ids)
    return xml


def test_dior_refuses_file_names_and_ids_outside_the_root(outside, tmp_path):
    from attrdist.pack.dior import pack_dior

    root = tmp_path / "DIOR"
    for name in hostile_names(outside):
        xml = dior_tree(root, filename=name)
        with pytest.raises(AttrdistError, match=rf"^{xml}: file name {name!r} is empty, absolute or contains '\.\.'; "
                                                rf"refusing to read outside the dataset root; fix the entry$"):
            pack_dior(root, tmp_path / "out", progress=False, workers=1)
        assert not (tmp_path / "out").exists()
    dior_tree(root, ids="00001\n../../outside\n")
    split = root / "ImageSets" / "Main" / "train.txt"
    with pytest.raises(AttrdistError, match=rf"^{split}: file name '\.\./\.\./outside' is empty, absolute or contains"):
        pack_dior(root, tmp_path / "out", progress=False, workers=1)
    dior_tree(root)  # the same tree with sane entries packs
    assert pack_dior(root, tmp_path / "out", progress=False, workers=1)["splits"]["train"]["nsamples"] == 1


def test_imagefolder_refuses_group_csv_paths_outside_the_root(outside, tmp_path):
    from attrdist.pack.imagefolder import pack_imagefolder

    root = tmp_path / "folder"
    for cls in ("cat", "dog"):
        (root / cls).mkdir(parents=True)
        for k in range(3):
            (root / cls / f"{cls}_{k}.jpg").write_bytes(real_jpeg(10 * (cls == "dog") + k))
    for name in ("../outside.jpg", str(outside / "outside.jpg")):
        csv = tmp_path / "groups.csv"
        csv.write_text("path,group\n" + "".join(f"{c}/{c}_{k}.jpg,g{k}\n" for c in ("cat", "dog") for k in range(3))
                       + f"{name},g9\n")
        with pytest.raises(AttrdistError, match=rf"^{csv}:8: path {name!r} is absolute or contains '\.\.'; paths must "
                                                rf"be relative to --root"):
            pack_imagefolder(root, tmp_path / "out", group_by="csv", groups_csv=csv, progress=False, workers=1)
        assert not (tmp_path / "out").exists()


class _Reduce:
    """Pickles as REDUCE(callable, args): whatever the callable is, unpickling calls it."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


class NotNumpy:
    """A plain class of this module: no code runs, but it is not an allowed class either."""


def test_hostile_pickles_are_refused_before_anything_runs(tmp_path):
    """Beyond tests/test_pack_cocottributes.py (os.system, eval, Popen): a numpy function that is a
    code-execution gadget (numpy.load with allow_pickle of a second, evil pickle), classes that are not
    numpy's, the protocol-0 INST opcode, and getattr. Plain pickle.loads really runs the first payload."""
    from attrdist.pack.cocottributes import load_pickle

    marker = tmp_path / "pwned"
    evil_npy = tmp_path / "evil.npy"
    np.save(evil_npy, np.array([_Reduce(os.system, f"touch {marker}")], dtype=object), allow_pickle=True)
    gadget = pickle.dumps({"ann_vecs": _Reduce(np.load, str(evil_npy), None, True)})
    probe = subprocess.run([sys.executable, "-c", "import pickle, sys; pickle.loads(sys.stdin.buffer.read())"],
                           input=gadget, capture_output=True, cwd=ROOT, env=run_env(), timeout=60)
    assert marker.exists(), probe.stderr[-2000:]  # the payload is live: plain unpickling runs it
    marker.unlink()
    payloads = {
        "numpy.load": gadget,
        "collections.Counter": pickle.dumps({"attributes": __import__("collections").Counter(a=1)}),
        f"{__name__}.NotNumpy": pickle.dumps({"x": NotNumpy()}),
        "os.system": f"(S'touch {marker}'\nios\nsystem\n.".encode(),  # INST: protocol 0's class call
        "builtins.getattr": pickle.dumps(_Reduce(getattr, "text", "upper")),
    }
    path = tmp_path / "cocottributes_eccv_version.pkl"
    for name, data in payloads.items():
        path.write_bytes(data)
        with pytest.raises(AttrdistError) as e:
            load_pickle(path)
        assert str(e.value).startswith(f"{path}: pickle refers to {name}, which is not allowed (only builtin "
                                       f"containers and numpy arrays); refusing to load it")
        assert not marker.exists()


def test_enormous_annotation_json_is_refused_with_its_size(small_demo, tmp_path, monkeypatch):
    from attrdist.pack.coco import JSON_MEMORY_FACTOR, _available_memory, read_coco_json

    caps = small_demo / "annotations" / "captions_train.json"
    size = caps.stat().st_size
    monkeypatch.setenv("ATTRDIST_MAX_JSON_BYTES", str(size - 1))  # the configurable limit
    with pytest.raises(AttrdistError, match=rf"^{caps}: {size / 1e6:.1f} MB of JSON, more than "
                                            rf"ATTRDIST_MAX_JSON_BYTES={size - 1} allows; raise it to parse this file$"):
        read_coco_json(caps)
    monkeypatch.setenv("ATTRDIST_MAX_JSON_BYTES", str(size))
    assert read_coco_json(caps)["images"]
    monkeypatch.delenv("ATTRDIST_MAX_JSON_BYTES")
    # the default: what the available memory can parse. A (sparse) file far beyond it is refused unread
    avail = _available_memory()
    if avail is None:
        pytest.skip("no /proc/meminfo: the memory check is off here")
    huge = tmp_path / "instances_huge.json"
    with open(huge, "wb") as f:
        f.truncate(avail)  # needs JSON_MEMORY_FACTOR x more to parse
    with pytest.raises(AttrdistError, match=rf"^{huge}: {avail / 1e9:.2f} GB of JSON needs about "
                                            rf"{avail * JSON_MEMORY_FACTOR / 1e9:.1f} GB of memory to parse, and .* GB is "
                                            rf"available; free memory or use a machine with more \(or set "
                                            rf"ATTRDIST_MAX_JSON_BYTES={avail} to try anyway\)$"):
        read_coco_json(huge)


def test_running_out_of_memory_while_parsing_is_one_line(tmp_path):
    """A real MemoryError: the packer's JSON reader in a process whose address space is capped 150 MB above
    what it uses, on 40 MB of JSON (~250 MB parsed)."""
    big = tmp_path / "captions_big.json"
    with open(big, "w") as f:
        f.write('{"images": [], "annotations": [], "pad": [' + "1.5," * 10_000_000 + '1]}')
    code = ("import resource, sys\n"
            "from attrdist.pack.coco import read_coco_json\n"
            "from attrdist.errors import user_errors\n"
            "used = int(open('/proc/self/statm').read().split()[0]) * resource.getpagesize()\n"
            "resource.setrlimit(resource.RLIMIT_AS, (used + (150 << 20), used + (150 << 20)))\n"
            "with user_errors():\n"
            f"    read_coco_json({str(big)!r})\n")
    env = run_env(ATTRDIST_MAX_JSON_BYTES=str(1 << 40), OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2, p.stderr[-3000:]
    assert p.stderr.strip() == (f"attrdist: error: {big}: ran out of memory parsing {big.stat().st_size / 1e6:.1f} MB "
                                f"of JSON; free memory or use a machine with more")
