"""COCO-style detection metrics through pycocotools, with base/novel class groups and a baseline.

    gt = json.load(open(shards / "coco_val.json"))                      # COCO instances dict
    dets = to_coco_detections(model_outputs, image_ids, category_ids)   # or your own list of dicts
    m = coco_evaluate(gt, dets, class_names, novel={"windmill", "bridge"})
    m["mAP"], m["mAP50"], m["mAP75"]          # over the classes that have ground truth
    m["per_class"]["ship"]                    # {"AP", "AP50", "AP75", "num_gt"}; APs None without GT
    m["base"]["mAP50"], m["novel"]["mAP50"]   # the same averages within each group (None if empty)
    m["baseline"]["mAP50"]                    # the shuffled-label baseline (below)
    m["max_dets"], m["max_gt_per_image"]      # the per-image detection limit used (below)

Detections are dicts `{"image_id", "category_id", "bbox": [x, y, w, h], "score"}` in the pixels of
the ground-truth images; `class_names` are category names of `gt` (the evaluated classes, in the
order per_class lists them). AP follows COCOeval exactly: 101-point interpolated precision,
IoU thresholds 0.50:0.05:0.95, all areas, the `max_dets` highest-scoring detections per image
and class; mAP averages the classes with >= 1 ground-truth box (`classes_without_gt` counts the others).

Detection limit: COCOeval's default `maxDets=[1, 10, 100]` (AP at the last) caps recall on dense
images: DIOR images hold up to several hundred boxes, and on such an image even the ground truth
scored against itself gets AP < 1 (tests/test_detection_eval.py). So by default `max_dets` = max(100, the most
ground-truth boxes any evaluated image has), which keeps COCO's 100 on COCO-like data and makes the
ground truth against itself exactly 1.0 on any data; pass `max_dets` to fix it (e.g. 100 to compare
with numbers reported under COCO's default). COCOeval runs with `params.maxDets = [1, 10, max_dets]`
(the entries below max_dets) and AP is read at max_dets. The result states `max_dets`,
`max_gt_per_image` and `images_over_100_gt` (images with more than 100 ground-truth boxes).

Baseline ("shuffled labels"): the same boxes and scores with their category ids permuted across
all detections (seeded). It keeps the localisation and the predicted class frequencies and
destroys the class decision, so the gap between the model and it is what classifying regions
against the class prompts contributes; a model at the baseline only finds "objects".

pycocotools' printing is captured; `loadRes([])` (which crashes in pycocotools) is handled: no
detections scores 0 AP for every class with ground truth.
"""

from __future__ import annotations

import contextlib
import io

import numpy as np
from torchvision.ops import box_convert

from attrdist.core import rng as rnglib
from attrdist.errors import AttrdistError

IOU_50, IOU_75 = 0, 5  # indices of 0.50 and 0.75 in COCOeval's iouThrs
COCO_MAX_DETS = 100  # COCOeval's default per-image limit (the last of its maxDets=[1, 10, 100])


def to_coco_detections(outputs: list[dict], image_ids: list[int], category_ids: list[int],
                       scales: list[float] | None = None) -> list[dict]:
    """torchvision detector outputs (boxes xyxy, labels 1..C, scores) -> COCO result dicts.

    `category_ids[label - 1]` is the COCO category of label; `scales[i]` (input px per gt px, from
    detection_data) maps boxes back to the ground-truth image."""
    dets = []
    for i, (out, image_id) in enumerate(zip(outputs, image_ids)):
        boxes = box_convert(out["boxes"].detach().float().cpu(), "xyxy", "xywh") / (scales[i] if scales else 1.0)
        for box, label, score in zip(boxes.tolist(), out["labels"].tolist(), out["scores"].tolist()):
            dets.append({"image_id": int(image_id), "category_id": int(category_ids[label - 1]),
                         "bbox": [round(v, 2) for v in box], "score": round(float(score), 5)})
    return dets


def _coco_gt(gt: dict):
    from pycocotools.coco import COCO

    anns = [{**a, "area": a.get("area", a["bbox"][2] * a["bbox"][3]), "iscrowd": a.get("iscrowd", 0)}
            for a in gt.get("annotations", [])]
    coco = COCO()
    coco.dataset = {"images": list(gt["images"]), "categories": list(gt["categories"]), "annotations": anns}
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def _coco_results(coco_gt, detections: list[dict]):
    from pycocotools.coco import COCO

    unknown = {d["image_id"] for d in detections} - set(coco_gt.getImgIds())
    if unknown:
        raise AttrdistError(f"detections name image ids absent from the ground truth (e.g. {sorted(unknown)[0]}); "
                            f"evaluate against the instances file of the same split")
    with contextlib.redirect_stdout(io.StringIO()):
        if detections:  # loadRes mutates its input: give it copies
            return coco_gt.loadRes([{**d, "bbox": [float(v) for v in d["bbox"]]} for d in detections])
        dt = COCO()
        dt.dataset = {"images": coco_gt.dataset["images"], "categories": coco_gt.dataset["categories"],
                      "annotations": []}
        dt.createIndex()
        return dt


