"""DIOR packer: the real sample (../shared/data/dior) and a small fixture in the official layout with
both XML variants, a test split and the bad cases (unknown class, boxes outside / zero-area,
a '..' file name, a missing image, malformed XML, a leaked duplicate)."""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from attrdist.errors import AttrdistError
from attrdist.data.reader import FORMAT, ShardReader, load_manifest
from tests.conftest import ROOT, SHARED_DATA, assert_one_line_error, packer_main, run_env

pytestmark = pytest.mark.packers
REAL = SHARED_DATA / "dior"
HBB, OBB = "Horizontal Bounding Boxes", "Oriented Bounding Boxes"


def _image(seed: int, w: int = 64, h: int = 48) -> bytes:
    """A real JPEG with distinct low-frequency content per seed (distinct perceptual hashes)."""
    rng = np.random.default_rng(seed)
    low = Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)).resize((w, h), Image.BICUBIC)
    arr = np.asarray(low).astype(np.int16) + rng.integers(-10, 10, (h, w, 3))
    buf = io.BytesIO()
    Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _hbb_xml(fname: str, w: int, h: int, objects: list[tuple[str, tuple]]) -> str:
    """The horizontal variant: tab-indented VOC, <bndbox>."""
    objs = "".join(
        f"\t<object>\n\t\t<name>{n}</name>\n\t\t<pose>Unspecified</pose>\n\t\t<bndbox>\n"
        f"\t\t\t<xmin>{b[0]}</xmin>\n\t\t\t<ymin>{b[1]}</ymin>\n\t\t\t<xmax>{b[2]}</xmax>\n\t\t\t<ymax>{b[3]}</ymax>\n"
        f"\t\t</bndbox>\n\t</object>\n" for n, b in objects)
    return (f"<annotation>\n\t<filename>{fname}</filename>\n\t<source>\n\t\t<database>DIOR</database>\n\t</source>\n"
            f"\t<size>\n\t\t<width>{w}</width>\n\t\t<height>{h}</height>\n\t\t<depth>3</depth>\n\t</size>\n"
            f"\t<segmented>0</segmented>\n{objs}</annotation>\n")


def _obb_xml(fname: str, w: int, h: int, objects: list[tuple[str, tuple]]) -> str:
    """The oriented variant: 4-space indent, <robndbox> corners (a slightly rotated box) + <angle>."""
    objs = []
    for n, (x0, y0, x1, y1) in objects:
        # corners of a box skewed by one pixel (a degenerate one kept flat): its hull is (x0, y0, x1, y1)
        d = int(x1 - x0 > 2 and y1 - y0 > 2)
        c = {"x_left_top": x0, "y_left_top": y0 + d, "x_right_top": x1 - d, "y_right_top": y0,
             "x_right_bottom": x1, "y_right_bottom": y1 - d, "x_left_bottom": x0 + d, "y_left_bottom": y1}
        inner = "".join(f"            <{k}>{v}</{k}>\n" for k, v in c.items())
        objs.append(f"    <object>\n        <type>robndbox</type>\n        <name>{n}</name>\n"
                    f"        <pose>Unspecified</pose>\n        <truncated>0</truncated>\n        <difficult>0</difficult>\n"
                    f"        <robndbox>\n{inner}        </robndbox>\n        <angle>-2.5</angle>\n    </object>\n")
    return ('<?xml version="1.0" encoding="UTF-8"?>\n<annotation>\n'
            "    <folder>/JPEGImages-trainval.zip/JPEGImages-trainval/JPEGImages-trainval</folder>\n"
            f"    <filename>{fname}</filename>\n    <source>\n        <database>Unknown</database>\n    </source>\n"
            f"    <size>\n        <width>{w}</width>\n        <height>{h}</height>\n        <depth>3</depth>\n    </size>\n"
            f"    <segmented>0</segmented>\n{''.join(objs)}</annotation>\n")


# id -> (image dir or None = missing, objects)
FIXTURE = {
    "00001": ("JPEGImages-trainval", [("golffield", (4, 6, 40, 30)), ("vehicle", (50, 10, 60, 20))]),
    "00002": ("JPEGImages-trainval", [("Expressway-Service-area", (10, 10, 30, 30)),
                                      ("storagetank", (-5, 40, 20, 60)),       # clipped to the image
                                      ("ship", (70, 5, 90, 20)),               # fully outside -> dropped
                                      ("airplane", (12, 12, 12, 30))]),        # zero area -> dropped
    "00003": (None, [("ship", (1, 1, 5, 5))]),                                  # image missing
    "00004": ("JPEGImages-trainval", [("trainstation", (0, 0, 64, 48))]),
    "00005": ("JPEGImages-test", [("Expressway-toll-station", (2, 2, 20, 20)), ("groundtrackfield", (20, 2, 40, 20))]),
}
SPLITS = {"train": ["00001", "00002", "00003"], "val": ["00004"], "test": ["00005"]}


