"""Packers on real data (issue 18): what they may delete, when they refuse to publish, how they name drops.

Every packer goes through `attrdist.pack.pipeline.pack`, so the rules are tested on the formats that reach
them most simply (imagefolder, COCO images, DIOR), with real COCO photos (copied out of ../shared first: no
test here ever points a packer at ../shared as an output) or generated JPEGs/PNGs where ../shared is absent.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from attrdist.data.reader import FORMAT, load_manifest
from attrdist.errors import AttrdistError
from tests.conftest import ROOT, SHARED_DATA, assert_one_line_error as one_line_error
from tests.conftest import packer_main as run_main
from tests.conftest import run_env, sigint_as_in_a_terminal

COCO = SHARED_DATA / "coco"
DIOR = SHARED_DATA / "dior"
needs_coco = pytest.mark.skipif(not COCO.is_dir(), reason=f"real COCO sample not found at {COCO}")
needs_dior = pytest.mark.skipif(not DIOR.is_dir(), reason=f"real DIOR sample not found at {DIOR}")


def tree(root: Path) -> dict[str, str]:
    """Every file under root -> sha1 of its bytes."""
    return {str(p.relative_to(root)): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and not p.is_symlink()}


def jpeg(seed: int, side: int = 64) -> bytes:
    rng = np.random.default_rng(seed)
    img = Image.fromarray((rng.random((side, side, 3)) * 255).astype("uint8"))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def image_folder(root: Path, per_class: int = 4, classes=("A", "B"), seed: int = 0) -> Path:
    for c, cls in enumerate(classes):
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            (root / cls / f"{cls}_{i:04d}_x.jpg").write_bytes(jpeg(seed + 100 * c + i))
    return root


@pytest.fixture
def coco(tmp_path) -> Path:
    """A copy of the real COCO sample (images + instances JSON), or generated JPEGs in the same layout."""
    root = tmp_path / "coco"
    if COCO.is_dir():
        shutil.copytree(COCO, root)
        return root
    (root / "images").mkdir(parents=True)
    (root / "annotations").mkdir()
    images, anns = [], []
    for i in range(8):
        name = f"{i:012d}.jpg"
        (root / "images" / name).write_bytes(jpeg(i, 96))
        images.append({"id": i + 1, "file_name": name, "width": 96, "height": 96})
        anns.append({"id": i + 1, "image_id": i + 1, "category_id": 1 + i % 2, "bbox": [4, 4, 40, 40], "area": 1600,
                     "iscrowd": 0})
    cats = [{"id": 1, "name": "person", "supercategory": "x"}, {"id": 2, "name": "dog", "supercategory": "x"}]
    (root / "annotations" / "instances_sample.json").write_text(
        json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return root


def coco_json_subset(src: Path, dst: Path, ids) -> Path:
    data = json.loads(src.read_text())
    keep = set(ids)
    dst.write_text(json.dumps({**data, "images": [im for im in data["images"] if im["id"] in keep],
                               "annotations": [a for a in data["annotations"] if a["image_id"] in keep]}))
    return dst


# ------------------------------------------------------------------------------------------------
# Deletion rules
# ------------------------------------------------------------------------------------------------


def test_overwrite_never_replaces_or_nests_in_an_input(coco, tmp_path):
    """The reported data loss: --overwrite with --out = the image folder deleted the photos."""
    ann = coco / "annotations" / "instances_sample.json"
    before = tree(coco)
    for out, what in ((coco / "images", "is the input"), (coco / "images" / "packed", "lies inside the input"),
                      (coco, "holds the input")):
        p = run_main("coco", "--mode", "image", "--out", out, "--split", "train", coco / "images", ann, "--overwrite",
                     "--workers", 1)
        one_line_error(p, str(out), what)
    assert tree(coco) == before and not (coco / "images" / "packed").exists()


def test_a_pack_of_other_data_is_replaced_only_with_overwrite(coco, tmp_path):
    """The reported silent replacement: a val-only pack in the same mode (default dataset name coco-images)
    wiped a train+val pack. Only a re-run of the same inputs and options replaces a pack by itself."""
    ann = coco / "annotations" / "instances_sample.json"
    ids = sorted(im["id"] for im in json.loads(ann.read_text())["images"])
    train = coco_json_subset(ann, tmp_path / "train.json", ids[:5])
    val = coco_json_subset(ann, tmp_path / "val.json", ids[5:8])
    out = tmp_path / "pack"
    both = ["--split", "train", coco / "images", train, "--split", "val", coco / "images", val]
    assert run_main("coco", "--mode", "image", "--out", out, *both, "--workers", 1).returncode == 0
    first = tree(out)
    created = load_manifest(out).data["created"]
    line = one_line_error(run_main("coco", "--mode", "image", "--out", out, "--split", "val", coco / "images", val,
                                   "--workers", 1), "already holds a pack of other data", "--overwrite")
    assert "other options" in line and tree(out) == first
    # same options, one input image changed: other inputs, also refused
    photo = coco / "images" / json.loads(val.read_text())["images"][0]["file_name"]
    original = photo.read_bytes()
    photo.write_bytes(jpeg(7, 80))
    one_line_error(run_main("coco", "--mode", "image", "--out", out, *both, "--workers", 1), "other input files")
    assert tree(out) == first
    photo.write_bytes(original)
    # same options, an annotation file's content changed: other inputs too
    text = val.read_text()
    val.write_text(text.replace('"iscrowd": 0', '"iscrowd": 0 ', 1))
    one_line_error(run_main("coco", "--mode", "image", "--out", out, *both, "--workers", 1), "other input files")
    val.write_text(text)
    # the same command again: a re-run, replaced without --overwrite (identical shards)
    time.sleep(1.1)  # "created" has one-second resolution
    assert run_main("coco", "--mode", "image", "--out", out, *both, "--workers", 1).returncode == 0
    assert load_manifest(out).data["created"] != created and tree(out) == {**first, "manifest.json": tree(out)["manifest.json"]}
    # --overwrite replaces the pack with the val-only one
    assert run_main("coco", "--mode", "image", "--out", out, "--split", "val", coco / "images", val, "--overwrite",
                    "--workers", 1).returncode == 0
    assert list(load_manifest(out).data["splits"]) == ["val"]


def test_overwrite_replaces_only_a_pack_or_an_empty_folder(tmp_path):
    root = image_folder(tmp_path / "imgs")
    common = ("--root", root, "--val", 0.5, "--workers", 1, "--overwrite")
    user = tmp_path / "user"
    user.mkdir()
    (user / "thesis.tex").write_text("years of work")
    one_line_error(run_main("imagefolder", "--out", user, *common), "not an attrdist pack", "move its contents")
    assert (user / "thesis.tex").read_text() == "years of work"
    # a pack holding a file it did not write is not replaced either
    out = tmp_path / "pack"
    assert run_main("imagefolder", "--out", out, *common).returncode == 0
    (out / "notes.txt").write_text("mine")
    one_line_error(run_main("imagefolder", "--out", out, *common), "holds 1 files attrdist did not write", "notes.txt")
    assert (out / "notes.txt").read_text() == "mine" and (out / "manifest.json").is_file()
    # a file, a symlink
    (tmp_path / "f").write_text("x")
    one_line_error(run_main("imagefolder", "--out", tmp_path / "f", *common), "not a folder")
    (tmp_path / "link").symlink_to(user)
    one_line_error(run_main("imagefolder", "--out", tmp_path / "link", *common), "symbolic link")
    # an empty folder is packed into; no lock file is left beside the output
    (tmp_path / "empty").mkdir()
    assert run_main("imagefolder", "--out", tmp_path / "empty", *common).returncode == 0
    assert not list(tmp_path.glob(".*.lock")) and not list(tmp_path.glob(".*.staging"))


def test_a_staging_folder_holding_foreign_files_is_left_alone(tmp_path):
    root = image_folder(tmp_path / "imgs")
    staging = tmp_path / ".pack.staging"
    staging.mkdir()
    (staging / "keep.me").write_text("not attrdist's")
    one_line_error(run_main("imagefolder", "--root", root, "--out", tmp_path / "pack", "--val", 0.5, "--workers", 1),
                   "did not write", "keep.me")
    assert (staging / "keep.me").read_text() == "not attrdist's"


def test_the_lock_is_removed_and_a_second_packer_is_refused(tmp_path):
    from attrdist.pack.writer import PackLock

    out = tmp_path / "pack"
    held = PackLock(out)
    held.acquire()
    try:
        one_line_error(run_main("imagefolder", "--root", image_folder(tmp_path / "imgs"), "--out", out, "--val", 0.5,
                                "--workers", 1), "another packer is writing")
    finally:
        held.release()
    assert not (tmp_path / ".pack.lock").exists()
    (tmp_path / ".pack.lock").write_bytes(b"")  # left by a crashed packer: taken over, then removed
    assert run_main("imagefolder", "--root", tmp_path / "imgs", "--out", out, "--val", 0.5, "--workers", 1).returncode == 0
    assert not (tmp_path / ".pack.lock").exists()


# ------------------------------------------------------------------------------------------------
# Nothing published on nothing; every drop named
# ------------------------------------------------------------------------------------------------


@needs_dior
def test_dior_without_image_folders_stops_before_publishing(tmp_path):
    """The reported silent success: no JPEGImages-* folder, exit 0, an empty pack published."""
    root = tmp_path / "DIOR"
    shutil.copytree(DIOR / "Annotations", root / "Annotations")
    shutil.copytree(DIOR / "ImageSets", root / "ImageSets")
    one_line_error(run_main("dior", "--root", root, "--out", tmp_path / "out", "--workers", 1),
                   "JPEGImages-trainval: image folder not found")
    assert not (tmp_path / "out").exists()
    # the folder there but empty: every image missing, stopped with the files named
    (root / "JPEGImages-trainval").mkdir()
    line = one_line_error(run_main("dior", "--root", root, "--out", tmp_path / "out", "--workers", 1, "--max-dropped", 1),
                          "split 'train': none of its 24 images can be read", "missing_image 24")
    assert "JPEGImages-trainval/00001.jpg" in line and not (tmp_path / "out").exists()


@needs_dior
def test_dior_drops_are_named_on_stdout_in_drops_jsonl_and_in_inspect(tmp_path):
    """The real sample: 1 of 24 listed images present. Above --max-dropped it stops; with it, every missing
    image is named (file, id, reason), in drops.jsonl, on stdout and by `attrdist inspect`."""
    out = tmp_path / "out"
    line = one_line_error(run_main("dior", "--root", DIOR, "--out", out, "--workers", 1),
                          "23 of 24 samples (95.8%) dropped", "missing_image 23", "--max-dropped 0.959")
    assert "00002.jpg" in line and not out.exists()
    p = run_main("dior", "--root", DIOR, "--out", out, "--workers", 1, "--max-dropped", 1)
    assert p.returncode == 0, p.stderr
    drops = [json.loads(x) for x in (out / "drops.jsonl").read_text().splitlines()]
    assert len(drops) == 23 and {d["reason"] for d in drops} == {"missing_image"}
    assert sorted(d["key"] for d in drops) == [f"{i:05d}" for i in range(2, 25)]
    assert all(d["file"] == str(DIOR / "JPEGImages-trainval" / f"{d['key']}.jpg") for d in drops)
    assert "train: samples dropped: missing_image 23 (" in p.stdout and "00002.jpg" in p.stdout
    assert f"every drop, named: {out / 'drops.jsonl'}" in p.stdout
    assert "val: left out, ImageSets/Main/val.txt lists no id" in p.stdout
    inspect = subprocess.run([sys.executable, "-m", "attrdist.cli", "inspect", str(out)], capture_output=True,
                             text=True, env=run_env(), cwd=ROOT, timeout=120)
    assert inspect.returncode == 0 and "missing_image 23" in inspect.stdout and "00002.jpg" in inspect.stdout


def test_truncated_and_missing_images_are_named(coco, tmp_path):
    ann = coco / "annotations" / "instances_sample.json"
    data = json.loads(ann.read_text())
    first, second = sorted(data["images"], key=lambda im: im["id"])[:2]
    truncated = coco / "images" / first["file_name"]
    truncated.write_bytes(truncated.read_bytes()[:2000])
    (coco / "images" / second["file_name"]).unlink()
    out = tmp_path / "out"
    p = run_main("coco", "--mode", "objects", "--out", out, "--split", "train", coco / "images", ann, "--workers", 1,
                 "--max-dropped", 1)
    assert p.returncode == 0, p.stderr
    drops = [json.loads(x) for x in (out / "drops.jsonl").read_text().splitlines()]
    by_reason = {}
    for d in drops:
        by_reason.setdefault(d["reason"], []).append(d)
    n_first = sum(a["image_id"] == first["id"] for a in data["annotations"])
    n_second = sum(a["image_id"] == second["id"] for a in data["annotations"])
    assert {d["file"] for d in by_reason["corrupt_image"]} == {str(truncated)} and len(by_reason["corrupt_image"]) == n_first
    assert {d["file"] for d in by_reason["missing_image"]} == {str(coco / "images" / second["file_name"])}
    assert sorted(d["ann_id"] for d in by_reason["missing_image"]) == sorted(
        a["id"] for a in data["annotations"] if a["image_id"] == second["id"])
    assert len(by_reason["missing_image"]) == n_second
    rep = load_manifest(out).data["report"]
    assert rep["train"]["dropped"]["corrupt_image"] == n_first and rep["drops"]["samples"] == len(drops)
    assert str(truncated) in p.stdout and "corrupt_image" in p.stdout


def test_a_split_with_no_sample_or_too_many_drops_stops(tmp_path):
    root = image_folder(tmp_path / "imgs", per_class=10)
    for i in range(2):  # 2 of 20 files unreadable: 10 %
        (root / "A" / f"A_{i:04d}_x.jpg").write_bytes(b"not a jpeg")
    out = tmp_path / "out"
    line = one_line_error(run_main("imagefolder", "--root", root, "--out", out, "--val", 0, "--workers", 1),
                          "split 'train': 2 of 20 samples (10.0%) dropped", "--max-dropped 0.1 ")
    assert "A/A_0000_x.jpg" in line and not out.exists()
    staged = tmp_path / ".out.staging" / "drops.jsonl"
    assert staged.is_file() and str(staged) in line and len(staged.read_text().splitlines()) == 2
    assert run_main("imagefolder", "--root", root, "--out", out, "--val", 0, "--workers", 1,
                    "--max-dropped", 0.1).returncode == 0
    # a requested split that gets nothing
    one_line_error(run_main("imagefolder", "--root", image_folder(tmp_path / "one", per_class=1, classes=("A",)),
                            "--out", tmp_path / "o2", "--val", 0.5, "--workers", 1), "split 'val' lists no image")


# ------------------------------------------------------------------------------------------------
# No silent fallbacks; the smaller things
# ------------------------------------------------------------------------------------------------


@needs_dior
def test_options_that_cannot_be_honoured_stop(tmp_path, coco):
    root = tmp_path / "DIOR"
    shutil.copytree(DIOR, root)
    shutil.rmtree(root / "Annotations" / "Horizontal Bounding Boxes")
    one_line_error(run_main("dior", "--root", root, "--out", tmp_path / "o"), "Horizontal Bounding Boxes",
                   "--boxes oriented")  # used to read the oriented boxes in their place
    one_line_error(run_main("dior", "--root", DIOR, "--out", tmp_path / "o", "--quality", 80), "--quality", "--max-side")
    ann = coco / "annotations" / "instances_sample.json"
    split = ("--split", "train", coco / "images", ann)
    one_line_error(run_main("coco", "--mode", "image", "--out", tmp_path / "o", *split, "--margin", 0.2),
                   "--margin", "--mode image")
    one_line_error(run_main("coco", "--mode", "image", "--out", tmp_path / "o", *split, "--quality", 70), "--quality")
    one_line_error(run_main("coco", "--mode", "captions", "--vocab", ROOT / "recipes" / "coconut_vocab.json",
                            "--out", tmp_path / "o", *split, "--max-side", 256), "--max-side", "--mode captions")
    assert not (tmp_path / "o").exists()


def test_a_folder_where_the_json_belongs(coco, tmp_path):
    one_line_error(run_main("coco", "--mode", "image", "--out", tmp_path / "o", "--split", "train", coco / "images",
                            coco / "annotations"), "is a folder, not an annotation file")


def test_help_shows_what_it_refers_to():
    for script in ("coco", "dior", "imagefolder", "cocottributes"):
        p = subprocess.run([sys.executable, str(ROOT / "shards" / f"{script}.py"), "--help"], capture_output=True,
                           text=True, cwd=ROOT, env=run_env(), timeout=60)
        text = " ".join(p.stdout.split())
        assert p.returncode == 0 and "256 MiB" in text and "--max-dropped" in text, script
        assert "see above" not in text and "(default: None)" not in text, script
        for option in text.split(" --")[1:]:  # no default stated twice
            assert option.count("default") <= 1, (script, option)
    p = subprocess.run([sys.executable, str(ROOT / "shards" / "coco.py"), "--help"], capture_output=True, text=True,
                       cwd=ROOT, env=run_env(), timeout=60)
    assert "NAME IMAGE_DIR CAPTIONS_JSON [INSTANCES_JSON]" in p.stdout and "python shards/coco.py --mode objects" in p.stdout


def test_inspect_a_pack_without_a_train_split(tmp_path):
    root = tmp_path / "imgs"
    for k, split in enumerate(("val", "test")):
        image_folder(root / split, seed=1000 * k)
    out = tmp_path / "out"
    assert run_main("imagefolder", "--root", root, "--out", out, "--split-dirs", "--workers", 1).returncode == 0
    p = subprocess.run([sys.executable, "-m", "attrdist.cli", "inspect", str(out), "--sheet", str(tmp_path / "s.png")],
                       capture_output=True, text=True, cwd=ROOT, env=run_env(), timeout=120)
    assert p.returncode == 0, p.stderr
    assert "split val" in p.stdout and "drops: none" in p.stdout and (tmp_path / "s.png").is_file()


@pytest.mark.parametrize("workers", [1, 2])
def test_ctrl_c_prints_one_line(tmp_path, workers):
    """Ctrl-C (SIGINT to the whole process group, as a terminal sends it) while pass 1 waits on a file: one
    line and exit status 130, no traceback (from this process or its workers). The file is a FIFO, so the
    packer is interrupted exactly while it reads."""
    root = image_folder(tmp_path / "imgs")
    fifo = root / "B" / "B_9999_x.jpg"
    os.mkfifo(fifo)
    proc = subprocess.Popen([sys.executable, str(ROOT / "shards" / "imagefolder.py"), "--root", str(root), "--out",
                             str(tmp_path / "out"), "--workers", str(workers), "--quiet"], cwd=ROOT, env=run_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            preexec_fn=sigint_as_in_a_terminal)
    writer, deadline = None, time.time() + 120
    while writer is None:  # the packer has the FIFO open (or is opening it) once a writer may open it
        try:
            writer = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        except OSError:
            assert proc.poll() is None and time.time() < deadline, proc.communicate()
            time.sleep(0.05)
    time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGINT)
    time.sleep(0.5)
    os.close(writer)  # a worker blocked in read() sees the end of the file and finishes its task
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, (out, err)
    assert err.strip().splitlines() == ["attrdist: interrupted; run the same command again: the pack resumes from "
                                        "its finished shards"], err
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------------
# The property: no packer invocation deletes or changes a file outside a previous pack or its staging
# ------------------------------------------------------------------------------------------------

OUTS = ["data/imgs", "data/imgs/A", "data", ".", "packs/p1", "packs/new", "packs", "user", "empty", "file.txt",
        "data/imgs/A/A_0000_x.jpg", "data/ann.json", "packs/p1/sub", "link"]


def _world(base: Path) -> Path:
    image_folder(base / "data" / "imgs", per_class=3)
    imgs = sorted((base / "data" / "imgs").rglob("*.jpg"))
    (base / "data" / "ann.json").write_text(json.dumps({
        "images": [{"id": i + 1, "file_name": p.relative_to(base / "data" / "imgs").as_posix(), "width": 64,
                    "height": 64} for i, p in enumerate(imgs)],
        "annotations": [{"id": i + 1, "image_id": i + 1, "category_id": 1, "bbox": [1, 1, 30, 30], "area": 900,
                         "iscrowd": 0} for i in range(len(imgs))],
        "categories": [{"id": 1, "name": "thing"}]}))
    (base / "data" / "notes.txt").write_text("user notes")
    (base / "user").mkdir()
    (base / "user" / "thesis.tex").write_text("years of work")
    (base / "empty").mkdir()
    (base / "file.txt").write_text("a file")
    (base / "link").symlink_to(base / "user")
    from attrdist.pack.imagefolder import pack_imagefolder

    pack_imagefolder(base / "data" / "imgs", base / "packs" / "p1", val=0.34, workers=1, progress=False)
    return base


def _pack_dirs(base: Path) -> list[Path]:
    """Folders a packer may delete in: previous packs (a manifest of this format) and staging folders."""
    found = []
    for p in [base, *base.rglob("*")]:
        if p.is_dir() and not p.is_symlink():
            m = p / "manifest.json"
            if p.name.endswith(".staging") or (m.is_file() and FORMAT in m.read_text()):
                found.append(p)
    return found


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.sampled_from(OUTS), st.booleans(), st.sampled_from(["imagefolder", "coco"]),
                          st.sampled_from([0.34, 0.5]), st.sampled_from(["imagefolder", "other"])),
                min_size=1, max_size=3))
def test_no_packer_deletes_a_file_outside_a_previous_pack(calls):
    base = Path(tempfile.mkdtemp(prefix="attrdist-fuzz-"))
    try:
        _world(base)
        for out, overwrite, fmt, val, dataset in calls:
            before, allowed = tree(base), _pack_dirs(base)
            try:
                if fmt == "imagefolder":
                    from attrdist.pack.imagefolder import pack_imagefolder

                    pack_imagefolder(base / "data" / "imgs", base / out, val=val, workers=1, progress=False,
                                     overwrite=overwrite, dataset=dataset)
                else:
                    from attrdist.pack.coco import AnnSource, pack_coco_images

                    pack_coco_images(base / out, [AnnSource("train", base / "data" / "imgs", base / "data" / "ann.json")],
                                     workers=1, progress=False, overwrite=overwrite, dataset=dataset,
                                     limit=4 if val == 0.5 else 0)
            except AttrdistError:
                pass
            after = tree(base)
            lost = [f for f, h in before.items() if after.get(f) != h]
            outside = [f for f in lost if not any(base / f == d or d in (base / f).parents for d in allowed)]
            assert not outside, (out, overwrite, fmt, outside)
    finally:
        shutil.rmtree(base)


def test_a_folder_where_any_input_file_belongs(tmp_path):
    """Each packer's file inputs: a folder given in their place is named as a folder, not as "not found"."""
    from attrdist.pack.cocottributes import load_pickle
    from attrdist.pack.dior import read_split_ids
    from attrdist.pack.imagefolder import read_group_csv
    from attrdist.pack.vocab import load_vocabulary

    for load in (load_pickle, read_split_ids, read_group_csv, load_vocabulary):
        with pytest.raises(AttrdistError, match="is a folder, not "):
            load(tmp_path)
