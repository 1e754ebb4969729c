"""The packers' shared machinery (attrdist/pack/pipeline.py): the ordered parallel map, the one-decode verify pass,
and pass 2's check that a file did not change since pass 1. Real JPEG bytes from the demo and real worker
processes and threads."""

import contextlib
import hashlib
import io
import json
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from attrdist.errors import AttrdistError
from attrdist.pack.coco import CaptionsFormat
from attrdist.pack.leakage import perceptual_hash
from attrdist.pack.pipeline import ItemError, ItemFailure, parallel_map, read_checked, verify_bytes
from tests.conftest import ROOT, sigint_as_in_a_terminal


def _square_or_fail(x: int) -> int:  # module level: pickled into worker processes
    if x % 7 == 3:
        raise ItemFailure("bad_item", f"item {x}")
    if x == -1:
        raise AttrdistError("a fatal error stops the map")
    return x * x


def _expected(x: int):
    return ItemError("bad_item", f"item {x}") if x % 7 == 3 else x * x


@pytest.mark.parametrize("threads", [False, True])
@pytest.mark.parametrize("chunk", [1, 5, 8])
def test_parallel_map_keeps_order_and_counts_failures_in_place(threads, chunk):
    items = list(range(103))  # not a multiple of any chunk size: the last task is short
    got = list(parallel_map(_square_or_fail, iter(items), 2, chunk=chunk, threads=threads))
    assert got == [_expected(x) for x in items]
    assert list(parallel_map(_square_or_fail, items, 1)) == got  # in this process: the same results


@pytest.mark.parametrize("threads", [False, True])
def test_parallel_map_raises_a_fatal_error(threads):
    with pytest.raises(AttrdistError, match="fatal"):
        list(parallel_map(_square_or_fail, [1, 2, -1, 4], 2, chunk=3, threads=threads))


def _jpeg(small_demo) -> tuple[bytes, str]:
    path = sorted((small_demo / "images").rglob("*.jpg"))[0]
    return path.read_bytes(), str(path)


def test_verify_bytes_fingerprints_what_the_leak_check_reads(small_demo):
    data, path = _jpeg(small_demo)
    v = verify_bytes(data, path)
    w, h = Image.open(io.BytesIO(data)).size
    assert v == {"format": "JPEG", "width": w, "height": h, "sha1": hashlib.sha1(data).hexdigest(),
                 "phash": perceptual_hash(data)}
    png = io.BytesIO()
    Image.open(io.BytesIO(data)).save(png, format="PNG")
    vp = verify_bytes(png.getvalue(), "x.png")
    assert (vp["format"], vp["width"], vp["height"]) == ("PNG", w, h)


def test_verify_decodes_jpegs_to_pils_grey_draft_pixels(small_demo, monkeypatch):
    """The verify pass decodes YCbCr/grey JPEGs through simplejpeg: the grey image must be PIL's
    draft("L") image, bit for bit (so the perceptual hash is PIL's), for every subsampling, progressive and
    grey files and sizes at each DCT scale; CMYK and files libjpeg warns about go to PIL as before."""
    from attrdist.pack.leakage import DRAFT_SIZE
    from attrdist.pack.pipeline import _gray_draft
    from tests.test_decode import encode, photos, variants

    cases = dict(variants(small_demo))
    im = photos(small_demo)[0]
    for side in (60, 100, 130, 200, 257, 500, 520):  # every scale PIL's draft picks, and each one's edges
        cases[f"{side}px"] = encode(im.resize((side + 3, side)), quality=90)
    for name, data in cases.items():
        pil = Image.open(io.BytesIO(data))
        pil.draft("L", DRAFT_SIZE)
        want = np.asarray(pil.convert("L"))
        got = _gray_draft(data, DRAFT_SIZE)
        assert got is not None and got.dtype == np.uint8 and np.array_equal(got, want), name
        assert verify_bytes(data, name)["phash"] == perceptual_hash(data), name
    cmyk = encode(im.convert("CMYK"), quality=90)
    jpg = encode(im, quality=90)
    sos = jpg.index(b"\xff\xda")
    stray = jpg[:sos] + b"\x00\x00" + jpg[sos:]  # libjpeg warns: simplejpeg refuses, PIL decodes it
    assert _gray_draft(cmyk, DRAFT_SIZE) is None and _gray_draft(stray, DRAFT_SIZE) is None
    assert verify_bytes(stray, "stray")["phash"] == perceptual_hash(stray)
    assert verify_bytes(cmyk, "cmyk")["phash"] == perceptual_hash(cmyk)