def make_dior(root: Path, fixture=FIXTURE, splits=SPLITS, images: dict | None = None) -> Path:
    for d in ("JPEGImages-trainval", "JPEGImages-test", f"Annotations/{HBB}", f"Annotations/{OBB}", "ImageSets/Main"):
        (root / d).mkdir(parents=True, exist_ok=True)
    for k, (i, (img_dir, objs)) in enumerate(sorted(fixture.items())):
        if img_dir:
            (root / img_dir / f"{i}.jpg").write_bytes((images or {}).get(i) or _image(k))
        (root / "Annotations" / HBB / f"{i}.xml").write_text(_hbb_xml(f"{i}.jpg", 64, 48, objs))
        (root / "Annotations" / OBB / f"{i}.xml").write_text(_obb_xml(f"{i}.jpg", 64, 48, objs))
    for s, ids in splits.items():
        (root / "ImageSets" / "Main" / f"{s}.txt").write_text("".join(f"{i}\n" for i in ids))
    return root


def pack(root, out, **kw):
    from attrdist.pack.dior import pack_dior

    kw.setdefault("max_dropped", 1)  # the fixture lists an image it does not hold
    return pack_dior(root, out, workers=kw.pop("workers", 2), progress=False, **kw)


def samples(out: Path, split: str) -> list[dict]:
    r = ShardReader(load_manifest(out), split)
    return [json.loads(r[i]["json"]) for i in range(len(r))]


def quiet_coco(path):
    from pycocotools.coco import COCO

    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(path))


def cli(*args, check=False) -> subprocess.CompletedProcess:
    p = subprocess.run([sys.executable, str(ROOT / "shards" / "dior.py"), *map(str, args), "--quiet"], cwd=ROOT,
                       env=run_env(), capture_output=True, text=True, timeout=120)
    if check and p.returncode:
        raise AssertionError(f"exit {p.returncode}\n{p.stdout}\n{p.stderr}")
    return p


def main_inproc(*args) -> subprocess.CompletedProcess:
    """shards/dior.py's main() in this process (same code path as the CLI, without the start-up cost)."""
    return packer_main("dior", *args)


# ---------------------------------------------------------------------------------------------


def test_class_names_and_prompts():
    from attrdist.pack.dior import CLASS_NAMES, PROMPTS, class_index

    assert len(CLASS_NAMES) == 20 == len(set(CLASS_NAMES)) == len(PROMPTS)
    assert all(n == n.lower() and " " not in n and "-" not in n for n in CLASS_NAMES)
    for raw, canon in [("golffield", "golf_field"), ("Expressway-Service-area", "expressway_service_area"),
                       ("expressway-toll-station", "expressway_toll_station"), ("storagetank", "storage_tank"),
                       ("groundtrackfield", "ground_track_field"), ("trainstation", "train_station"),
                       ("Golf_Field", "golf_field")]:
        assert CLASS_NAMES[class_index(raw)] == canon
    assert class_index("helipad") is None
    assert PROMPTS[CLASS_NAMES.index("golf_field")] == "a satellite image of a golf field"
    assert PROMPTS[CLASS_NAMES.index("airport")] == "a satellite image of an airport"


@pytest.mark.skipif(not REAL.is_dir(), reason=f"real DIOR sample not found at {REAL}")
def test_real_sample_cli(tmp_path):
    out = tmp_path / "dior"
    p = cli("--root", REAL, "--out", out, "--workers", 2, "--max-dropped", 1, check=True)
    assert "train: packed 1 of 24 listed" in p.stdout
    m = load_manifest(out).data
    rep = m["report"]["train"]
    assert rep["packed"] == 1 and rep["dropped"]["missing_image"] == 23
    assert m["splits"]["train"]["nsamples"] == 1 and "val" not in m["splits"]  # val.txt is empty
    from attrdist.pack.dior import CLASS_NAMES, PROMPTS

    assert m["attributes"] == CLASS_NAMES and m["options"]["prompts"] == PROMPTS
    (s,) = samples(out, "train")
    assert s["id"] == "00001" and (s["width"], s["height"]) == (800, 800)
    assert s["labels"] == [CLASS_NAMES.index("golf_field")] == s["box_labels"]
    assert s["boxes"] == [[133, 237, 551, 435]]
    assert m["options"]["coco_instances"] == {"train": "coco_train.json"}
    coco = quiet_coco(out / "coco_train.json")
    assert len(coco.anns) == len(s["boxes"]) and list(coco.imgs) == [s["image_id"]]
    assert {c["name"] for c in coco.cats.values()} == set(CLASS_NAMES) and sorted(coco.cats) == list(range(1, 21))
    assert coco.anns[s["ann_ids"][0]]["bbox"] == s["boxes"][0]
    # the stored bytes are the original file
    assert ShardReader(load_manifest(out), "train")[0]["jpg"] == (REAL / "JPEGImages-trainval" / "00001.jpg").read_bytes()


