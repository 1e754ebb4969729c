"""COCO Attributes packer: a real-format pickle against the real COCO sample, exact accounting, hostile pickles."""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from attrdist.pack.cocottributes import load_cocottributes, load_pickle, pack_cocottributes
from attrdist.errors import AttrdistError
from attrdist.data.reader import ShardReader, load_manifest
from tests.conftest import ROOT, SHARED_DATA, run_env

pytestmark = [pytest.mark.packers,
              pytest.mark.skipif(not (SHARED_DATA / "coco").is_dir(), reason="../shared/data/coco not present")]

COCO = SHARED_DATA / "coco"
SAMPLE = COCO / "annotations" / "instances_sample.json"
N = 204

# patch id -> (COCO annotation id, pickle split); comments: expected outcome
PATCHES = {
    101: (1, "train2014"),       # packed (image 9)
    102: (9, "train2014"),       # packed (image 25, found through a 2014-style file name)
    103: (11, "val2014"),        # packed (image 30)
    104: (13, "val2014"),        # packed (image 34)
    105: (999999, "train2014"),  # no_annotation_id
    106: (888888, "val2014"),    # no_annotation_id
    107: (46, "train2014"),      # box_too_small (16 x 4 px)
    108: (72, "train2014"),      # no_votes (no vote vector)
    109: (51, "val2014"),        # image_missing (000000000072.jpg removed)
    110: (53, "val2014"),        # corrupt_image (000000000073.jpg truncated)
    111: (55, "train2014"),      # crowd (RLE iscrowd annotation)
    112: (14, "test2014"),       # unknown_split
}


def votes(pid: int) -> np.ndarray:
    v = np.zeros(N, dtype=np.float64)
    v[[0, 1, 2]] = 1.0
    v[3] = 0.4
    v[4] = np.nan          # unlabelled
    v[5] = -1.0            # unlabelled
    v[6] = 0.5             # >= threshold: positive
    v[7 + pid % 50] = 0.67
    return v


@pytest.fixture(scope="module")
def fixture(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("cocottributes")
    images = root / "images"
    images.mkdir()
    for p in (COCO / "images").iterdir():
        if p.name != "000000000072.jpg":
            shutil.copy(p, images / p.name)
    data = (COCO / "images" / "000000000073.jpg").read_bytes()
    (images / "000000000073.jpg").write_bytes(data[: len(data) // 3])
    inst = json.loads(SAMPLE.read_text())
    ann55 = next(a for a in inst["annotations"] if a["id"] == 55)
    ann55.update(iscrowd=1, segmentation={"size": [480, 640], "counts": "ab12cd"})  # RLE crowd
    i2017 = root / "instances_2017.json"
    i2017.write_text(json.dumps(inst))
    # a 2014-style file holding image 25 under its 2014 name (not present on disk: found by id)
    i2014 = root / "instances_train2014.json"
    i2014.write_text(json.dumps({
        "images": [{"id": 25, "file_name": "COCO_train2014_000000000025.jpg", "width": 640, "height": 426}],
        "annotations": [a for a in inst["annotations"] if a["id"] == 9], "categories": inst["categories"]}))
    rng = np.random.default_rng(0)
    order = rng.permutation(N)  # attributes listed out of id order: sorted by id for the vector order
    attrs = [{"id": int(i) + 1, "name": f"attr_{int(i) + 1:03d}"} for i in order]
    pkl = {"ann_vecs": {pid: votes(pid) for pid in PATCHES if pid != 108},
           "patch_id_to_ann_id": {pid: np.int64(a) for pid, (a, _) in PATCHES.items()},
           "split": {pid: s for pid, (_, s) in PATCHES.items()},
           "attributes": attrs}
    path = root / "cocottributes_eccv_version.pkl"
    with open(path, "wb") as f:
        pickle.dump(pkl, f, protocol=2)
    return {"root": root, "images": images, "pkl": path, "instances": [i2014, i2017]}


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "shards" / "cocottributes.py"), *args], cwd=ROOT,
                          env=run_env(), capture_output=True, text=True, timeout=120)