def gt_boxes_per_image(gt: dict) -> dict[int, int]:
    """Ground-truth boxes of each image listed in `gt` (crowd boxes included, as COCOeval keeps them)."""
    counts = {int(im["id"]): 0 for im in gt["images"]}
    for a in gt.get("annotations", []):
        if int(a["image_id"]) in counts:
            counts[int(a["image_id"])] += 1
    return counts


def default_max_dets(gt: dict) -> int:
    """max(100, the most ground-truth boxes any image of `gt` has): COCO's limit unless the data is denser."""
    return max([COCO_MAX_DETS, *gt_boxes_per_image(gt).values()])


def _precision(coco_gt, detections: list[dict], cat_ids: list[int], max_dets: int) -> np.ndarray:
    """COCOeval precision [T iou thresholds, R=101 recall points, K classes] (all areas, `max_dets`
    detections per image); -1 = no GT."""
    from pycocotools.cocoeval import COCOeval

    ev = COCOeval(coco_gt, _coco_results(coco_gt, detections), iouType="bbox")
    ev.params.catIds = list(cat_ids)
    ev.params.maxDets = [m for m in (1, 10) if m < max_dets] + [max_dets]  # AP is read at the last
    with contextlib.redirect_stdout(io.StringIO()):
        ev.evaluate()
        ev.accumulate()
    return ev.eval["precision"][:, :, :, 0, -1]


def _mean(p: np.ndarray) -> float | None:
    return float(p.mean()) if p.size and (p > -1).all() else None


def _group_mean(values: list[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return float(np.mean(kept)) if kept else None


def _summarise(prec: np.ndarray, class_names: list[str], novel: set[str]) -> dict:
    per_class = {n: {"AP": _mean(prec[:, :, k]), "AP50": _mean(prec[IOU_50, :, k]), "AP75": _mean(prec[IOU_75, :, k])}
                 for k, n in enumerate(class_names)}
    out = {m: _group_mean([c[key] for c in per_class.values()])
           for m, key in (("mAP", "AP"), ("mAP50", "AP50"), ("mAP75", "AP75"))}
    for group, members in (("base", [n for n in class_names if n not in novel]), ("novel", sorted(novel))):
        out[group] = {"classes": len(members), "mAP": _group_mean([per_class[n]["AP"] for n in members]),
                      "mAP50": _group_mean([per_class[n]["AP50"] for n in members])}
    return {**out, "per_class": per_class}


def shuffled_labels(detections: list[dict], seed: int = 0) -> list[dict]:
    """The baseline: category ids permuted across the detections (boxes and scores unchanged)."""
    perm = rnglib.generator(seed).permutation(len(detections))
    return [{**d, "category_id": detections[j]["category_id"]} for d, j in zip(detections, perm)]


def coco_evaluate(gt: dict, detections: list[dict], class_names: list[str], novel=(), seed: int = 0,
                  max_dets: int | None = None) -> dict:
    """mAP, mAP50, mAP75, per-class AP/AP50/AP75, base/novel group means and the shuffled-label baseline,
    counting up to `max_dets` detections per image (None: `default_max_dets(gt)`, see the module doc)."""
    if max_dets is not None and (isinstance(max_dets, bool) or not isinstance(max_dets, (int, np.integer))
                                 or max_dets < 1):
        raise AttrdistError(f"max_dets={max_dets!r}: give a positive number of detections per image (or None)")
    per_image = gt_boxes_per_image(gt)
    max_dets = default_max_dets(gt) if max_dets is None else int(max_dets)
    coco_gt = _coco_gt(gt)
    by_name = {c["name"]: c["id"] for c in gt["categories"]}
    missing = [n for n in class_names if n not in by_name]
    if missing:
        raise AttrdistError(f"class {missing[0]!r} is not a category of the ground truth (has: {', '.join(by_name)})")
    novel = set(novel)
    if not novel <= set(class_names):
        raise AttrdistError(f"novel class {sorted(novel - set(class_names))[0]!r} is not among the evaluated classes")
    cat_ids = [by_name[n] for n in class_names]
    result = _summarise(_precision(coco_gt, detections, cat_ids, max_dets), class_names, novel)
    for n, cid in zip(class_names, cat_ids):
        result["per_class"][n]["num_gt"] = len(coco_gt.getAnnIds(catIds=[cid], iscrowd=False))
    result["classes_without_gt"] = sum(c["num_gt"] == 0 for c in result["per_class"].values())
    result["num_images"], result["num_detections"] = len(coco_gt.getImgIds()), len(detections)
    result["max_dets"] = max_dets
    result["max_gt_per_image"] = max(per_image.values(), default=0)
    result["images_over_100_gt"] = sum(n > COCO_MAX_DETS for n in per_image.values())
    base = _summarise(_precision(coco_gt, shuffled_labels(detections, seed), cat_ids, max_dets), class_names, novel)
    result["baseline"] = {"name": "shuffled labels", **{k: v for k, v in base.items() if k != "per_class"}}
    return result