def test_verify_bytes_refuses_broken_images(small_demo):
    data, path = _jpeg(small_demo)
    cases = {"truncated JPEG": (data[: len(data) // 2], "corrupt_image"),
             "header cut short": (data[:300], "corrupt_image"),
             "not an image": (b"just some text, not pixels" * 20, "not_an_image")}
    for what, (bad, reason) in cases.items():
        with pytest.raises(ItemFailure) as e:
            verify_bytes(bad, path)
        assert e.value.reason == reason, what
        assert path in str(e.value), what  # the message names the file


def test_read_checked_catches_a_file_changed_between_the_passes(small_demo, tmp_path):
    data, _ = _jpeg(small_demo)
    p = tmp_path / "a.jpg"
    p.write_bytes(data)
    sha1 = hashlib.sha1(data).hexdigest()
    assert read_checked(str(p), sha1) == data
    p.write_bytes(data[:-10] + b"0123456789")
    with pytest.raises(ItemFailure) as e:
        read_checked(str(p), sha1)
    assert e.value.reason == "changed_during_pack"
    p.unlink()
    with pytest.raises(ItemFailure) as e:
        read_checked(str(p), sha1)
    assert e.value.reason == "changed_during_pack"


def test_packing_imports_no_torch(small_demo, tmp_path):
    """A pack needs no torch (~600 MB of RSS and ~2 s to import; bench/memory.py): the shards are written with
    the standard library's tarfile. A real pack, in a fresh interpreter."""
    ann = small_demo / "annotations" / "instances_train.json"
    code = ("import sys\nfrom pathlib import Path\nfrom attrdist.pack.coco import AnnSource, pack_coco_images\n"
            f"m = pack_coco_images(Path({str(tmp_path / 'out')!r}), [AnnSource('train', Path({str(small_demo / 'images')!r}), "
            f"Path({str(ann)!r}))], workers=2, progress=False)\n"
            "assert m['splits']['train']['nsamples'] == 96, m['splits']\n"
            "print(sorted(k for k in sys.modules if k.split('.')[0] in ('torch', 'webdataset')))\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.strip() == "[]", p.stdout


@pytest.mark.parametrize("packer", ["imagefolder", "dior"])
def test_pass_2_of_every_packer_refuses_a_file_changed_since_pass_1(packer, small_demo, tmp_path):
    import importlib

    encode = importlib.import_module(f"attrdist.pack.{packer}")._encode
    data, _ = _jpeg(small_demo)
    p = tmp_path / "a.jpg"
    p.write_bytes(data)
    sha1 = hashlib.sha1(data).hexdigest()
    stored, ext, w, h, crc = encode((str(p), sha1, 0, 90))
    assert (stored, ext, (w, h)) == (data, "jpg", Image.open(io.BytesIO(data)).size)  # copied through as it is
    assert crc == zlib.crc32(data)  # the sample's checksum, taken in the pass-2 thread
    p.write_bytes(data[:-10] + b"0123456789")
    with pytest.raises(ItemFailure) as e:
        encode((str(p), sha1, 0, 90))
    assert e.value.reason == "changed_during_pack"


# ------------------------------------------------------------------------------------------------
# Pass 2: shards planned in the packing process, written whole by worker processes, recorded in order
# ------------------------------------------------------------------------------------------------


def test_plan_shards_cuts_at_max_samples_and_at_the_planned_bytes():
    from attrdist.pack.pipeline import ImageItem, Task, plan_shards

    def item(split, i, nbytes, samples):
        return ImageItem(split, f"{i}", f"/x/{i}.jpg"), {"path": f"/x/{i}.jpg", "bytes": nbytes}, Task(i, None, samples)

    todo = [item("train", i, 300, 3) for i in range(5)] + [item("val", i, 1000, 1) for i in range(5, 8)]
    plans = plan_shards(todo, max_samples=4, max_bytes=10 ** 9)
    assert [(p.name, p.start, p.parts) for p in plans] == [
        ("train-000000.tar", 0, ((0, 0, 3), (1, 0, 1))), ("train-000001.tar", 4, ((1, 1, 3), (2, 0, 2))),
        ("train-000002.tar", 8, ((2, 2, 3), (3, 0, 3))), ("train-000003.tar", 12, ((4, 0, 3),)),
        ("val-000000.tar", 0, ((5, 0, 1), (6, 0, 1), (7, 0, 1)))]
    # 100 planned bytes per crop: closed once a shard's planned bytes reach 450; a 1000-byte image alone
    plans = plan_shards(todo, max_samples=100, max_bytes=450)
    assert [p.samples for p in plans if p.split == "train"] == [5, 5, 5]
    assert [p.samples for p in plans if p.split == "val"] == [1, 1, 1]


def _pack_bytes(out: Path) -> tuple[dict, dict]:
    """Every file of a pack (name -> sha256), and its manifest without the time it was made."""
    m = json.loads((out / "manifest.json").read_text())
    m.pop("created")
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in out.iterdir() if p.name != "manifest.json"}, m


def _indexes_are_positions(out: Path) -> None:
    from attrdist.data.reader import ShardReader, load_manifest

    m = load_manifest(out)
    for split in m.data["splits"]:
        reader = ShardReader(m, split)
        assert reader.unreadable == 0 and [json.loads(reader[i]["json"])["index"] for i in range(len(reader))] == \
            list(range(len(reader)))


def test_pass_2_writes_the_same_bytes_whatever_the_worker_count(small_demo, tmp_path):
    """Object crops (several per image, re-encoded) with 7 samples per shard: 1, 2 and 3 workers give the
    same manifest and the same bytes in every shard, and some image's crops span two shards."""
    from attrdist.data.reader import ShardReader, load_manifest
    from attrdist.pack.coco import AnnSource, pack_coco_objects

    ann = small_demo / "annotations"
    for w in (1, 2, 3):
        pack_coco_objects(tmp_path / f"w{w}", [AnnSource(s, small_demo / "images", ann / f"instances_{s}.json")
                                               for s in ("train", "val")], max_samples=7, max_side=64, workers=w,
                          progress=False)
    one = _pack_bytes(tmp_path / "w1")
    assert _pack_bytes(tmp_path / "w2") == one and _pack_bytes(tmp_path / "w3") == one
    m = load_manifest(tmp_path / "w2")
    reader = ShardReader(m, "train")
    keys = [json.loads(reader[i]["json"])["id"] for i in range(len(reader))]
    cuts = np.cumsum([s["nsamples"] for s in m.data["splits"]["train"]["shards"]])[:-1]
    assert any(keys[c - 1] == keys[c] for c in cuts)  # one image, two shards: each worker wrote its own crops
    _indexes_are_positions(tmp_path / "w2")


def _captions_format(demo: Path):
    from attrdist.pack.coco import SplitSource
    from attrdist.pack.vocab import load_vocabulary
    from tests.conftest import DEMO_VOCAB

    ann = demo / "annotations"
    splits = [SplitSource(s, demo / "images", ann / f"captions_{s}.json") for s in ("train", "val")]
    return dict(splits=splits, vocab=load_vocabulary(DEMO_VOCAB), dataset="t", max_samples=10, limit=0,
                vocab_path=DEMO_VOCAB, on_leak="error")


class ChangesFiles(CaptionsFormat):
    """A captions format whose plan() (in the packing process, between pass 1 and pass 2) rewrites the
    files of the images `changes` lists: they really change on disk after pass 1 verified them."""

    changes: set = set()

    def plan(self, image, meta):
        if image.key in self.changes:
            Path(meta["path"]).write_bytes(b"changed after pass 1")
        return super().plan(image, meta)


def test_a_sample_dropped_in_pass_2_shifts_the_later_indexes_the_same_way_with_any_worker_count(small_demo, tmp_path):
    """Two train images change between the passes (shards 0 and 3 of 10): each is dropped, named; its shard
    is a sample short; every later sample's index is its position (the shards already sent to workers with
    the planned index are written again), and 1 and 2 workers give the same bytes."""
    import shutil

    from attrdist.pack.pipeline import pack

    for w in (1, 2):
        shutil.rmtree(tmp_path / "demo", ignore_errors=True)  # the same paths both times: the changed files restored
        demo = shutil.copytree(small_demo, tmp_path / "demo")
        keys = {f"{i:012d}" for i in sorted(json.loads((demo / "annotations" / "captions_train.json").read_text())
                                              ["images"][k]["id"] for k in (3, 35))}
        fmt = ChangesFiles(**_captions_format(demo))
        fmt.changes = keys
        m = pack(fmt, tmp_path / f"w{w}", max_samples=10, workers=w, progress=False)
        assert m["splits"]["train"]["nsamples"] == 94
        assert [s["nsamples"] for s in m["splits"]["train"]["shards"]] == [9, 10, 10, 9] + [10] * 5 + [6]
        assert m["report"]["train"]["dropped"]["changed_during_pack"] == 2
        drops = [json.loads(line) for line in (tmp_path / f"w{w}" / "drops.jsonl").read_text().splitlines()]
        images = json.loads((demo / "annotations" / "captions_train.json").read_text())["images"]
        assert sorted(d["file"] for d in drops if d["reason"] == "changed_during_pack") == sorted(
            str(demo / "images" / images[k]["file_name"]) for k in (3, 35))
        _indexes_are_positions(tmp_path / f"w{w}")
    assert _pack_bytes(tmp_path / "w1") == _pack_bytes(tmp_path / "w2")


def _stop_at(path: str, arg):
    """A produce that stops the whole pack at one image (module level: the format's copy in the workers
    calls it), as a kill would, after the shards before it were recorded."""
    from attrdist.pack.pipeline import load_image_item

    if arg[0] == path:
        raise AttrdistError(f"{path}: the test stops the pack here")
    return load_image_item(arg)


def test_a_resumed_pack_reuses_finished_shards_whose_plan_and_sha256_match(small_demo, tmp_path, caplog):
    """A pack stopped in pass 2 (2 workers) leaves finished shards in its staging folder; the same pack run
    again reuses them (not rewritten) except one whose bytes were damaged meanwhile (its sha256 no longer
    matches: written again), and publishes exactly the bytes of an uninterrupted pack."""
    import functools

    from attrdist.pack.pipeline import pack

    kw = _captions_format(small_demo)
    stopping = CaptionsFormat(**kw)
    stop_path = str(small_demo / "images" / json.loads((small_demo / "annotations" / "captions_train.json")
                                                       .read_text())["images"][75]["file_name"])
    stopping.produce = functools.partial(_stop_at, stop_path)
    out = tmp_path / "out"
    with pytest.raises(AttrdistError, match="the test stops the pack here"):
        pack(stopping, out, max_samples=10, workers=2, progress=False)
    staging = tmp_path / ".out.staging"
    progress = json.loads((staging / "progress.json").read_text())
    finished = [s["file"] for s in progress["splits"]["train"]["shards"]]
    assert finished[:3] == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    assert all((staging / f"{f}.record").is_file() for f in finished)
    damaged = staging / finished[1]
    data = bytearray(damaged.read_bytes())
    data[700] ^= 0xFF
    damaged.write_bytes(bytes(data))
    kept = {f: (staging / f).stat().st_mtime_ns for f in finished if f != finished[1]}
    with caplog.at_level("INFO", logger="attrdist"):
        pack(CaptionsFormat(**kw), out, max_samples=10, workers=2, progress=False)
    assert any(f"{len(finished) - 1} of the {len(finished)} finished shards of the interrupted pack reused"
               in r.getMessage() for r in caplog.records)
    assert {f: (out / f).stat().st_mtime_ns for f in kept} == kept
    assert not staging.exists() and not list(out.glob("*.record")) and not list(out.glob("*.partial"))
    pack(CaptionsFormat(**kw), tmp_path / "fresh", max_samples=10, workers=1, progress=False)
    assert _pack_bytes(out) == _pack_bytes(tmp_path / "fresh")
    _indexes_are_positions(out)


FIFO_IN_PASS_2 = '''
import os, sys
from pathlib import Path
from attrdist.errors import user_errors
from attrdist.pack.imagefolder import ImageFolderFormat
from attrdist.pack.pipeline import INTERRUPTED, pack

class FifoInPass2(ImageFolderFormat):
    """plan() (between the passes) turns one verified image into a FIFO: pass 2 blocks reading it."""
    def plan(self, image, meta):
        if meta["path"] == sys.argv[3]:
            os.unlink(meta["path"])
            os.mkfifo(meta["path"])
        return super().plan(image, meta)

with user_errors(interrupted=INTERRUPTED):
    fmt = FifoInPass2(Path(sys.argv[1]), val=0.5, split_dirs=False, max_side=0, quality=90, on_leak="warn",
                      dataset="imagefolder")
    pack(fmt, sys.argv[2], max_samples=2, workers=int(sys.argv[4]), progress=False)
'''


@pytest.mark.parametrize("workers", [1, 2])
def test_ctrl_c_in_pass_2_prints_one_line_and_the_pack_resumes(tmp_path, workers, caplog):
    """Ctrl-C (SIGINT to the process group) while a shard worker reads in pass 2: one line, exit status 130,
    nothing published, the shards recorded before it kept (every *.tar in the staging folder is recorded);
    the same pack run again reuses them and publishes the bytes of an uninterrupted pack. The last image
    becomes a FIFO between the passes, so pass 2 is interrupted exactly while it reads."""
    import os
    import signal
    import stat
    import time

    from attrdist.pack.imagefolder import ImageFolderFormat, pack_imagefolder
    from tests.conftest import run_env
    from tests.test_pack_safety import image_folder

    root = image_folder(tmp_path / "imgs", per_class=6)
    options = dict(val=0.5, split_dirs=False, max_side=0, quality=90, on_leak="warn", dataset="imagefolder")
    last = ImageFolderFormat(root, **options).images()[-1].path
    original = Path(last).read_bytes()
    script = tmp_path / "fifo_in_pass_2.py"
    script.write_text(FIFO_IN_PASS_2)
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, str(script), str(root), str(out), last, str(workers)], cwd=ROOT,
                            env=run_env(PYTHONPATH=str(ROOT)), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, preexec_fn=sigint_as_in_a_terminal)
    writer, deadline = None, time.time() + 120
    while writer is None:  # once the image is a FIFO, a worker has it open (or is opening it) when a writer may
        try:
            if stat.S_ISFIFO(os.stat(last).st_mode):
                writer = os.open(last, os.O_WRONLY | os.O_NONBLOCK)
        except OSError:
            pass
        if writer is None:
            assert proc.poll() is None and time.time() < deadline, proc.communicate()
            time.sleep(0.05)
    time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGINT)
    time.sleep(0.5)
    os.close(writer)  # the worker blocked on the FIFO sees the end of the file and finishes its shard
    try:
        _, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # never left running
        raise
    assert proc.returncode == 130, err
    assert err.strip().splitlines() == ["attrdist: interrupted; run the same command again: the pack resumes from "
                                        "its finished shards"], err
    assert not out.exists()
    staging = tmp_path / ".out.staging"
    progress = json.loads((staging / "progress.json").read_text())
    finished = {s["file"] for info in progress["splits"].values() for s in info["shards"]}
    assert finished and {p.name for p in staging.glob("*.tar")} == finished
    kept = {f: (staging / f).stat().st_mtime_ns for f in finished}
    os.unlink(last)
    Path(last).write_bytes(original)
    with caplog.at_level("INFO", logger="attrdist"):
        pack_imagefolder(root, out, max_samples=2, workers=workers, progress=False,
                         **{k: v for k, v in options.items() if k not in ("split_dirs", "max_side", "quality")})
    assert any(f"{len(finished)} of the {len(finished)} finished shards of the interrupted pack reused"
               in r.getMessage() for r in caplog.records), [r.getMessage() for r in caplog.records]
    assert {f: (out / f).stat().st_mtime_ns for f in kept} == kept
    pack_imagefolder(root, tmp_path / "fresh", max_samples=2, workers=1, progress=False,
                     **{k: v for k, v in options.items() if k not in ("split_dirs", "max_side", "quality")})
    assert _pack_bytes(out)[0] == _pack_bytes(tmp_path / "fresh")[0]


