"""Open-vocabulary detector (experiment 4): the full-size RN50 model's shapes and parameter counts,
a real training run of the tiny model on synthetic squares, COCO AP on a hand-made case with a
known answer, box-aware augmentation and the shard dataset, RemoteCLIP-format checkpoints."""

from __future__ import annotations

import io
import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from attrdist.data.detection import DetectionDataset, augment, collate
from attrdist.core.detection_eval import coco_evaluate, shuffled_labels, to_coco_detections
from attrdist.errors import AttrdistError
from attrdist.models.detector import (CropScorer, DetectorConfig, build_clip, build_detector, ensemble, layout_of,
                                      load_clip_checkpoint)

pytestmark = pytest.mark.recipes
PROMPTS = ["a satellite image of a ship", "a satellite image of an airplane", "a satellite image of a vehicle"]


# ----------------------------------------------------------------------------------------------
# full-size model
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rn50():
    torch.manual_seed(0)
    return build_detector(DetectorConfig(min_size=160, max_size=160), PROMPTS, clip="RN50")  # image size: no effect on counts


def test_full_size_rn50_parameters_and_frozen_text_tower(rn50):
    counts = rn50.param_counts()
    print("RN50 detector parameters:", counts)
    # open_clip RN50 text tower (63.7M) is frozen; trunk 23.5M + FPN over layer1-4 3.3M; RPN + RoI heads 15.5M
    assert 63e6 < counts["text"] < 64.5e6
    assert 26e6 < counts["image"] < 28e6
    assert 14e6 < counts["heads"] < 17e6
    assert counts["total"] == counts["text"] + counts["image"] + counts["heads"]
    assert counts["trainable"] == counts["total"] - counts["text"]
    assert not any(p.requires_grad for p in rn50.text.parameters())
    rn50.train()
    assert rn50.training and not rn50.text.training
    assert rn50.text.visual is None and not hasattr(rn50.backbone.body, "attnpool")
    assert rn50.roi_heads.box_predictor.class_embeddings.shape == (3, 1024)


def test_full_size_rn50_forward_shapes_and_set_classes(rn50):
    rn50.eval()
    with torch.no_grad():
        out = rn50([torch.rand(3, 100, 120)])
    assert len(out) == 1 and set(out[0]) == {"boxes", "labels", "scores"}
    n = out[0]["boxes"].shape[0]
    assert out[0]["boxes"].shape == (n, 4) and out[0]["scores"].shape == (n,) and n <= 100
    assert (out[0]["boxes"][:, 2] <= 120).all() and (out[0]["boxes"][:, 3] <= 100).all()  # input image pixels
    assert set(out[0]["labels"].tolist()) <= {1, 2, 3}
    predictor, roi = rn50.roi_heads.box_predictor, torch.randn(5, 1024)
    logits, deltas = predictor(roi)
    assert logits.shape == (5, 4) and deltas.shape == (5, 16)
    assert torch.equal(deltas[:, :4], deltas[:, 12:])  # class-agnostic boxes: unseen classes get boxes too
    rn50.set_classes(PROMPTS + ["a satellite image of a windmill", "a satellite image of a bridge"])
    logits, deltas = predictor(roi)
    assert rn50.num_classes == 5 and logits.shape == (5, 6) and deltas.shape == (5, 24)
    emb = predictor.class_embeddings
    assert torch.allclose(emb.norm(dim=1), torch.ones(5))
    assert torch.allclose(emb[:3], rn50.encode_prompts(PROMPTS), atol=1e-5)
    rn50.set_classes(PROMPTS)


# ----------------------------------------------------------------------------------------------
# tiny model: real training
# ----------------------------------------------------------------------------------------------