@pytest.mark.skipif(not REAL.is_dir(), reason=f"real DIOR sample not found at {REAL}")
def test_real_sample_oriented_matches_horizontal(tmp_path):
    pack(REAL, tmp_path / "h", max_dropped=1)
    pack(REAL, tmp_path / "o", boxes="oriented", max_dropped=1)
    assert samples(tmp_path / "h", "train") == samples(tmp_path / "o", "train")


@pytest.mark.parametrize("boxes", ["horizontal", "oriented"])
def test_fixture_both_variants(tmp_path, boxes):
    from attrdist.pack.dior import CLASS_NAMES

    root = make_dior(tmp_path / "DIOR")
    out = tmp_path / "out"
    m = pack(root, out, boxes=boxes)
    assert list(m["splits"]) == ["train", "val", "test"]
    rep = m["report"]
    assert rep["train"]["packed"] == 2 and rep["train"]["dropped"]["missing_image"] == 1
    assert rep["train"]["boxes_dropped"] == {"outside_image": 1, "zero_area": 1}
    assert rep["train"]["boxes_clipped"] == 1 and rep["train"]["boxes"] == 4
    assert rep["val"]["packed"] == 1 and rep["test"]["packed"] == 1
    s1, s2 = samples(out, "train")
    idx = CLASS_NAMES.index
    assert s1["id"] == "00001" and s1["boxes"] == [[4, 6, 36, 24], [50, 10, 10, 10]]
    assert s1["box_labels"] == [idx("golf_field"), idx("vehicle")]
    assert s1["labels"] == sorted(s1["box_labels"])
    assert s2["boxes"] == [[10, 10, 20, 20], [0, 40, 20, 8]]  # storage tank clipped at x=0 and y=48
    assert s2["box_labels"] == [idx("expressway_service_area"), idx("storage_tank")]
    assert s2["labels"] == sorted({idx("expressway_service_area"), idx("storage_tank")})
    (t,) = samples(out, "test")  # the test image lives in JPEGImages-test
    assert t["id"] == "00005" and t["box_labels"] == [idx("expressway_toll_station"), idx("ground_track_field")]
    for split, n_img in (("train", 2), ("val", 1), ("test", 1)):
        coco = quiet_coco(out / f"coco_{split}.json")
        packed = samples(out, split)
        assert len(coco.imgs) == n_img and len(coco.anns) == sum(len(s["boxes"]) for s in packed)
        for s in packed:
            assert [coco.anns[a]["bbox"] for a in s["ann_ids"]] == s["boxes"]
            assert [coco.anns[a]["category_id"] - 1 for a in s["ann_ids"]] == s["box_labels"]
    # image-level label counts in the manifest
    assert m["splits"]["train"]["label_counts"]["labels"][idx("vehicle")] == 1


def test_max_side_scales_boxes(tmp_path):
    root = make_dior(tmp_path / "DIOR")
    out = tmp_path / "out"
    pack(root, out, max_side=32, splits=["train"])
    s1, s2 = samples(out, "train")
    assert (s1["width"], s1["height"]) == (32, 24)
    assert s1["boxes"] == [[2, 3, 18, 12], [25, 5, 5, 5]]
    im = Image.open(io.BytesIO(ShardReader(load_manifest(out), "train")[0]["jpg"]))
    assert im.size == (32, 24)
    coco = quiet_coco(out / "coco_train.json")
    assert coco.imgs[1]["width"] == 32 and coco.anns[s1["ann_ids"][0]]["bbox"] == [2, 3, 18, 12]