def test_pack_cli_exact_accounting(fixture, tmp_path):
    out = tmp_path / "out"
    p = run_cli("--out", str(out), "--pkl", str(fixture["pkl"]), "--instances", *map(str, fixture["instances"]),
                "--images", str(fixture["images"]), "--workers", "2", "--quiet", "--max-dropped", "1")
    assert p.returncode == 0, p.stderr
    assert "matched 4 of 12 objects" in p.stdout, p.stdout
    for reason in ("no_annotation_id 2", "image_missing 1", "box_too_small 1", "corrupt_image 1", "crowd 1"):
        assert reason in p.stdout
    m = load_manifest(out)
    rep = m.data["report"]
    nz = lambda d: {k: v for k, v in d.items() if v}  # noqa: E731
    assert rep["train"]["objects"] == 6 and rep["train"]["packed"] == 2
    assert nz(rep["train"]["dropped"]) == {"no_annotation_id": 1, "box_too_small": 1, "no_votes": 1, "crowd": 1}
    assert rep["val"]["objects"] == 5 and rep["val"]["packed"] == 2
    assert nz(rep["val"]["dropped"]) == {"no_annotation_id": 1, "image_missing": 1, "corrupt_image": 1}
    assert rep["summary"]["matched"] == 4 and rep["summary"]["objects"] == 12
    assert rep["summary"]["dropped"]["unknown_split"] == 1
    assert m.attributes == [f"attr_{i:03d}" for i in range(1, N + 1)]
    assert m.data["options"]["threshold"] == 0.5
    inst = {a["id"]: a for a in json.loads(SAMPLE.read_text())["annotations"]}
    got = {}
    for split in ("train", "val"):
        reader = ShardReader(m, split)
        for i in range(len(reader)):
            meta = json.loads(reader[i]["json"])
            got[meta["patch_id"]] = (split, meta)
            im = Image.open(io.BytesIO(reader[i]["jpg"]))
            assert im.format == "JPEG" and im.size == (meta["width"], meta["height"])
            assert meta["box"] == inst[meta["ann_id"]]["bbox"] and meta["id"] == inst[meta["ann_id"]]["image_id"]
    assert {pid: s for pid, (s, _) in got.items()} == {101: "train", 102: "train", 103: "val", 104: "val"}
    for pid, (_, meta) in got.items():
        v = votes(pid)
        assert meta["ann_id"] == PATCHES[pid][0]
        assert meta["labels"] == [int(i) for i in np.flatnonzero(v >= 0.5)]
        assert meta["labels_ignore"] == [4, 5]
        assert 3 not in meta["labels"] and 6 in meta["labels"]


def test_loader_reads_labels_ignore(fixture, tmp_path):
    """The data loader masks labels_ignore out (mask False) and keeps the positives."""
    from attrdist.core.config import DataConfig
    from attrdist.data.samples import SampleDataset

    out = tmp_path / "out"
    pack_cocottributes(out, fixture["pkl"], fixture["instances"], [fixture["images"]], workers=1, progress=False,
                       max_side=128, max_dropped=1)
    m = load_manifest(out)
    ds = SampleDataset(ShardReader(m, "train"), len(m.attributes), m.label_fields, DataConfig(), seed=0, train=False)
    s = ds[(0, 0)]
    assert s["valid"] and s["labels/labels"][[0, 1, 2, 6]].tolist() == [1, 1, 1, 1]
    assert s["mask/labels"][[4, 5]].tolist() == [False, False] and bool(s["mask/labels"][3])


class Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_hostile_pickle_refused_never_executed(tmp_path, fixture):
    marker = tmp_path / "pwned"
    path = tmp_path / "cocottributes_eccv_version.pkl"
    path.write_bytes(pickle.dumps({"ann_vecs": {}, "attributes": [], "x": Evil(marker)}))
    with pytest.raises(AttrdistError, match=r"cocottributes_eccv_version\.pkl: pickle refers to (posix|os|nt)\.system"):
        load_pickle(path)
    assert not marker.exists()
    p = run_cli("--out", str(tmp_path / "o"), "--pkl", str(path), "--instances", str(SAMPLE),
                "--images", str(fixture["images"]), "--quiet")
    assert p.returncode == 2 and not marker.exists() and not (tmp_path / "o").exists()
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("attrdist: error: ") and "system" in lines[0]
    # other classic gadgets
    for payload in (pickle.dumps(__import__("builtins").eval), pickle.dumps(subprocess.Popen)):
        path.write_bytes(payload)
        with pytest.raises(AttrdistError, match="not allowed"):
            load_pickle(path)


def test_bad_inputs(tmp_path, fixture):
    p = run_cli("--out", str(tmp_path / "o"), "--pkl", str(tmp_path / "nope.pkl"), "--instances", str(SAMPLE),
                "--images", str(fixture["images"]), "--quiet")
    assert p.returncode == 2 and p.stderr.startswith("attrdist: error: ") and len(p.stderr.strip().splitlines()) == 1
    wrong = tmp_path / "wrong.pkl"
    wrong.write_bytes(pickle.dumps({"ann_vecs": {}, "split": {}}))
    with pytest.raises(AttrdistError, match=r"wrong\.pkl: missing keys \['patch_id_to_ann_id', 'attributes'\]"):
        load_cocottributes(wrong)
    wrong.write_bytes(b"\x80\x02}q\x00(X")  # truncated
    with pytest.raises(AttrdistError, match="not a readable pickle"):
        load_cocottributes(wrong)


def test_a_refused_global_is_named_on_one_line(tmp_path):
    """Found by fuzzing: a pickle naming a module with a newline in it made the refusal two lines."""
    from attrdist.pack.cocottributes import load_pickle

    def short(s: bytes) -> bytes:
        return b"\x8c" + bytes([len(s)]) + s

    path = tmp_path / "odd.pkl"
    path.write_bytes(b"\x80\x04" + short(b"\numpy._core.numeric") + short(b"_frombuffer") + b"\x93.")
    with pytest.raises(AttrdistError) as e:
        load_pickle(path)
    assert "\n" not in str(e.value) and "'\\numpy._core.numeric._frombuffer'" in str(e.value)