def squares(seed: int, n: int, size: int = 96) -> tuple[list[torch.Tensor], list[dict]]:
    """Noise images with 1-2 squares of 14-31 px: class 1 red, class 2 blue."""
    g = torch.Generator().manual_seed(seed)
    colours = {1: [1.0, 0.2, 0.2], 2: [0.2, 0.4, 1.0]}
    images, targets = [], []
    for _ in range(n):
        x = torch.rand(3, size, size, generator=g) * 0.3
        boxes, labels = [], []
        for _ in range(int(torch.randint(1, 3, (1,), generator=g))):
            s = int(torch.randint(14, 32, (1,), generator=g))
            x0, y0 = (int(v) for v in torch.randint(0, size - s, (2,), generator=g))
            c = int(torch.randint(1, 3, (1,), generator=g))
            x[:, y0:y0 + s, x0:x0 + s] = torch.tensor(colours[c])[:, None, None]
            boxes.append([x0, y0, x0 + s, y0 + s])
            labels.append(c)
        images.append(x)
        targets.append({"boxes": torch.tensor(boxes, dtype=torch.float32), "labels": torch.tensor(labels)})
    return images, targets


def coco_gt(targets: list[dict], size: int, names: list[str]) -> dict:
    anns = [{"id": len(targets) * k + i + 1, "image_id": i + 1, "category_id": int(lab), "bbox": [x0, y0, x1 - x0, y1 - y0]}
            for i, t in enumerate(targets)
            for k, ((x0, y0, x1, y1), lab) in enumerate(zip(t["boxes"].tolist(), t["labels"].tolist()))]
    return {"images": [{"id": i + 1, "width": size, "height": size} for i in range(len(targets))],
            "categories": [{"id": k + 1, "name": n} for k, n in enumerate(names)], "annotations": anns}