def test_leak_across_splits(tmp_path):
    dup = _image(0)
    root = make_dior(tmp_path / "DIOR", images={"00001": dup, "00004": dup})  # val image = a train image
    with pytest.raises(AttrdistError):
        pack(root, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    # dropping val's only image would leave val empty: that stops the pack, naming the file, before publishing
    with pytest.raises(AttrdistError, match=r"split 'val': no sample left to pack \(leak 1 \(\S+/00004.jpg"):
        pack(root, tmp_path / "out", on_leak="drop")
    assert not (tmp_path / "out").exists()
    (root / "ImageSets" / "Main" / "val.txt").write_text("00004\n00005\n")
    m = pack(root, tmp_path / "out", on_leak="drop", splits=["train", "val"])
    assert m["report"]["val"]["dropped"] == {"duplicate_id": 0, "leak": 1} and m["report"]["val"]["packed"] == 1
    assert m["report"]["leakage"]
    assert [s["id"] for s in samples(tmp_path / "out", "train")] == ["00001", "00002"]


def test_bad_inputs(tmp_path):
    good = make_dior(tmp_path / "good")
    out = tmp_path / "out"

    def variant(name, **objs):
        fx = {**FIXTURE, **objs}
        return make_dior(tmp_path / name, fixture=fx)

    # unknown class -> names the XML
    bad = variant("unknown", **{"00002": ("JPEGImages-trainval", [("helipad", (1, 1, 9, 9))])})
    assert_one_line_error(cli("--root", bad, "--out", out, "--workers", 2), "00002.xml", "helipad")
    # '..' in the file name: refused, not followed
    bad = tmp_path / "dotdot"
    make_dior(bad)
    (tmp_path / "secret.jpg").write_bytes(_image(9))
    xml = bad / "Annotations" / HBB / "00001.xml"
    xml.write_text(xml.read_text().replace("<filename>00001.jpg", "<filename>../../secret.jpg"))
    assert_one_line_error(main_inproc("--root", bad, "--out", out, "--workers", 1), "00001.xml", "..")
    # malformed XML
    bad = make_dior(tmp_path / "malformed")
    (bad / "Annotations" / HBB / "00004.xml").write_text("<annotation><object><name>ship</name>")
    assert_one_line_error(main_inproc("--root", bad, "--out", out, "--workers", 1), "00004.xml", "malformed XML")
    # a listed id without its annotation file
    bad = make_dior(tmp_path / "noxml")
    (bad / "Annotations" / HBB / "00005.xml").unlink()
    assert_one_line_error(main_inproc("--root", bad, "--out", out, "--workers", 1), "00005.xml", "not found")
    # a '..' id in a split file
    bad = make_dior(tmp_path / "badid")
    (bad / "ImageSets" / "Main" / "val.txt").write_text("../00004\n")
    assert_one_line_error(main_inproc("--root", bad, "--out", out, "--workers", 1), "val.txt", "..")
    # requested split file missing, root missing
    assert_one_line_error(main_inproc("--root", good, "--out", out, "--splits", "trainval"), "trainval.txt")
    assert_one_line_error(main_inproc("--root", tmp_path / "nope", "--out", out), "nope")
    # an output dir holding a different dataset: refused unless --overwrite
    other = tmp_path / "other"
    other.mkdir()
    (other / "manifest.json").write_text(json.dumps({"format": FORMAT, "dataset": "coco-captions", "splits": {}}))
    assert_one_line_error(main_inproc("--root", good, "--out", other, "--workers", 1), "coco-captions", "--overwrite")
    p = main_inproc("--root", good, "--out", other, "--workers", 1, "--overwrite", "--max-dropped", 1)
    assert load_manifest(other).data["dataset"] == "dior"
    # a leak error from the CLI is one line too
    dup = make_dior(tmp_path / "dup", images={"00001": _image(0), "00004": _image(0)})
    assert_one_line_error(main_inproc("--root", dup, "--out", out, "--workers", 1))
    assert p.returncode == 0 and not out.exists()


def test_corrupt_image_counted(tmp_path):
    root = make_dior(tmp_path / "DIOR")
    data = (root / "JPEGImages-trainval" / "00002.jpg").read_bytes()
    (root / "JPEGImages-trainval" / "00002.jpg").write_bytes(data[: len(data) // 2])
    m = pack(root, tmp_path / "out", splits=["train"])
    assert m["report"]["train"]["packed"] == 1 and m["report"]["train"]["dropped"]["corrupt_image"] == 1
    assert len(quiet_coco(tmp_path / "out" / "coco_train.json").imgs) == 1
