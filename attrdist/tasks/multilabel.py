"""multilabel: a sigmoid per attribute, BCE over labelled entries (+ the image/attribute contrastive term
when the model gives embeddings); AP/F1 beside all-negative and prior predictors (attrdist.core.metrics);
decision thresholds tuned on val and kept in checkpoints."""

from __future__ import annotations

import math

import torch

from attrdist.core import metrics
from attrdist.core.losses import attribute_loss
from attrdist.tasks.base import fmt
from attrdist.tasks.classification import Classification


class Task(Classification):
    kind = "multilabel"
    headline = "mAP"
    baselines = ("prior", "all_negative")
    scalars = [("mAP", "mAP (attributes with >= 1 positive)"), ("micro_AP", "micro-AP"),
               ("macro_f1@0.5", "macro F1 @0.5"), ("micro_f1@0.5", "micro F1 @0.5"),
               ("macro_f1@tuned", "macro F1 @ val-tuned thresholds"),
               ("micro_f1@tuned", "micro F1 @ val-tuned thresholds"), ("accuracy@0.5", "element-wise accuracy @0.5")]

    def loss(self, out, y, m, valid, optim, mean_counts=None) -> tuple[torch.Tensor, dict]:
        return attribute_loss(out, y, m, valid, bce_weight=optim.bce_weight, contrastive_weight=optim.contrastive_weight,
                              temperature=optim.temperature, mean_counts=mean_counts)

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(logits.float())

    def metrics(self, p, y, m, *, prior, names, thresholds=None, tune=False):
        new = metrics.tune_thresholds(p, y, m) if tune else None
        t = new if new is not None else thresholds
        return metrics.evaluate_multilabel(p, y, m, prior=prior, names=names, thresholds=t), new

    def report_details(self, results: dict, run_dir, recipe: str) -> list[str]:
        split, first = ("test" if "test" in results else "val"), self.cfg.data.eval_labels[0]
        per = results[split]["_details"][first].get("per_attribute")
        if per is None:
            return []
        ranked = sorted([p for p in per if p["ap"] is not None and not math.isnan(p["ap"])], key=lambda p: -p["ap"])
        missing = [p["name"] for p in per if p["ap"] is None or math.isnan(p["ap"])]
        head = "| attribute | AP | F1@0.5 | P@0.5 | R@0.5 | positives |"
        L: list[str] = []
        for which, rows in (("best", ranked[:20]), ("worst", ranked[::-1][:20])):
            L += [f"## Per-attribute AP on {split} vs `{first}`: {which} 20", "", head,
                  "| --- | ---: | ---: | ---: | ---: | ---: |"]
            L += [f"| {p['name']} | {fmt(p['ap'])} | {fmt(p['f1@0.5'])} | {fmt(p['precision@0.5'])} | "
                  f"{fmt(p['recall@0.5'])} | {p['support']} |" for p in rows]
            L.append("")
        return L[:-1] + ["", f"Attributes with no positive on {split} (excluded from mAP): {', '.join(missing) or 'none'}", ""]