def test_tiny_detector_trains_and_detects_squares():
    torch.manual_seed(0)
    images, targets = squares(0, 16)
    model = build_detector(DetectorConfig.tiny(min_size=96, max_size=96), ["a red square", "a blue square"], clip="tiny")
    params = [p for p in model.parameters() if p.requires_grad]
    steps, batch = 60, 8
    opt = torch.optim.AdamW(params, 3e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 3e-3, total_steps=steps, pct_start=0.1)  # warm-up + cosine
    model.train()
    losses = []
    for step in range(steps):
        idx = [(step * batch + k) % len(images) for k in range(batch)]
        parts = model([images[k] for k in idx], [targets[k] for k in idx])
        assert set(parts) == {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}
        loss = sum(parts.values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    assert np.mean(losses[-5:]) < 0.3 * np.mean(losses[:3]), losses
    model.eval()
    test_images, test_targets = squares(1, 16)  # unseen images
    with torch.no_grad():
        outputs = model(test_images)
    dets = to_coco_detections(outputs, list(range(1, 17)), [1, 2])
    metrics = coco_evaluate(coco_gt(test_targets, 96, ["red", "blue"]), dets, ["red", "blue"])
    print("tiny detector on unseen squares:", {k: metrics[k] for k in ("mAP", "mAP50", "mAP75")},
          "shuffled-label baseline mAP50:", metrics["baseline"]["mAP50"])
    assert metrics["mAP50"] > 0.6
    assert metrics["mAP50"] > metrics["baseline"]["mAP50"] + 0.2


# ----------------------------------------------------------------------------------------------
# COCO evaluation: a hand-made case with a known answer
# ----------------------------------------------------------------------------------------------

HAND_GT = {
    "images": [{"id": 1, "width": 100, "height": 100}, {"id": 2, "width": 100, "height": 100}],
    "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}, {"id": 3, "name": "c"}],
    "annotations": [  # no "area"/"iscrowd": filled in by coco_evaluate
        {"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 10, 10]},    # a1
        {"id": 2, "image_id": 1, "category_id": 2, "bbox": [20, 20, 10, 10]},  # b1
        {"id": 3, "image_id": 2, "category_id": 1, "bbox": [0, 0, 10, 10]},    # a2
        {"id": 4, "image_id": 2, "category_id": 1, "bbox": [30, 30, 10, 10]},  # a3 (never detected)
    ],
}
HAND_DETS = [
    {"image_id": 1, "category_id": 1, "bbox": [0, 0, 10, 10], "score": 0.9},    # a1, perfect
    {"image_id": 1, "category_id": 1, "bbox": [0, 0, 10, 10], "score": 0.8},    # a1 again: duplicate
    {"image_id": 2, "category_id": 1, "bbox": [50, 50, 10, 10], "score": 0.7},  # false positive
    {"image_id": 2, "category_id": 1, "bbox": [0, 0, 10, 15], "score": 0.6},    # a2 with IoU 100/150 = 2/3
    {"image_id": 2, "category_id": 2, "bbox": [60, 60, 10, 10], "score": 0.95},  # false positive
    {"image_id": 1, "category_id": 2, "bbox": [70, 70, 5, 5], "score": 0.9},    # false positive
    {"image_id": 1, "category_id": 2, "bbox": [20, 20, 10, 10], "score": 0.5},  # b1, perfect
    {"image_id": 1, "category_id": 3, "bbox": [40, 40, 10, 10], "score": 0.99},  # class c has no GT
]


def test_coco_ap_hand_made_case():
    # COCO AP: 101 recall thresholds r = 0, .01, ..., 1; precision made non-increasing from the right;
    # at each r, the precision at the first rank whose recall >= r (0 if recall never reaches r).
    # Class a (3 GT), IoU thresholds .50-.65 (a2's detection, IoU 2/3, counts): ranks TP FP FP TP,
    #   recall 1/3 1/3 1/3 2/3, precision 1 1/2 1/3 1/2 -> 1 1/2 1/2 1/2.
    #   r in [0, .33] (34 points): 1; r in [.34, .66] (33): 1/2; r in [.67, 1] (34): 0 -> AP = 50.5/101 = 1/2.
    # Class a, IoU thresholds .70-.95 (6 of 10): TP FP FP FP, recall stays 1/3 -> AP = 34/101.
    #   AP_a(.50:.95) = (4 * 1/2 + 6 * 34/101) / 10 = 406/1010.
    # Class b (1 GT, boxes exact at every threshold): FP FP TP, recall 0 0 1, precision 0 0 1/3 -> 1/3
    #   everywhere -> AP = 1/3 at every IoU threshold.
    # Class c: no GT -> None, not averaged.
    ap_a, ap50_a, ap75_a, ap_b = 406 / 1010, 0.5, 34 / 101, 1 / 3
    m = coco_evaluate(HAND_GT, HAND_DETS, ["a", "b", "c"], novel={"b"})
    pc = m["per_class"]
    assert pc["a"]["AP"] == pytest.approx(ap_a, abs=1e-6)
    assert pc["a"]["AP50"] == pytest.approx(ap50_a, abs=1e-6)
    assert pc["a"]["AP75"] == pytest.approx(ap75_a, abs=1e-6)
    assert pc["b"]["AP"] == pytest.approx(ap_b, abs=1e-6) and pc["b"]["AP50"] == pytest.approx(ap_b, abs=1e-6)
    assert pc["c"] == {"AP": None, "AP50": None, "AP75": None, "num_gt": 0}
    assert [pc[n]["num_gt"] for n in "ab"] == [3, 1] and m["classes_without_gt"] == 1
    assert m["mAP"] == pytest.approx((ap_a + ap_b) / 2, abs=1e-6)
    assert m["mAP50"] == pytest.approx(5 / 12, abs=1e-6)
    assert m["mAP75"] == pytest.approx((ap75_a + ap_b) / 2, abs=1e-6)
    assert m["base"] == {"classes": 2, "mAP": pytest.approx(ap_a), "mAP50": pytest.approx(0.5)}  # a (c: no GT)
    assert m["novel"] == {"classes": 1, "mAP": pytest.approx(ap_b), "mAP50": pytest.approx(ap_b)}
    assert m["num_detections"] == 8 and m["num_images"] == 2
    assert HAND_DETS[0] == {"image_id": 1, "category_id": 1, "bbox": [0, 0, 10, 10], "score": 0.9}  # not mutated


def test_coco_eval_no_detections_perfect_detections_and_baseline():
    m = coco_evaluate(HAND_GT, [], ["a", "b", "c"])
    assert (m["mAP"], m["mAP50"], m["per_class"]["a"]["AP"], m["per_class"]["c"]["AP"]) == (0.0, 0.0, 0.0, None)
    assert m["baseline"]["mAP50"] == 0.0 and m["novel"] == {"classes": 0, "mAP": None, "mAP50": None}
    # 10 images, one box each, 5 per class: perfect detections score 1, shuffled labels do not
    gt = {"images": [{"id": i, "width": 50, "height": 50} for i in range(1, 11)],
          "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}],
          "annotations": [{"id": i, "image_id": i, "category_id": 1 + i % 2, "bbox": [5, 5, 20, 20]} for i in range(1, 11)]}
    dets = [{**{k: a[k] for k in ("image_id", "category_id", "bbox")}, "score": 1.0} for a in gt["annotations"]]
    m = coco_evaluate(gt, dets, ["a", "b"])
    assert m["mAP"] == pytest.approx(1.0) and m["baseline"]["mAP50"] < 0.9
    assert sorted(d["category_id"] for d in shuffled_labels(dets)) == sorted(d["category_id"] for d in dets)
    with pytest.raises(AttrdistError, match="not a category"):
        coco_evaluate(gt, dets, ["a", "zebra"])
    with pytest.raises(AttrdistError, match="image ids absent"):
        coco_evaluate(gt, [{**dets[0], "image_id": 99}], ["a", "b"])


def test_to_coco_detections_maps_labels_and_scales_back():
    out = [{"boxes": torch.tensor([[10.0, 20.0, 30.0, 60.0]]), "labels": torch.tensor([2]), "scores": torch.tensor([0.5])}]
    assert to_coco_detections(out, [7], [11, 12], scales=[0.5]) == [
        {"image_id": 7, "category_id": 12, "bbox": [20.0, 40.0, 40.0, 80.0], "score": 0.5}]


# ----------------------------------------------------------------------------------------------
# detection data
# ----------------------------------------------------------------------------------------------


def test_augment_moves_boxes_with_pixels_over_the_whole_symmetry_group():
    image = torch.zeros(3, 40, 60, dtype=torch.uint8)
    image[:, 5:15, 10:30] = 255  # rows 5..14, columns 10..29
    box = torch.tensor([[10.0, 5.0, 30.0, 15.0]])
    seen = set()
    for key in range(40):
        out, boxes = augment(image, box, key, jitter=0.0)
        ys, xs = torch.nonzero(out[0] > 127, as_tuple=True)
        assert boxes.tolist() == [[xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1]]
        seen.add((tuple(out.shape), tuple(boxes[0].tolist())))
    assert len(seen) == 8  # every flip/rotation of the square's symmetry group occurs
    a, b = augment(image, box, 3), augment(image, box, 3)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])  # pure function of the key
    assert not torch.equal(augment(image, box, 4)[0], a[0])