def test_dior_ids_fixed_at_plan_time_are_the_same_with_any_worker_count(tmp_path):
    """DIOR numbers images (non-numeric ids) and boxes in pack order: `plan` fixes them (a worker's `samples`
    cannot count what other workers wrote), so 1 and 2 workers give the same shards and coco_<split>.json,
    the ids run 1, 2, ... and every sample's ann_ids are its boxes in coco_train.json."""
    from attrdist.data.reader import ShardReader, load_manifest
    from attrdist.pack.dior import pack_dior
    from tests.test_pack_dior import make_dior

    fixture = {f"x{i:02d}": ("JPEGImages-trainval", [("vehicle", (2, 2, 20, 20)), ("ship", (30, 5, 50, 25))][:1 + i % 2])
               for i in range(9)}
    root = make_dior(tmp_path / "DIOR", fixture=fixture, splits={"train": sorted(fixture)[:7], "val": sorted(fixture)[7:]})
    for w in (1, 2):
        pack_dior(root, tmp_path / f"w{w}", splits=["train", "val"], max_samples=2, workers=w, progress=False)
    assert _pack_bytes(tmp_path / "w1") == _pack_bytes(tmp_path / "w2")
    coco = json.loads((tmp_path / "w2" / "coco_train.json").read_text())
    assert [im["id"] for im in coco["images"]] == list(range(1, 8))
    assert [a["id"] for a in coco["annotations"]] == list(range(1, 1 + sum(1 + i % 2 for i in range(7))))
    reader = ShardReader(load_manifest(tmp_path / "w2"), "train")
    by_image = {}
    for a in coco["annotations"]:
        by_image.setdefault(a["image_id"], []).append(a["id"])
    for i in range(len(reader)):
        s = json.loads(reader[i]["json"])
        assert s["image_id"] == i + 1 and s["ann_ids"] == by_image[i + 1]


