"""detection: boxes. torchvision's detection losses come out of the model; evaluation is COCO mAP through
pycocotools (attrdist.core.detection_eval), base and novel classes separately, each beside the
shuffled-label baseline (same boxes and scores, class decisions permuted).

    python recipes/dior_remoteclip.py                 # data.task=detection

Open-vocabulary protocol: `data.novel_classes` are held out of training (their boxes are dropped, so
those objects are background), the model classifies regions against the frozen text embeddings of the
*base* prompts while training, and against every class's prompt when it is evaluated.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch

from attrdist.core.detection_eval import COCO_MAX_DETS, coco_evaluate, to_coco_detections
from attrdist.data.detection import DetectionDataset, collate
from attrdist.errors import AttrdistError
from attrdist.pack.dior import prompt
from attrdist.tasks.base import EvalBatch, EvalOutputs, StepEnv
from attrdist.tasks.base import Task as BaseTask
from attrdist.tasks.base import fmt

METRICS = (("mAP", "mAP @ IoU 0.50:0.95"), ("mAP50", "mAP @ IoU 0.50"), ("mAP75", "mAP @ IoU 0.75"))


# torchvision's Faster R-CNN training losses (RPN + RoI heads), without their "loss_" prefix, sorted: the parts
# every rank reports each step, also a rank whose samples all failed to decode
LOSS_PARTS = ("box_reg", "classifier", "objectness", "rpn_box_reg")

class Task(BaseTask):
    kind = "detection"
    headline = "mAP50"
    gathers_objects = True

    def __init__(self, cfg, manifest=None):
        super().__init__(cfg, manifest)
        if manifest is None:
            return
        names = list(manifest.attributes)
        unknown = [n for n in cfg.data.novel_classes if n not in names]
        if unknown:
            raise AttrdistError(f"data.novel_classes: {unknown[0]!r} is not a class of {manifest.root} "
                                f"(classes: {', '.join(names)})")
        self.names, self.novel = names, list(cfg.data.novel_classes)
        self.base = [i for i, n in enumerate(names) if n not in self.novel]
        self.all_prompts = [prompt(n) for n in names]
        self.base_prompts = [self.all_prompts[i] for i in self.base]
        self.novel_prompts = [prompt(n) for n in self.novel]
        self.densest = densest_image(manifest)

    def detections_per_img(self, densest_eval: int = 0) -> int:
        """The detector's own per-image output limit: model.detector.detections_per_img, or fitted to the pack
        (max(100, its densest image's boxes)) when that is empty."""
        n = self.cfg.model.detector.detections_per_img
        return n if n is not None else max(COCO_MAX_DETS, getattr(self, "densest", 0) or densest_eval)

    def describe(self) -> str:
        return (f"open-vocabulary split: {len(self.base)} base classes trained; {len(self.novel)} novel classes held "
                f"out ({', '.join(self.novel) or 'none'}): their boxes are background in training and they are "
                f"detected at test time through their prompts only")

    # ------------------------------------------------------------------ data and model
    def dataset(self, reader, *, train: bool, pixels_in_workers: bool = False, image_dtype=None):
        return DetectionDataset(reader, self.cfg.run.seed, train, classes=self.base if train else None)

    def collate(self, samples: list[dict]) -> dict:
        return collate(samples)

    def prepare(self, model) -> None:
        model.set_classes(self.base_prompts)  # the class embeddings follow the (loaded) text tower
        model.roi_heads.detections_per_img = self.detections_per_img()

    @contextlib.contextmanager
    def eval_mode(self, model):
        model.set_classes(self.all_prompts, novel=self.novel_prompts)
        try:
            yield
        finally:
            model.set_classes(self.base_prompts)

    @staticmethod
    def _valid(batch: dict, dev) -> tuple[list[torch.Tensor], list[dict], list[int]]:
        keep = [i for i, v in enumerate(batch["valid"].tolist()) if v]
        images = [batch["images"][i].to(dev, non_blocking=True) for i in keep]
        targets = [{k: v.to(dev) for k, v in batch["targets"][i].items()} for i in keep]
        return images, targets, keep

    def forward_loss(self, model, batch: dict, env: StepEnv) -> tuple[torch.Tensor, dict]:
        images, targets, _ = self._valid(batch, env.device)
        if not images:  # every sample of this rank's batch failed to decode: a zero loss keeps ranks in step, and
            # zero parts under the same names (the step's all-reduce sums one tensor of the loss and its parts:
            # a rank without them would send a shorter one)
            zero = sum(p.sum() for p in model.parameters() if p.requires_grad) * 0.0
            return zero, {k: zero.detach().float() for k in LOSS_PARTS}
        with env.autocast():
            losses = model(images, targets)
        parts = {k.removeprefix("loss_"): v.detach().float() for k, v in sorted(losses.items())}
        if tuple(parts) != LOSS_PARTS:
            raise RuntimeError(f"the detector's losses are {tuple(parts)}, not {LOSS_PARTS}: update LOSS_PARTS")
        return sum(losses.values()), parts

    def eval_batch(self, model, batch: dict, env: StepEnv) -> EvalBatch:
        images, _, keep = self._valid(batch, env.device)
        if not images:
            return EvalBatch()
        with env.autocast():
            outputs = model(images)
        return EvalBatch(objects=to_coco_detections(outputs, [batch["image_ids"][i] for i in keep],
                                                    list(range(1, len(self.names) + 1)),
                                                    [batch["scales"][i] for i in keep]))

    def inference_input(self, ds, n: int, batch: int, env: StepEnv):
        return [ds[(i, 0)]["image"].to(env.device) for i in range(batch)]

    # ------------------------------------------------------------------ metrics
    def ground_truth(self, reader, n: int) -> dict:
        """coco_<split>.json of the pack, cut to the images of the first `n` samples when fewer are evaluated."""
        split = reader.split
        path = Path(self.manifest.root) / f"coco_{split}.json"
        if not path.is_file():
            raise AttrdistError(f"{path}: missing; detection shards carry coco_<split>.json (repack with shards/dior.py)")
        gt = json.loads(path.read_text())
        if n < len(gt["images"]):
            ids = {int(json.loads(reader[i]["json"])["image_id"]) for i in range(n)}
            gt = {**gt, "images": [im for im in gt["images"] if im["id"] in ids],
                  "annotations": [a for a in gt["annotations"] if a["image_id"] in ids]}
        return gt

    def evaluate(self, split: str, outputs: EvalOutputs, *, tune: bool = False) -> tuple[dict, dict]:
        gt = self.ground_truth(outputs.reader, outputs.n)
        res = coco_evaluate(gt, outputs.objects, self.names, novel=self.novel, seed=self.cfg.run.seed)
        rec: dict = {f"{split}/images_per_s": len(gt["images"]) / max(outputs.seconds, 1e-9),
                     f"{split}/corrupt": outputs.corrupt}
        for key, _ in METRICS:
            rec[f"{split}/{key}"] = _num(res[key])
            rec[f"{split}/{key}:shuffled"] = _num(res["baseline"][key])
        for group in ("base", "novel"):
            if res[group]["classes"]:
                for key in ("mAP", "mAP50"):
                    rec[f"{split}/{group}/{key}"] = _num(res[group][key])
                    rec[f"{split}/{group}/{key}:shuffled"] = _num(res["baseline"][group][key])
        return rec, res

    def headline_keys(self, split: str) -> list[str]:
        return [f"{split}/mAP50"] + [f"{split}/{g}/mAP50" for g in ("base", "novel") if g != "novel" or self.novel]

    # ------------------------------------------------------------------ report
    def headline_text(self, results: dict) -> str:
        d = results["val"]["_details"]
        s = f"val mAP@50 = {fmt(d['mAP50'])} (shuffled-label baseline {fmt(d['baseline']['mAP50'])})"
        if d["novel"]["classes"]:
            s += (f"; base {fmt(d['base']['mAP50'])}, novel {fmt(d['novel']['mAP50'])} "
                  f"(baseline {fmt(d['baseline']['novel']['mAP50'])})")
        return s

    def report_header(self, n_train: int, model=None) -> list[str]:
        m = self.manifest
        return [f"- data: `{m.root}` (dataset `{m.data['dataset']}`, {len(m.attributes)} classes, "
                f"{n_train} training images)  ",
                f"- novel classes (no training boxes; detected through their prompts only): "
                f"{', '.join(self.novel) or 'none'}  ",
                f"- scores: {self.scoring(model)}  "]

    def scoring(self, model) -> str:
        d = self.cfg.model.detector
        if model is None or model.crop_scorer is None:
            return ("the region classifier alone (no CLIP crop scores: no pretrained CLIP, or "
                    "model.detector.clip_crops=false)")
        return (f"ViLD ensemble of the region classifier and the frozen CLIP on crops of the {d.crop_topk} best "
                f"proposals per image, det^(1-w) * clip^w with w = {d.crop_weight_base} (base), "
                f"{d.crop_weight_novel} (novel)")

    def report_sections(self, results: dict, run_dir, recipe: str) -> list[str]:
        L = ["## Headline", "", f"**{self.headline_text(results)}**", "",
             "Baseline: the model's own boxes and scores with their class labels permuted across detections: it keeps "
             "localisation and class frequencies and removes the class decision.", ""]
        novel = self.novel
        for split, res in results.items():
            d = res["_details"]
            L += [f"## {split} ({d['num_images']} images, {d['num_detections']} detections; COCOeval, up to "
                  f"{d.get('max_dets', 100)} per image and class)", "", self.limit_text(d), "",
                  "| metric | model | shuffled-label baseline |", "| --- | ---: | ---: |"]
            L += [f"| {label} | {fmt(d[key])} | {fmt(d['baseline'][key])} |" for key, label in METRICS]
            for group in ("base", "novel"):
                with_gt = sum(1 for n, c in d["per_class"].items() if c["num_gt"] and (n in novel) == (group == "novel"))
                if d[group]["classes"]:
                    for key in ("mAP", "mAP50"):
                        L.append(f"| {group} classes ({with_gt} with boxes here): {key} | {fmt(d[group][key])} | "
                                 f"{fmt(d['baseline'][group][key])} |")
            L += ["", f"Per-class AP on {split} (classes without ground truth here: {d['classes_without_gt']}, left out):",
                  "", "| class | group | AP | AP50 | AP75 | boxes |", "| --- | --- | ---: | ---: | ---: | ---: |"]
            L += [f"| {n} | {'novel' if n in novel else 'base'} | {fmt(c['AP'])} | {fmt(c['AP50'])} | {fmt(c['AP75'])} | "
                  f"{c['num_gt']} |" for n, c in d["per_class"].items() if c["num_gt"]]
            L.append("")
        return L

    def limit_text(self, d: dict) -> str:
        """Why COCOeval counted up to d["max_dets"] detections per image, and whether the model's own limit fits."""
        n, densest, over = d.get("max_dets", 100), d.get("max_gt_per_image"), d.get("images_over_100_gt")
        if densest is None:
            return f"Detection limit: up to {n} detections per image and class are counted (COCOeval maxDets)."
        if n < densest:
            why = (f"fewer than the densest image's {densest} ground-truth boxes ({over} images have more than 100): "
                   f"recall is capped there (even the ground truth scored against itself would not reach AP 1)")
        elif densest > 100:
            why = (f"the densest image here has {densest} ground-truth boxes ({over} images have more than 100), "
                   f"so COCO's default of 100 would cap recall (the ground truth scored against itself would not "
                   f"reach AP 1)")
        elif n == 100:
            why = f"COCO's default; no image here has more than 100 ground-truth boxes (the densest: {densest})"
        else:
            why = f"set explicitly; the densest image here has {densest} ground-truth boxes"
        steps = [m for m in (1, 10) if m < n] + [n]
        text = (f"Detection limit: COCOeval counts up to {n} detections per image and class (maxDets={steps}, "
                f"AP read at {n}): {why}.")
        kept = self.detections_per_img(densest)
        if kept < densest:
            text += (f" **The detector keeps only {kept} detections per image (model.detector.detections_per_img), "
                     f"fewer than the densest image's {densest} boxes: its recall is capped there.**")
        else:
            how = ("model.detector.detections_per_img" if self.cfg.model.detector.detections_per_img is not None else
                   f"model.detector.detections_per_img empty: fitted to the data, max(100, its densest image's "
                   f"{getattr(self, 'densest', 0) or densest} boxes)")
            text += f" The detector keeps up to {kept} per image ({how})."
        return text

    def report_json(self, results: dict) -> dict:
        return {"novel_classes": list(self.novel)}


def densest_image(manifest) -> int:
    """The most boxes any image of the pack has, over its coco_<split>.json files (0 without them)."""
    import collections

    most = 0
    for split in manifest.data.get("splits", {}):
        path = Path(manifest.root) / f"coco_{split}.json"
        if path.is_file():
            counts = collections.Counter(a["image_id"] for a in json.loads(path.read_text()).get("annotations", []))
            most = max([most, *counts.values()])
    return most


def _num(v) -> float:
    return float("nan") if v is None else float(v)