def _jpeg(w: int, h: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


class ListReader(list):
    """Stands in for attrdist.data.reader.ShardReader (reader[i] -> {"jpg": bytes, "json": bytes})."""


def _reader() -> ListReader:
    meta = {"image_id": 42, "width": 80, "height": 40, "boxes": [[4, 6, 10, 8], [40, 10, 20, 20], [60, 0, 20, 40]],
            "box_labels": [0, 5, 2]}
    return ListReader([{"__key__": "00042", "jpg": _jpeg(80, 40), "json": json.dumps(meta).encode()},
                       {"__key__": "00043", "jpg": b"not a jpeg", "json": json.dumps(meta).encode()}])


def test_detection_dataset_labels_novel_drop_scaling_and_corrupt_items():
    ds = DetectionDataset(_reader(), seed=0, train=False)
    s = ds[(0, 0)]
    assert s["valid"] and s["image"].shape == (3, 40, 80) and s["image"].dtype == torch.float32
    assert s["target"]["boxes"].tolist() == [[4, 6, 14, 14], [40, 10, 60, 30], [60, 0, 80, 40]]
    assert s["target"]["labels"].tolist() == [1, 6, 3] and s["image_id"] == 42 and s["scale"] == 1.0
    base = DetectionDataset(_reader(), seed=0, train=False, classes=[2, 0], max_side=40)  # class 5 held out
    s = base[(0, 0)]
    assert s["image"].shape == (3, 20, 40) and s["scale"] == 0.5
    assert s["target"]["labels"].tolist() == [2, 1] and s["target"]["boxes"].tolist() == [[2, 3, 7, 7], [30, 0, 40, 20]]
    train = DetectionDataset(_reader(), seed=0, train=True)
    assert torch.equal(train[(0, 1)]["image"], train[(0, 1)]["image"])
    assert not torch.equal(train[(0, 1)]["image"], train[(0, 2)]["image"])  # epoch is part of the key
    bad = ds[(1, 0)]
    assert not bad["valid"] and "00043" in bad["error"] and bad["target"]["boxes"].shape == (0, 4)
    batch = collate([ds[(0, 0)], bad, ds[(-1, 0)]])
    assert batch["valid"].tolist() == [True, False, False] and len(batch["images"]) == 3
    assert batch["image_ids"] == [42, -1, -1] and len(batch["errors"]) == 1


# ----------------------------------------------------------------------------------------------
# RemoteCLIP-format checkpoints
# ----------------------------------------------------------------------------------------------


def test_remoteclip_format_checkpoint_reloads_into_the_towers(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(1)
    source, _ = build_clip("tiny")
    state = {k: v.clone() for k, v in source.state_dict().items()}
    pt, st = tmp_path / "RemoteCLIP-tiny.pt", tmp_path / "tiny.safetensors"
    torch.save({"state_dict": state, "epoch": 10}, pt)  # nested, as training scripts save it
    save_file(state, str(st))
    for path in (pt, st):
        model = build_detector(DetectorConfig.tiny(), PROMPTS, clip="tiny", checkpoint=str(path))
        own = model.state_dict()
        for k, v in state.items():
            target = f"backbone.body.{k[len('visual.'):]}" if k.startswith("visual.") else f"text.{k}"
            if k.startswith("visual.attnpool") or k.endswith("num_batches_tracked"):
                assert target not in own  # the attention pool is not used; BatchNorm is frozen
                continue
            assert torch.equal(own[target], v), k
        assert type(model.backbone.body.bn1).__name__ == "FrozenBatchNorm2d"  # weights loaded -> frozen BN
        for k, v in state.items():  # ... and a frozen copy of the whole image tower scores crops
            if k.startswith("visual.") and not k.endswith("num_batches_tracked"):
                assert torch.equal(own[f"crop_scorer.{k}"], v), k
        with torch.no_grad():
            source.eval()
            import open_clip

            expected = source.encode_text(open_clip.get_tokenizer("RN50")(PROMPTS), normalize=True)
        assert torch.allclose(model.roi_heads.box_predictor.class_embeddings, expected, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# CLIP crop scores (ViLD ensemble) and the checkpoint layout
# ----------------------------------------------------------------------------------------------


def test_ensemble_hand_computed():
    det = torch.tensor([[0.5, 0.4, 0.1],  # background, base class, novel class
                        [0.0, 0.9, 0.1]])
    clip = torch.tensor([[0.2, 0.8], [0.1, 0.9]])
    out = ensemble(det, clip, torch.tensor([0.35, 0.65])).exp()
    # 0.4^0.65 * 0.2^0.35 = 0.3138, 0.1^0.35 * 0.8^0.65 = 0.3864, background keeps 1 - 0.7002
    assert torch.allclose(out[0], torch.tensor([0.2998, 0.3138, 0.3864]), atol=1e-4)
    assert out[0, 2] > out[0, 1]  # the detector's background-ish novel class is ranked up by a confident CLIP
    # more than all the mass: renormalised, background 0
    assert torch.allclose(ensemble(det[1:], clip[1:], torch.tensor([0.0, 1.0])).exp(), torch.tensor([[0.0, 0.5, 0.5]]),
                          atol=1e-5)
    # weight 0: the detector's own probabilities
    assert torch.allclose(ensemble(det, clip, torch.zeros(2)).exp(), det.clamp_min(1e-12), atol=1e-6)


def test_crops_are_squares_inside_the_image_as_pretraining_cut_them():
    """The scorer's crops (roi_align on the normalised tensor) match clip_pretrain.crop (PIL, the pairs
    the demo CLIP learnt from) for the same box, also where the square must shift inside the image."""
    from attrdist.demo import clip_pretrain as cp

    yy, xx = np.mgrid[0:96, 0:128]
    pixels = np.stack([xx * 2, yy * 2, (xx + yy) % 256], -1).astype(np.uint8)  # smooth, asymmetric
    image = Image.fromarray(pixels)
    clip, _ = build_clip("tiny")
    scorer = CropScorer(clip.visual, margin=1.375)
    tensor = cp.to_tensor([pixels])  # CLIP-normalised [1, 3, 96, 128]
    for x, y, w, h in [(40, 30, 20, 12), (2, 3, 30, 20), (100, 70, 26, 24)]:  # centre, top-left and bottom-right corners
        ours = scorer.crops(tensor, [(96, 128)], [torch.tensor([[x, y, x + w, y + h]], dtype=torch.float32)])
        theirs = cp.to_tensor([cp.crop(image, np.array([x, y, w, h], float), scorer.size, None, cp.ClipPretrainSpec())])
        assert ours.shape == theirs.shape == (1, 3, 128, 128)
        assert (ours - theirs).abs().mean() < 0.05, (x, y, w, h)


def test_checkpoint_layout_rebuilds_the_same_detector(tmp_path):
    """A checkpoint of a detector with frozen BatchNorm and the crop scorer rebuilds without any CLIP
    file (as `attrdist predict` does) and detects identically; its eval path runs the ensemble."""
    from safetensors.torch import save_file

    torch.manual_seed(2)
    source, _ = build_clip("tiny")
    path = tmp_path / "clip.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    cfg = DetectorConfig.tiny(min_size=96, max_size=96, score_thresh=0.0)
    model = build_detector(cfg, PROMPTS, clip="tiny", checkpoint=str(path)).eval()
    model.set_classes(PROMPTS, novel=PROMPTS[2:])
    assert model.crop_weight.tolist() == pytest.approx([0.35, 0.35, 0.65])
    state = model.state_dict()
    assert layout_of(state) == {"frozen_bn": True, "clip_crops": True}
    again = build_detector(cfg, PROMPTS, clip="tiny", state=state)
    again.load_state_dict(state)  # strict: same keys, same shapes
    again.eval().set_classes(PROMPTS, novel=PROMPTS[2:])
    images = [torch.rand(3, 96, 96), torch.rand(3, 80, 96)]
    with torch.no_grad():
        a, b = model(images), again(images)
    for x, y in zip(a, b):
        assert len(x["boxes"]) > 0 and torch.equal(x["labels"], y["labels"])
        assert torch.allclose(x["boxes"], y["boxes"]) and torch.allclose(x["scores"], y["scores"])
    plain = build_detector(cfg, PROMPTS, clip="tiny")  # random CLIP: no crop scorer, BatchNorm trained
    assert plain.crop_scorer is None and layout_of(plain.state_dict()) == {"frozen_bn": False, "clip_crops": False}


def test_mismatched_or_foreign_checkpoints_are_reported(tmp_path, caplog):
    clip, _ = build_clip("tiny")
    state = clip.state_dict()
    state["token_embedding.weight"] = state["token_embedding.weight"][:100]
    del state["visual.layer1.0.conv1.weight"]
    state["module.bogus.weight"] = torch.zeros(2)  # DDP prefix stripped, then unexpected
    path = tmp_path / "partial.pt"
    torch.save(state, path)
    fresh, _ = build_clip("tiny")
    with caplog.at_level(logging.WARNING, logger="attrdist"):
        report = load_clip_checkpoint(fresh, path)
    assert report.missing == ["visual.layer1.0.conv1.weight"]
    assert report.unexpected == ["bogus.weight"]
    assert report.mismatched == [("token_embedding.weight", (100, 64), (49408, 64))]
    table = caplog.text
    assert "shape mismatch" in table and "token_embedding.weight" in table and "(100, 64) (49408, 64)" in table
    assert "visual.layer1.0.conv1.weight" in table and "bogus.weight" in table
    torch.save({"encoder.weight": torch.zeros(3)}, tmp_path / "foreign.pt")
    with pytest.raises(AttrdistError, match="foreign.pt: no tensor matches"):
        build_detector(DetectorConfig.tiny(), PROMPTS, clip="tiny", checkpoint=str(tmp_path / "foreign.pt"))
    (tmp_path / "garbage.pt").write_bytes(b"\x00garbage")
    with pytest.raises(AttrdistError, match="garbage.pt"):
        build_detector(DetectorConfig.tiny(), PROMPTS, clip="tiny", checkpoint=str(tmp_path / "garbage.pt"))
    with pytest.raises(AttrdistError, match="freeze_bn=true needs model.pretrained"):
        build_detector(DetectorConfig.tiny(freeze_bn=True), PROMPTS, clip="tiny")


def test_real_dior_shards_round_trip_through_dataset_and_eval(tmp_path):
    """Pack the real DIOR sample, read it back at 128 px, and score its own (scaled) boxes: mAP 1."""
    from attrdist.pack.dior import CLASS_NAMES, pack_dior
    from attrdist.data.reader import ShardReader, load_manifest
    from tests.conftest import SHARED_DATA

    root = SHARED_DATA / "dior"
    if not (root / "JPEGImages-trainval" / "00001.jpg").is_file():
        pytest.skip(f"{root}: the shared DIOR sample is not here")
    pack_dior(root, tmp_path / "shards", workers=1, progress=False, max_dropped=1)
    manifest = load_manifest(tmp_path / "shards")
    ds = DetectionDataset(ShardReader(manifest, "train"), seed=0, train=True, max_side=128)
    s = ds[(0, 0)]
    assert s["valid"] and s["image"].shape == (3, 128, 128) and s["scale"] == pytest.approx(0.16)
    gt = json.loads((tmp_path / "shards" / "coco_train.json").read_text())
    assert len(s["target"]["boxes"]) == len(gt["annotations"]) > 0
    eval_ds = DetectionDataset(ShardReader(manifest, "train"), seed=0, train=False, max_side=128)
    batch = collate([eval_ds[(0, 0)]])
    outputs = [{**t, "scores": torch.ones(len(t["labels"]))} for t in batch["targets"]]  # the truth as detections
    dets = to_coco_detections(outputs, batch["image_ids"], list(range(1, 21)), batch["scales"])
    m = coco_evaluate(gt, dets, CLASS_NAMES)
    present = {a["category_id"] for a in gt["annotations"]}
    assert m["mAP"] == pytest.approx(1.0) and m["classes_without_gt"] == 20 - len(present)


def test_a_rank_whose_samples_all_failed_reports_the_same_loss_parts():
    """The step's all-reduce sums one tensor of [loss, *parts, flags] over ranks: a rank whose whole slice of the
    batch failed to decode must send the same parts (zeros), or the tensors differ in length across ranks."""
    import contextlib

    from attrdist.tasks.base import StepEnv
    from attrdist.tasks.detection import LOSS_PARTS, Task

    torch.manual_seed(0)
    images, targets = squares(0, 2)
    model = build_detector(DetectorConfig.tiny(min_size=96, max_size=96), ["a red square", "a blue square"], clip="tiny")
    model.train()
    env = StepEnv(torch.device("cpu"), contextlib.nullcontext, torch.contiguous_format, None)
    batch = {"images": images, "targets": targets, "valid": torch.tensor([True, True])}
    task = Task.__new__(Task)  # forward_loss needs no config or manifest
    loss, parts = task.forward_loss(model, batch, env)
    assert tuple(parts) == LOSS_PARTS and loss.item() > 0
    loss, parts = task.forward_loss(model, {**batch, "valid": torch.tensor([False, False])}, env)
    assert tuple(parts) == LOSS_PARTS and all(v.item() == 0 for v in parts.values()) and loss.item() == 0
    loss.backward()  # still a graph over the trainable parameters: DDP's backward hooks fire on every rank
