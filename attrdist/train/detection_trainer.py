"""The trainer for boxes: the same loop, data order, checkpoints and launch paths as attrdist.train.trainer,
with detection samples, torchvision's detection losses and COCO evaluation.

    python recipes/dior_remoteclip.py                 # picks this trainer through data.task=detection

Open-vocabulary protocol: `data.novel_classes` are held out of training (their boxes are dropped,
so those objects are background), the model classifies regions against the frozen text embeddings
of the *base* prompts while training, and against every class's prompt when it is evaluated; the
report gives mAP, mAP@50, mAP@75 and per-class AP through pycocotools, base and novel separately,
each beside the shuffled-label baseline (same boxes and scores, class decisions permuted).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch

from attrdist.core.order import BatchPlan
from attrdist.data.detection import DetectionDataset, make_loader
from attrdist.core.detection_eval import coco_evaluate, to_coco_detections
from attrdist.pack.dior import prompt
from attrdist.errors import AttrdistError
from attrdist.data.shards import ShardReader
from attrdist.train.trainer import Trainer, log as trainer_log

log = logging.getLogger("attrdist")


class DetectionTrainer(Trainer):
    def __init__(self, cfg, recipe: str):
        super().__init__(cfg, recipe)
        unknown = [n for n in cfg.data.novel_classes if n not in self.attributes]
        if unknown:
            raise AttrdistError(f"data.novel_classes: {unknown[0]!r} is not a class of {self.manifest.root} "
                                f"(classes: {', '.join(self.attributes)})")
        self.novel = list(cfg.data.novel_classes)
        self.base = [i for i, n in enumerate(self.attributes) if n not in self.novel]
        self.all_prompts = [prompt(n) for n in self.attributes]
        self.base_prompts = [self.all_prompts[i] for i in self.base]
        self.novel_prompts = [prompt(n) for n in self.novel]
        self.detector.set_classes(self.base_prompts)
        log.info("open-vocabulary split: %d base classes trained; %d novel classes held out (%s): their boxes are "
                 "background in training and they are detected at test time through their prompts only",
                 len(self.base), len(self.novel), ", ".join(self.novel) or "none")

    def after_weights_loaded(self) -> None:
        self.detector.set_classes(self.base_prompts)  # the class embeddings follow the loaded text tower

    @property
    def detector(self):
        return self.acc.unwrap_model(self.model)

    # -------------------------------------------------------------- data and loss
    def make_dataset(self, reader: ShardReader, train: bool):
        classes = [i for i, n in enumerate(self.manifest.attributes) if n not in self.cfg.data.novel_classes]
        return DetectionDataset(reader, self.cfg.run.seed, train, classes=classes if train else None)

    def make_loader(self, ds, plan: BatchPlan):
        return make_loader(ds, plan, self.cfg.data.num_workers, malloc=self.cfg.run.malloc)

    def _valid(self, batch: dict) -> tuple[list[torch.Tensor], list[dict], list[int]]:
        keep = [i for i, v in enumerate(batch["valid"].tolist()) if v]
        dev = self.acc.device
        images = [batch["images"][i].to(dev, non_blocking=True) for i in keep]
        targets = [{k: v.to(dev) for k, v in batch["targets"][i].items()} for i in keep]
        return images, targets, keep

    def forward_loss(self, batch: dict) -> tuple[torch.Tensor, dict]:
        images, targets, _ = self._valid(batch)
        if not images:  # every sample of this rank's batch failed to decode: a zero loss keeps ranks in step
            zero = sum(p.sum() for p in self.model.parameters() if p.requires_grad) * 0.0
            return zero, {}
        with self.acc.autocast():
            losses = self.model(images, targets)
        total = sum(losses.values())
        return total, {k.removeprefix("loss_"): v.detach().float() for k, v in sorted(losses.items())}

    # -------------------------------------------------------------- evaluation
    @torch.no_grad()
    def _detect(self, split: str) -> tuple[list[dict], int, float]:
        """COCO detections of a whole split (all ranks' parts gathered), decode failures, seconds."""
        from accelerate.utils import gather_object

        ds, n = self.eval_dataset(split)
        plan = BatchPlan(n, self.eval_batch, self.acc.num_processes, self.acc.process_index, 0, 0,
                         shuffle=False, drop_last=False)
        model = self.model
        model.eval()
        self.detector.set_classes(self.all_prompts, novel=self.novel_prompts)
        dets, corrupt, t0 = [], 0, time.perf_counter()
        try:
            for batch in self.make_loader(ds, plan):
                images, _, keep = self._valid(batch)
                corrupt += len(batch["errors"])
                for e in batch["errors"]:
                    trainer_log.warning("eval: skipped undecodable sample %s", e)
                if not images:
                    continue
                with self.acc.autocast():
                    outputs = model(images)
                dets += to_coco_detections(outputs, [batch["image_ids"][i] for i in keep],
                                           list(range(1, len(self.attributes) + 1)),
                                           [batch["scales"][i] for i in keep])
        finally:
            self.detector.set_classes(self.base_prompts)
            model.train()
        seconds = time.perf_counter() - t0
        if self.acc.num_processes > 1:
            dets = gather_object(dets)
            corrupt = int(self.acc.reduce(torch.tensor(corrupt, device=self.acc.device), "sum").item())
        return dets, corrupt, seconds

    def ground_truth(self, split: str) -> dict:
        path = Path(self.manifest.root) / f"coco_{split}.json"
        if not path.is_file():
            raise AttrdistError(f"{path}: missing; detection shards carry coco_<split>.json (repack with shards/dior.py)")
        gt = json.loads(path.read_text())
        if self.cfg.data.subset:
            ids = {int(json.loads(ShardReader(self.manifest, split)[i]["json"])["image_id"])
                   for i in range(min(self.cfg.data.subset, len(gt["images"])))}
            gt = {**gt, "images": [im for im in gt["images"] if im["id"] in ids],
                  "annotations": [a for a in gt["annotations"] if a["image_id"] in ids]}
        return gt

    def evaluate(self, split: str, tune: bool = False, per_attribute: bool = False) -> dict:
        if split == "__overfit__":
            split = self.cfg.data.train_split
        dets, corrupt, seconds = self._detect(split)
        gt = self.ground_truth(split)
        res = coco_evaluate(gt, dets, list(self.attributes), novel=self.novel, seed=self.cfg.run.seed)
        rec: dict = {f"{split}/images_per_s": len(gt["images"]) / max(seconds, 1e-9), f"{split}/corrupt": corrupt}
        for key in ("mAP", "mAP50", "mAP75"):
            rec[f"{split}/{key}"] = _num(res[key])
            rec[f"{split}/{key}:shuffled"] = _num(res["baseline"][key])
        for group in ("base", "novel"):
            if res[group]["classes"]:
                for key in ("mAP", "mAP50"):
                    rec[f"{split}/{group}/{key}"] = _num(res[group][key])
                    rec[f"{split}/{group}/{key}:shuffled"] = _num(res["baseline"][group][key])
        rec["_details"] = res if per_attribute else None
        return rec

    def _headline_keys(self, val_split: str) -> list[str]:
        split = self.cfg.data.train_split if val_split == "__overfit__" else val_split
        return [f"{split}/mAP50"] + [f"{split}/{g}/mAP50" for g in ("base", "novel") if g != "novel" or self.novel]

    def inference_input(self, split: str):
        ds, n = self.eval_dataset(self.cfg.data.train_split if split == "__overfit__" else split)
        b = max(1, min(self.eval_batch // self.acc.num_processes, n))
        return [ds[(i, 0)]["image"].to(self.acc.device) for i in range(b)], b

    def write_report(self, results: dict, best: Path, val_split: str) -> tuple[Path, str]:
        from attrdist.train import report

        path = report.write_detection(self.run_dir, recipe=self.recipe, cfg=self.cfg, rt=self.rt, results=results,
                                      state=self.state, timings=self.timings, best_dir=best, manifest=self.manifest,
                                      novel=self.novel, n_train=self.n_train, scoring=self.scoring())
        return path, report.detection_headline(results)


    def scoring(self) -> str:
        d = self.cfg.model.detector
        if self.detector.crop_scorer is None:
            return "the region classifier alone (no CLIP crop scores: no pretrained CLIP, or model.detector.clip_crops=false)"
        return (f"ViLD ensemble of the region classifier and the frozen CLIP on crops of the {d.crop_topk} best proposals "
                f"per image, det^(1-w) * clip^w with w = {d.crop_weight_base} (base), {d.crop_weight_novel} (novel)")


def _num(v) -> float:
    return float("nan") if v is None else float(v)
