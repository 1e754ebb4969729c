"""Detection limits that fit the data: COCOeval's default maxDets=[1, 10, 100] caps recall on DIOR-dense
images (hundreds of boxes), so coco_evaluate counts max(100, the densest image's boxes) per image by
default, and the detector keeps as many. The check: the ground truth scored against itself is exactly 1."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from attrdist.core.detection_eval import coco_evaluate, default_max_dets, gt_boxes_per_image
from attrdist.errors import AttrdistError
from attrdist.pack.dior import CLASS_NAMES
from tests.conftest import SHARED_DATA

CAT = {n: i + 1 for i, n in enumerate(CLASS_NAMES)}  # the packer's category ids (1..20)
# box side ranges in px on 800 px DIOR images: (class, min side, max side, aspect spread)
SMALL = [("vehicle", 8, 28, 2.0), ("ship", 10, 30, 3.0), ("storage_tank", 12, 30, 1.1)]
LARGE = [("airplane", 30, 120, 1.3), ("harbor", 80, 300, 3.0), ("ground_track_field", 150, 350, 1.6),
         ("bridge", 40, 260, 6.0), ("chimney", 20, 80, 2.5), ("windmill", 20, 60, 1.5)]


def _box(rng, lo, hi, spread, x0, y0, room):
    """[x, y, w, h] of side ~U(lo, hi) and aspect up to `spread`, inside the square (x0, y0, room)."""
    side = min(rng.uniform(lo, hi), room)
    a = rng.uniform(1.0, spread)
    w, h = (side, side / a) if rng.random() < 0.5 else (side / a, side)
    w, h = max(2.0, round(w, 1)), max(2.0, round(h, 1))
    return [round(float(x0 + rng.uniform(0, room - w)), 1), round(float(y0 + rng.uniform(0, room - h)), 1), float(w), float(h)]


def dior_like_gt(seed: int = 0, dense: int = 600) -> dict:
    """Five 800x800 images in DIOR's classes: one parking-lot/port scene with `dense` small boxes
    (vehicles, ships, storage tanks, one per 32 px cell, so no two coincide), one with 150 small boxes,
    and three sparse scenes of 4-10 larger objects and a vehicle.

    Every class has >= 2 boxes: pycocotools computes precision as tp / (tp + fp + np.spacing(1)), so a
    class whose only box is found gets AP 1 / (1 + 2.2e-16) = 0.9999999999999998, not 1; from 2 boxes on
    the last rank's precision rounds to exactly 1 and the precision envelope carries it to every rank."""
    rng = np.random.default_rng(seed)
    images = [{"id": i, "file_name": f"{i:05d}.jpg", "width": 800, "height": 800} for i in range(1, 6)]
    anns = []

    def add(image_id, name, bbox):
        anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": CAT[name], "bbox": bbox,
                     "area": bbox[2] * bbox[3], "iscrowd": 0})

    for image_id, n in ((1, dense), (2, 150)):
        cells = rng.permutation(25 * 25)[:n]  # 32 px cells of the 800 px image
        for k, c in enumerate(cells):
            name, lo, hi, spread = SMALL[0] if k < 0.7 * n else SMALL[1] if k < 0.85 * n else SMALL[2]
            add(image_id, name, _box(rng, lo, hi, spread, 32 * (c % 25), 32 * (c // 25), 32))
    for image_id in (3, 4, 5):  # images 3 and 5: each large class once (every class has >= 2 boxes: see below)
        picks = rng.integers(len(LARGE), size=int(rng.integers(3, 10))) if image_id == 4 else range(len(LARGE))
        for k, j in enumerate(picks):
            name, lo, hi, spread = LARGE[j]
            cell = 800 // 3
            add(image_id, name, _box(rng, lo, hi, spread, cell * (k % 3), cell * (k // 3 % 3), cell))
        add(image_id, "vehicle", _box(rng, 8, 28, 2.0, 770, 770, 30))  # vehicles in sparse images too
    return {"images": images, "categories": [{"id": i, "name": n} for n, i in CAT.items()], "annotations": anns}


def as_detections(gt: dict, seed: int = 1) -> list[dict]:
    """Every ground-truth box as a detection of its class, with distinct scores in random order."""
    scores = np.random.default_rng(seed).permutation(len(gt["annotations"])) / len(gt["annotations"]) + 1e-3
    return [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": list(a["bbox"]), "score": float(s)}
            for a, s in zip(gt["annotations"], scores)]


def test_ground_truth_against_itself_is_exactly_one_on_dior_density():
    gt = dior_like_gt()
    counts = gt_boxes_per_image(gt)
    assert counts == {1: 600, 2: 150, **{i: counts[i] for i in (3, 4, 5)}} and max(counts[i] for i in (3, 4, 5)) <= 10
    m = coco_evaluate(gt, as_detections(gt), CLASS_NAMES)
    assert (m["max_dets"], m["max_gt_per_image"], m["images_over_100_gt"]) == (600, 600, 2)
    assert (m["mAP"], m["mAP50"], m["mAP75"]) == (1.0, 1.0, 1.0)  # exactly
    assert all(c["AP"] == 1.0 for c in m["per_class"].values() if c["num_gt"])
    assert min(c["num_gt"] for c in m["per_class"].values() if c["num_gt"]) >= 2  # see dior_like_gt


def test_cocos_default_limit_of_100_fails_that_check():
    """COCOeval keeps the `max_dets` best detections per image and class: with 100, a class with n_i
    boxes in image i reaches recall R = sum(min(n_i, 100)) / sum(n_i), and AP = #{r in 0, .01, .., 1: r <= R} / 101."""
    gt = dior_like_gt()
    m = coco_evaluate(gt, as_detections(gt), CLASS_NAMES, max_dets=100)
    assert m["max_dets"] == 100 and m["images_over_100_gt"] == 2
    expected = {}
    for name, c in m["per_class"].items():
        if not c["num_gt"]:
            continue
        per_image = [sum(a["image_id"] == i and a["category_id"] == CAT[name] for a in gt["annotations"])
                     for i in range(1, 6)]
        recall = sum(min(n, 100) for n in per_image) / sum(per_image)
        expected[name] = float(np.mean(np.linspace(0, 1, 101) <= recall))
        assert c["AP"] == pytest.approx(expected[name], abs=1e-12), name
        assert c["AP50"] == c["AP75"] == c["AP"]  # boxes are exact: every IoU threshold alike
    assert expected["vehicle"] < 0.5 and expected["airplane"] == 1.0
    assert m["mAP"] == pytest.approx(np.mean(list(expected.values())), abs=1e-12)
    assert m["mAP"] < 1.0 and m["mAP50"] < 1.0 and m["mAP75"] < 1.0
    print(f"GT vs itself on DIOR-like density: default (max_dets={default_max_dets(gt)}) mAP 1.0; "
          f"max_dets=100 mAP {m['mAP']:.4f} (vehicle AP {m['per_class']['vehicle']['AP']:.4f})")


def test_explicit_limit_and_sparse_data_keep_cocos_100():
    gt = dior_like_gt(dense=90)  # densest image: 150 boxes
    dets = as_detections(gt)
    assert coco_evaluate(gt, dets, CLASS_NAMES)["max_dets"] == 150
    m = coco_evaluate(gt, dets, CLASS_NAMES, max_dets=1000)  # a limit above the data changes nothing
    assert (m["max_dets"], m["mAP"]) == (1000, 1.0)
    # the limit is per image and class: 105 vehicles in image 2
    assert coco_evaluate(gt, dets, CLASS_NAMES, max_dets=110)["mAP"] == 1.0
    assert coco_evaluate(gt, dets, CLASS_NAMES, max_dets=5)["mAP"] < coco_evaluate(gt, dets, CLASS_NAMES, max_dets=100)["mAP"] < 1.0
    sparse = {**gt, "images": gt["images"][2:], "annotations": [a for a in gt["annotations"] if a["image_id"] > 2]}
    m = coco_evaluate(sparse, as_detections(sparse), CLASS_NAMES)
    assert (m["max_dets"], m["images_over_100_gt"], m["mAP"]) == (100, 0, 1.0)  # COCO's default on COCO-like data
    for bad in (0, -3, 2.5, True, "100"):
        with pytest.raises(AttrdistError, match="max_dets"):
            coco_evaluate(gt, dets, CLASS_NAMES, max_dets=bad)


def test_shared_dior_sample_packed_ground_truth_against_itself(tmp_path):
    root = SHARED_DATA / "dior"
    if not (root / "JPEGImages-trainval").is_dir():
        pytest.skip(f"{root}: the shared DIOR sample is not here")
    from attrdist.pack.dior import pack_dior

    pack_dior(root, tmp_path / "shards", workers=1, progress=False, max_dropped=1)
    gt = json.loads((tmp_path / "shards" / "coco_train.json").read_text())
    assert gt["annotations"]
    m = coco_evaluate(gt, as_detections(gt), CLASS_NAMES)
    assert m["max_dets"] == max(100, max(gt_boxes_per_image(gt).values()))
    # exactly 1 but for pycocotools' own epsilon (tp / (tp + fp + np.spacing(1))): a class whose only
    # box is found gets 1 / (1 + 2**-52) (test_pycocotools_epsilon_on_a_single_box_class)
    single = sum(c["num_gt"] == 1 for c in m["per_class"].values())
    print(f"shared DIOR sample: {len(gt['images'])} images, {len(gt['annotations'])} boxes, max_dets "
          f"{m['max_dets']}, mAP {m['mAP']!r} ({single} classes with a single box)")
    for key in ("mAP", "mAP50", "mAP75"):
        assert m[key] == (1.0 if not single else pytest.approx(1.0, rel=0, abs=1e-15))


def test_detector_keeps_as_many_detections_per_image_as_configured():
    from attrdist.core.config import DetectorConfig
    from attrdist.models.detector import build_detector

    assert DetectorConfig().detections_per_img is None is DetectorConfig.tiny().detections_per_img  # fitted (below)
    torch.manual_seed(0)
    image = torch.rand(3, 128, 128)
    counts = {}
    for n in (100, 150):
        cfg = DetectorConfig.tiny(score_thresh=0.0, detections_per_img=n)
        model = build_detector(cfg, ["a ship", "a vehicle", "a storage tank"], clip="tiny").eval()
        assert model.roi_heads.detections_per_img == n
        torch.manual_seed(1)
        with torch.no_grad():
            counts[n] = len(model([image])[0]["boxes"])
    assert counts == {100: 100, 150: 150}  # the limit is what bounds the output (random weights, 200 proposals x 3 classes)


def test_pycocotools_epsilon_on_a_single_box_class():
    """Why dior_like_gt gives every class two boxes: pycocotools' precision tp / (tp + fp + np.spacing(1))."""
    gt = {"images": [{"id": 1, "width": 800, "height": 800}], "categories": [{"id": 1, "name": "a"}],
          "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [10.0, 10.0, 20.0, 20.0]}]}
    m = coco_evaluate(gt, as_detections(gt), ["a"])
    assert m["mAP"] == 1 / (1 + np.spacing(1)) < 1.0
    gt["annotations"].append({"id": 2, "image_id": 1, "category_id": 1, "bbox": [50.0, 10.0, 20.0, 20.0]})
    assert coco_evaluate(gt, as_detections(gt), ["a"])["mAP"] == 1.0


def test_report_states_the_limit_and_why():
    from dataclasses import replace

    from attrdist.core.config import Config, DetectorConfig, ModelConfig
    from attrdist.tasks.detection import Task

    gt = dior_like_gt()
    d = coco_evaluate(gt, as_detections(gt), CLASS_NAMES)
    text = Task(Config()).limit_text(d)
    assert "counts up to 600 detections per image and class (maxDets=[1, 10, 600]" in text
    assert "densest image here has 600 ground-truth boxes (2 images have more than 100)" in text
    assert "The detector keeps up to 600 per image (model.detector.detections_per_img empty: fitted to the data, " \
           "max(100, its densest image's 600 boxes))" in text  # no pack here: fitted to the evaluated data
    capped = Task(replace(Config(), model=ModelConfig(detector=DetectorConfig(detections_per_img=100))))
    assert "keeps only 100 detections per image" in capped.limit_text(d)
    text = Task(Config()).limit_text(coco_evaluate(gt, as_detections(gt), CLASS_NAMES, max_dets=100))
    assert "up to 100 detections per image and class (maxDets=[1, 10, 100]" in text
    assert "fewer than the densest image's 600 ground-truth boxes (2 images have more than 100): recall is capped" in text
    sparse = {**gt, "images": gt["images"][2:], "annotations": [a for a in gt["annotations"] if a["image_id"] > 2]}
    assert "COCO's default; no image here has more than 100" in Task(Config()).limit_text(
        coco_evaluate(sparse, as_detections(sparse), CLASS_NAMES))


def test_the_detector_limit_is_fitted_to_the_pack(tmp_path):
    """detections_per_img empty: the task sets the built detector's limit to max(100, the pack's densest image),
    so a DIOR-dense pack keeps 600 per image and a sparse one COCO's 100; a value given is kept."""
    from dataclasses import replace
    from types import SimpleNamespace

    from attrdist.core.config import Config, DetectorConfig, ModelConfig
    from attrdist.models.detector import build_detector
    from attrdist.tasks.detection import Task

    def pack_of(gt: dict):
        (tmp_path / "coco_val.json").write_text(json.dumps(gt))
        return SimpleNamespace(root=tmp_path, attributes=CLASS_NAMES, data={"splits": {"val": {}}})

    model = build_detector(DetectorConfig.tiny(), ["a ship", "a vehicle"], clip="tiny")
    assert model.roi_heads.detections_per_img == 100  # before the task fits it
    gt = dior_like_gt()
    for data, cfg, want in ((gt, Config(), 600),
                            ({**gt, "annotations": [a for a in gt["annotations"] if a["image_id"] > 2]}, Config(), 100),
                            (gt, replace(Config(), model=ModelConfig(detector=DetectorConfig(detections_per_img=250))), 250)):
        task = Task(cfg, pack_of(data))
        task.base_prompts = ["a ship", "a vehicle"]
        task.prepare(model)
        assert model.roi_heads.detections_per_img == want