def _running_children(pid: int) -> list[int]:
    """The live (not zombie) processes whose parent is `pid`."""
    kids = []
    for stat_file in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat_file.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            kids.append(int(stat_file.parent.name))
    return kids


def test_a_packer_killed_in_pass_2_leaves_no_worker_running_and_resumes(tmp_path):
    """SIGKILL to the packing process (not its workers) while a shard worker waits on a file in pass 2: both
    workers end by themselves (they used to wait for work forever), the shards recorded before stay, and
    the same pack run again reuses them and publishes the bytes of an uninterrupted pack."""
    import os
    import signal
    import stat
    import time

    from attrdist.pack.imagefolder import ImageFolderFormat, pack_imagefolder
    from tests.conftest import run_env
    from tests.test_pack_safety import image_folder

    root = image_folder(tmp_path / "imgs", per_class=6)
    options = dict(val=0.5, on_leak="warn", dataset="imagefolder")
    last = ImageFolderFormat(root, split_dirs=False, max_side=0, quality=90, **options).images()[-1].path
    original = Path(last).read_bytes()
    script = tmp_path / "fifo_in_pass_2.py"
    script.write_text(FIFO_IN_PASS_2)
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, str(script), str(root), str(out), last, "2"], cwd=ROOT,
                            env=run_env(PYTHONPATH=str(ROOT)), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    writer, deadline = None, time.time() + 120
    while writer is None:
        try:
            if stat.S_ISFIFO(os.stat(last).st_mode):
                writer = os.open(last, os.O_WRONLY | os.O_NONBLOCK)
        except OSError:
            pass
        if writer is None:
            assert proc.poll() is None and time.time() < deadline
            time.sleep(0.05)
    workers = _running_children(proc.pid)
    assert len(workers) == 2
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    try:
        deadline = time.time() + 60
        while (alive := [w for w in workers if Path(f"/proc/{w}/stat").exists()
                         and Path(f"/proc/{w}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"]):
            assert time.time() < deadline, f"workers {alive} still running after their packer was killed"
            time.sleep(0.1)
    finally:
        os.close(writer)
        for w in workers:  # never leave one behind, even when the test fails
            with contextlib.suppress(OSError):
                os.kill(w, signal.SIGKILL)
    staging = tmp_path / ".out.staging"
    progress = json.loads((staging / "progress.json").read_text())
    finished = {s["file"] for info in progress["splits"].values() for s in info["shards"]}
    assert finished and {p.name for p in staging.glob("*.tar")} == finished
    os.unlink(last)
    Path(last).write_bytes(original)
    pack_imagefolder(root, out, max_samples=2, workers=2, progress=False, **options)
    pack_imagefolder(root, tmp_path / "fresh", max_samples=2, workers=1, progress=False, **options)
    assert _pack_bytes(out)[0] == _pack_bytes(tmp_path / "fresh")[0]
