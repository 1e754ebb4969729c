"""The aerial demo (DIOR layout): deterministic bytes, both XML variants agree, and the real DIOR packer
accounts for every box, canonicalises the raw class names and writes COCO json that pycocotools loads."""

from __future__ import annotations

import contextlib
import io
import json
import math
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from attrdist.demo.aerial import AERIAL_CLASSES, HBB_DIR, OBB_DIR, AerialSpec, aerial_demo_shards, ensure_aerial
from attrdist.pack.dior import CLASS_NAMES, DIOR_CLASSES, parse_dior_xml
from attrdist.data.reader import ShardReader, load_manifest


pytestmark = pytest.mark.packers
SPEC = AerialSpec(seed=3, n_train=24, n_val=8, n_test=8)


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return ensure_aerial(tmp_path_factory.mktemp("aerial") / "a", SPEC, progress=False)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _ids(root: Path, split: str) -> list[str]:
    return (root / "ImageSets" / "Main" / f"{split}.txt").read_text().split()


def test_same_spec_same_bytes(root, tmp_path):
    again = _files(ensure_aerial(tmp_path / "b", SPEC, progress=False))
    assert again == _files(root)
    assert len(again) == 3 * 40 + 3 + 1  # image + 2 XML per id, 3 split lists, DEMO_VERSION
    other = _files(ensure_aerial(tmp_path / "c", AerialSpec(seed=4, n_train=24, n_val=8, n_test=8), progress=False))
    assert other["JPEGImages-trainval/00001.jpg"] != again["JPEGImages-trainval/00001.jpg"]


def test_layout_and_both_xml_variants_agree(root):
    ids = {s: _ids(root, s) for s in ("train", "val", "test")}
    assert ids["train"] + ids["val"] + ids["test"] == [f"{i:05d}" for i in range(1, 41)]
    raw_names = {r for r, _ in DIOR_CLASSES}
    for split, split_ids in ids.items():
        image_dir = "JPEGImages-test" if split == "test" else "JPEGImages-trainval"
        for i in split_ids:
            assert (root / image_dir / f"{i}.jpg").is_file()
            h, o = parse_dior_xml(root / HBB_DIR / f"{i}.xml"), parse_dior_xml(root / OBB_DIR / f"{i}.xml")
            assert (h.file_name, h.width, h.height) == (o.file_name, o.width, o.height) == (f"{i}.jpg", 128, 128)
            assert 1 <= len(h.objects) <= SPEC.max_objects
            assert h.objects == o.objects  # horizontal box == hull of the oriented corners, same labels
            for b in h.objects:
                x0, y0, x1, y1 = b.box
                assert 0 <= x0 < x1 <= 128 and 0 <= y0 < y1 <= 128
            for obj in ET.parse(root / OBB_DIR / f"{i}.xml").getroot().iter("object"):
                assert obj.findtext("name") in raw_names
                c = {el.tag: float(el.text) for el in obj.find("robndbox")}
                top = math.degrees(math.atan2(c["y_right_top"] - c["y_left_top"], c["x_right_top"] - c["x_left_top"]))
                assert abs(top - float(obj.findtext("angle"))) <= 8  # integer corners of boxes >= 9 px long


def test_packed_by_the_dior_packer(monkeypatch, tmp_path):
    from pycocotools.coco import COCO

    monkeypatch.setenv("ATTRDIST_CACHE", str(tmp_path))
    out = aerial_demo_shards(SPEC)
    src = out.with_name(out.name.removesuffix("-shards"))
    assert src.parent == tmp_path and (src / "DEMO_VERSION").is_file()
    m = load_manifest(out)
    assert m.attributes == CLASS_NAMES
    canonical = {dict(DIOR_CLASSES)[r] for r in AERIAL_CLASSES}
    report = m.data["report"]
    assert report["leakage"]["exact"] == report["leakage"]["near"] == 0
    for split in ("train", "val", "test"):
        xml_boxes = sum(len(parse_dior_xml(src / HBB_DIR / f"{i}.xml").objects) for i in _ids(src, split))
        rep = report[split]
        assert rep["packed"] == SPEC.n(split) and rep["boxes"] + sum(rep["boxes_dropped"].values()) == xml_boxes
        r = ShardReader(m, split)
        metas = [json.loads(r[k]["json"]) for k in range(len(r))]
        assert sum(len(meta["boxes"]) for meta in metas) == rep["boxes"]
        assert {CLASS_NAMES[lab] for meta in metas for lab in meta["box_labels"]} <= canonical
        assert {c for c, n in rep["box_counts"].items() if n} <= canonical
        with contextlib.redirect_stdout(io.StringIO()):
            coco = COCO(str(out / m.data["options"]["coco_instances"][split]))
        assert len(coco.getAnnIds()) == rep["boxes"] and len(coco.getImgIds()) == SPEC.n(split)
    assert aerial_demo_shards(SPEC) == out  # packed once: the second call finds the shards
