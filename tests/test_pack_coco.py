"""COCO instances / panoptic packers (image and objects modes) on real photos and real-format fixtures."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from attrdist.pack.coco import AnnSource, SplitSource, load_detections, pack_coco_captions, pack_coco_images, pack_coco_objects
from attrdist.errors import AttrdistError
from attrdist.data.reader import ShardReader, load_manifest
from attrdist.pack.vocab import load_vocabulary
from tests.conftest import ROOT, SHARED_DATA, run_env

pytestmark = [pytest.mark.packers,
              pytest.mark.skipif(not (SHARED_DATA / "coco").is_dir(), reason="../shared/data/coco not present")]

COCO = SHARED_DATA / "coco"
SAMPLE = COCO / "annotations" / "instances_sample.json"


def read_all(out: Path, split: str = "train") -> list[tuple[dict, dict]]:
    reader = ShardReader(load_manifest(out), split)
    return [(json.loads(reader[i]["json"]), reader[i]) for i in range(len(reader))]


def visible_min_side(bbox, w, h) -> float:
    x, y, bw, bh = bbox
    return min(min(w, x + bw) - max(0, x), min(h, y + bh) - max(0, y))


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "shards" / "coco.py"), *args], cwd=ROOT, env=run_env(),
                          capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """The 16 real photos plus a truncated JPEG and a text file posing as an image."""
    d = tmp_path_factory.mktemp("images")
    for p in (COCO / "images").iterdir():
        shutil.copy(p, d / p.name)
    data = (COCO / "images" / "000000000009.jpg").read_bytes()
    (d / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (d / "notes.jpg").write_text("not an image")
    return d


def test_objects_real_sample_every_box_accounted(tmp_path):
    """Real subprocess run: all 72 real boxes are packed or counted by reason."""
    out = tmp_path / "obj"
    p = run_cli("--mode", "objects", "--out", str(out), "--split", "train", str(COCO / "images"), str(SAMPLE),
                "--workers", "2", "--quiet", "--max-samples", "20")
    assert p.returncode == 0, p.stderr
    m = load_manifest(out).data
    rep = m["report"]["train"]
    assert rep["objects"] == 72 and rep["packed"] + sum(rep["dropped"].values()) == 72
    assert f"packed {rep['packed']} of 72 objects" in p.stdout
    assert m["options"]["quality"] == 90 and m["options"]["margin"] == 0.1 and m["options"]["mode"] == "objects"
    inst = json.loads(SAMPLE.read_text())
    sizes = {im["id"]: (im["width"], im["height"]) for im in inst["images"]}
    small = {a["id"] for a in inst["annotations"] if visible_min_side(a["bbox"], *sizes[a["image_id"]]) < 16}
    assert rep["dropped"]["too_small"] == len(small) > 0 and rep["packed"] == 72 - len(small)
    samples = read_all(out)
    assert len(samples) == rep["packed"] and len(m["splits"]["train"]["shards"]) == 3
    anns = {a["id"]: a for a in inst["annotations"]}
    names = [c["name"] for c in sorted(inst["categories"], key=lambda c: c["id"])]
    assert m["attributes"] == names
    assert sorted(meta["ann_id"] for meta, _ in samples) == sorted(set(anns) - small)
    order = [(meta["id"], meta["ann_id"]) for meta, _ in samples]
    assert order == sorted(order)  # deterministic: image id, then annotation id
    for meta, raw in samples:
        a = anns[meta["ann_id"]]
        assert meta["id"] == a["image_id"] and meta["box"] == a["bbox"]
        assert meta["labels"] == [names.index(next(c["name"] for c in inst["categories"] if c["id"] == a["category_id"]))]
        im = Image.open(io.BytesIO(raw["jpg"]))
        assert im.format == "JPEG" and im.size == (meta["width"], meta["height"])
        cx, cy, cw, ch = meta["crop_box"]
        w, h = sizes[a["image_id"]]
        assert 0 <= cx and 0 <= cy and cx + cw <= w and cy + ch <= h and (cw, ch) == im.size
        x, y, bw, bh = a["bbox"]
        assert cx <= max(0, x) and cy <= max(0, y) and cx + cw >= min(w, x + bw) - 1e-6
        bx, by, bbw, bbh = meta["box_in_crop"]
        assert bx >= 0 and by >= 0 and bx + bbw <= cw + 0.01 and by + bbh <= ch + 0.01


def test_image_mode_real_sample(tmp_path):
    out = pack_coco_images(tmp_path / "img", [AnnSource("train", COCO / "images", SAMPLE)], workers=2, progress=False)
    assert out["splits"]["train"]["nsamples"] == 16 and out["report"]["train"]["packed"] == 16
    inst = json.loads(SAMPLE.read_text())
    cats = sorted(inst["categories"], key=lambda c: c["id"])
    idx = {c["id"]: i for i, c in enumerate(cats)}
    samples = read_all(tmp_path / "img")
    assert sum(len(meta["boxes"]) for meta, _ in samples) == 72
    for meta, raw in samples:
        assert raw["jpg"] == (COCO / "images" / meta["file_name"]).read_bytes()  # copied through
        anns = sorted((a for a in inst["annotations"] if a["image_id"] == meta["id"]), key=lambda a: a["id"])
        assert meta["labels"] == sorted({idx[a["category_id"]] for a in anns})
        assert meta["box_labels"] == [idx[a["category_id"]] for a in anns]
        assert meta["boxes"] == [[round(v, 2) for v in a["bbox"]] for a in anns]
    # --max-side: resized at pack time, boxes scaled with the image
    small = pack_coco_images(tmp_path / "img256", [AnnSource("train", COCO / "images", SAMPLE)], max_side=256,
                             workers=1, progress=False)
    assert small["options"]["max_side"] == 256 and small["options"]["quality"] == 90
    for (meta, raw), (big, _) in zip(read_all(tmp_path / "img256"), samples):
        im = Image.open(io.BytesIO(raw["jpg"]))
        assert max(im.size) == 256 and im.size == (meta["width"], meta["height"])
        s = meta["width"] / big["width"]
        for b0, b1 in zip(big["boxes"], meta["boxes"]):
            assert b1[0] == pytest.approx(b0[0] * s, abs=0.05) and b1[2] == pytest.approx(b0[2] * s, abs=0.05)


def instances_fixture(images: Path, tmp_path: Path) -> Path:
    """Instances JSON (2017 style): polygons, an RLE crowd, bad boxes, missing/corrupt/non-images."""
    inst = json.loads(SAMPLE.read_text())
    imgs = [im for im in inst["images"] if im["id"] in (9, 25, 30)]
    imgs += [{"id": 900001, "file_name": "missing.jpg", "width": 640, "height": 480},
             {"id": 900002, "file_name": "truncated.jpg", "width": 640, "height": 480},
             {"id": 900003, "file_name": "notes.jpg", "width": 640, "height": 480}]
    poly = [[10.0, 10.0, 100.0, 10.0, 100.0, 100.0]]
    rle = {"size": [480, 640], "counts": "abc123"}  # compressed RLE string (content never decoded)
    anns = [
        {"id": 1, "image_id": 9, "category_id": 51, "bbox": [1.08, 187.69, 611.59, 285.84], "iscrowd": 0, "area": 1, "segmentation": poly},
        {"id": 2, "image_id": 9, "category_id": 51, "bbox": [311.73, 4.31, 319.28, 228.68], "iscrowd": 0, "area": 1, "segmentation": poly},
        {"id": 3, "image_id": 9, "category_id": 1, "bbox": [0, 0, 640, 480], "iscrowd": 1, "area": 1, "segmentation": rle},
        {"id": 4, "image_id": 9, "category_id": 51, "bbox": [10, 10, 0, 30], "iscrowd": 0, "area": 0, "segmentation": []},
        {"id": 5, "image_id": 9, "category_id": 51, "bbox": [700, 10, 50, 50], "iscrowd": 0, "area": 1, "segmentation": []},
        {"id": 6, "image_id": 25, "category_id": 25, "bbox": [385.53, 60.03, 214.97, 297.16], "iscrowd": 0, "area": 1, "segmentation": poly},
        {"id": 7, "image_id": 25, "category_id": 25, "bbox": [10, 10, 15, 40], "iscrowd": 0, "area": 1, "segmentation": poly},
        {"id": 8, "image_id": 30, "category_id": 64, "bbox": [600, 400, 100, 100], "iscrowd": 0, "area": 1, "segmentation": poly},
        {"id": 9, "image_id": 900001, "category_id": 1, "bbox": [1, 1, 50, 50], "iscrowd": 0, "area": 1, "segmentation": []},
        {"id": 10, "image_id": 900002, "category_id": 1, "bbox": [1, 1, 50, 50], "iscrowd": 0, "area": 1, "segmentation": []},
        {"id": 11, "image_id": 900002, "category_id": 1, "bbox": [1, 1, 60, 50], "iscrowd": 0, "area": 1, "segmentation": []},
        {"id": 12, "image_id": 900003, "category_id": 1, "bbox": [1, 1, 50, 50], "iscrowd": 0, "area": 1, "segmentation": []},
        {"id": 13, "image_id": 424242, "category_id": 1, "bbox": [1, 1, 50, 50], "iscrowd": 0, "area": 1, "segmentation": []},
        {"id": 14, "image_id": 30, "category_id": 777, "bbox": [1, 1, 50, 50], "iscrowd": 0, "area": 1, "segmentation": []},
    ]
    p = tmp_path / "instances_fixture.json"
    p.write_text(json.dumps({"images": imgs, "annotations": anns, "categories": inst["categories"]}))
    return p


def test_objects_fixture_exact_accounting(images, tmp_path):
    ann = instances_fixture(images, tmp_path)
    m = pack_coco_objects(tmp_path / "out", [AnnSource("train", images, ann)], workers=2, progress=False,
                          max_dropped=1)
    rep = m["report"]["train"]
    # id 8 clipped to the image (600..640 x 400..426 in a 640x426 image: 26 px high -> packed)
    assert rep["objects"] == 14 and rep["packed"] == 4, rep
    assert {k: v for k, v in rep["dropped"].items() if v} == {
        "crowd": 1, "bad_box": 2, "too_small": 1, "missing_image": 1, "corrupt_image": 2, "not_an_image": 1,
        "unknown_image": 1, "unknown_category": 1}
    assert [meta["ann_id"] for meta, _ in read_all(tmp_path / "out")] == [1, 2, 6, 8]
    # image mode on the same file: images counted by reason, crowd boxes kept and flagged
    m = pack_coco_images(tmp_path / "img", [AnnSource("train", images, ann)], workers=1, progress=False, max_dropped=1)
    rep = m["report"]["train"]
    assert rep["images"] == 6 and rep["packed"] == 3
    assert {k: v for k, v in rep["dropped"].items() if v} == {"missing_image": 1, "corrupt_image": 1, "not_an_image": 1}
    meta9 = next(meta for meta, _ in read_all(tmp_path / "img") if meta["id"] == 9)
    assert meta9["box_iscrowd"] == [0, 0, 1, 0] and rep["annotations_not_usable"] == {"unknown_category": 1, "bad_box": 1}


def panoptic_fixture(tmp_path: Path) -> Path:
    """COCONut-shaped panoptic JSON: per-image segments_info, thing + stuff categories with isthing."""
    cats = [{"id": 1, "name": "person", "supercategory": "person", "isthing": 1},
            {"id": 18, "name": "dog", "supercategory": "animal", "isthing": 1},
            {"id": 51, "name": "bowl", "supercategory": "kitchen", "isthing": 1},
            {"id": 184, "name": "tree-merged", "supercategory": "plant", "isthing": 0},
            {"id": 199, "name": "wall-other-merged", "supercategory": "wall", "isthing": 0}]
    images = [{"id": 9, "file_name": "000000000009.jpg", "width": 640, "height": 480},
              {"id": 25, "file_name": "000000000025.jpg", "width": 640, "height": 426}]
    anns = [{"image_id": 9, "file_name": "000000000009.png", "segments_info": [
                {"id": 3226956, "category_id": 51, "iscrowd": 0, "bbox": [1, 187, 612, 286], "area": 120000},
                {"id": 6979964, "category_id": 199, "iscrowd": 0, "bbox": [0, 0, 640, 200], "area": 80000},
                {"id": 1, "category_id": 1, "iscrowd": 1, "bbox": [0, 0, 100, 100], "area": 500}]},
            {"image_id": 25, "file_name": "000000000025.png", "segments_info": [
                {"id": 3226956, "category_id": 184, "iscrowd": 0, "bbox": [0, 0, 640, 300], "area": 90000},
                {"id": 42, "category_id": 18, "iscrowd": 0, "bbox": [10, 10, 8, 8], "area": 50}]}]
    p = tmp_path / "relabeled_coco_val.json"
    p.write_text(json.dumps({"info": {}, "images": images, "annotations": anns, "categories": cats}))
    return p


def test_panoptic_coconut(tmp_path):
    pan = panoptic_fixture(tmp_path)
    det = load_detections(pan)
    assert det.format == "panoptic" and len(det.anns) == 5
    m = pack_coco_images(tmp_path / "img", [AnnSource("val", COCO / "images", pan)], workers=1, progress=False)
    assert m["attributes"] == ["person", "dog", "bowl", "tree-merged", "wall-other-merged"]
    assert [c["isthing"] for c in m["options"]["categories"]] == [1, 1, 1, 0, 0]
    assert m["report"]["val"]["format"] == "panoptic"
    metas = {meta["id"]: meta for meta, _ in read_all(tmp_path / "img", "val")}
    assert metas[9]["labels"] == [0, 2, 4] and metas[25]["labels"] == [1, 3]
    m = pack_coco_objects(tmp_path / "obj", [AnnSource("val", COCO / "images", pan)], workers=1, progress=False)
    rep = m["report"]["val"]
    assert rep["objects"] == 5 and rep["packed"] == 3 and rep["dropped"]["crowd"] == 1 and rep["dropped"]["too_small"] == 1
    got = [(meta["id"], meta["ann_id"], meta["labels"]) for meta, _ in read_all(tmp_path / "obj", "val")]
    assert got == [(9, 3226956, [2]), (9, 6979964, [4]), (25, 3226956, [3])]  # segment ids repeat across images


def test_malformed_json_errors(tmp_path, images):
    bad = tmp_path / "list.json"
    bad.write_text("[1, 2, 3]")
    with pytest.raises(AttrdistError, match=r"list\.json: not a COCO annotation file"):
        load_detections(bad)
    inst = json.loads(SAMPLE.read_text())
    inst["images"].append(dict(inst["images"][0]))
    dup = tmp_path / "dup.json"
    dup.write_text(json.dumps(inst))
    with pytest.raises(AttrdistError, match=r"dup\.json: duplicate image id 9"):
        load_detections(dup)
    inst = json.loads(SAMPLE.read_text())
    inst["images"][3]["file_name"] = "../../etc/passwd"
    evil = tmp_path / "evil.json"
    evil.write_text(json.dumps(inst))
    with pytest.raises(AttrdistError, match=r"contains '\.\.'"):
        pack_coco_objects(tmp_path / "o", [AnnSource("train", images, evil)], workers=1, progress=False)
    assert not (tmp_path / "o").exists() and not list(tmp_path.glob(".o.staging-*"))


def test_cli_bad_input_one_line(tmp_path):
    (tmp_path / "x.json").write_text('{"foo": 1}')
    for args in (["--mode", "image", "--out", str(tmp_path / "o"), "--split", "train", str(COCO / "images"), str(tmp_path / "x.json")],
                 ["--mode", "objects", "--out", str(tmp_path / "o"), "--split", "train", str(COCO / "images")],
                 ["--out", str(tmp_path / "o"), "--split", "train", str(COCO / "images"), str(SAMPLE)]):
        p = run_cli(*args, "--quiet")
        assert p.returncode == 2, p.stderr
        lines = p.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("attrdist: error: "), p.stderr
    assert not (tmp_path / "o").exists()


def test_leak_between_splits(tmp_path):
    """The same photos listed in two splits: refused by default, dropped and counted with --on-leak drop."""
    splits = [AnnSource("train", COCO / "images", SAMPLE), AnnSource("val", COCO / "images", SAMPLE)]
    with pytest.raises(AttrdistError):
        pack_coco_images(tmp_path / "a", splits, workers=1, progress=False, limit=3)
    assert not (tmp_path / "a").exists()
    # every val image a copy: dropping them leaves val empty, which stops the pack before publishing
    with pytest.raises(AttrdistError, match="split 'val': no sample left to pack .leak 3"):
        pack_coco_images(tmp_path / "b", splits, workers=1, progress=False, limit=3, on_leak="drop")
    assert not (tmp_path / "b").exists()
    data = json.loads(SAMPLE.read_text())
    keep = {im["id"] for im in sorted(data["images"], key=lambda im: im["id"])[1:6]}  # 2 shared with train's 3
    val = tmp_path / "val.json"
    val.write_text(json.dumps({**data, "images": [im for im in data["images"] if im["id"] in keep],
                               "annotations": [a for a in data["annotations"] if a["image_id"] in keep]}))
    splits = [AnnSource("train", COCO / "images", SAMPLE), AnnSource("val", COCO / "images", val)]
    m = pack_coco_images(tmp_path / "b", splits, workers=1, progress=False, limit=3, on_leak="drop")
    assert m["report"]["val"]["dropped"]["leak"] == 2 and m["report"]["train"]["dropped"]["leak"] == 0
    assert m["report"]["val"]["packed"] == 1 and m["report"]["train"]["packed"] == 3
    drops = [json.loads(line) for line in (tmp_path / "b" / "drops.jsonl").read_text().splitlines()]
    assert sorted(d["file"] for d in drops) == sorted(str(COCO / "images" / im["file_name"]) for im in data["images"]
                                                       if im["id"] in sorted(keep)[:2])
    assert {(d["split"], d["reason"], d["what"]) for d in drops} == {("val", "leak", "sample")}


def test_captions_counts_corrupt_image(tmp_path, images):
    inst = json.loads(SAMPLE.read_text())
    imgs = inst["images"][:3] + [{"id": 900002, "file_name": "truncated.jpg", "width": 1, "height": 1}]
    caps = {"images": imgs, "annotations": [{"id": k, "image_id": im["id"], "caption": "a red bowl"}
                                            for k, im in enumerate(imgs)]}
    (tmp_path / "captions.json").write_text(json.dumps(caps))
    vocab_path = ROOT / "recipes" / "coconut_vocab.json"
    m = pack_coco_captions(tmp_path / "out", [SplitSource("train", images, tmp_path / "captions.json")],
                           load_vocabulary(vocab_path), vocab_path=vocab_path, progress=False, workers=2,
                           max_dropped=0.25)
    rep = m["report"]["train"]
    assert rep["packed"] == 3 and rep["dropped"]["corrupt_image"] == 1 and "leakage" in m["report"]
