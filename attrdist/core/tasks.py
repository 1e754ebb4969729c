"""What is being learned: the loss, the output probabilities and the evaluation of one task kind.

  multilabel  sigmoid per attribute, BCE (+ image/attribute contrastive term when the model gives
              embeddings), AP/F1 beside all-negative and prior predictors (attrdist.core.metrics)
  multiclass  softmax over classes, cross-entropy, accuracy/top-5/balanced accuracy/macro F1 beside
              majority-class and prior predictors (attrdist.core.metrics_multiclass)

Labels arrive the same way for both (a multi-hot vector per sample; one positive for multiclass).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from attrdist.core import metrics
from attrdist.errors import AttrdistError
from attrdist.core.losses import attribute_loss
from attrdist.core.metrics_multiclass import evaluate_multiclass


class MultiLabel:
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

    def evaluate(self, p, y, m, *, prior, names, thresholds=None, tune=False):
        """(details, new thresholds or None)."""
        new = metrics.tune_thresholds(p, y, m) if tune else None
        t = new if new is not None else thresholds
        return metrics.evaluate_multilabel(p, y, m, prior=prior, names=names, thresholds=t), new


class MultiClass:
    kind = "multiclass"
    headline = "accuracy"
    baselines = ("prior", "majority")
    scalars = [("accuracy", "accuracy"), ("top5_accuracy", "top-5 accuracy"),
               ("balanced_accuracy", "balanced accuracy (mean per-class recall)"), ("macro_f1", "macro F1")]

    def loss(self, out, y, m, valid, optim, mean_counts=None) -> tuple[torch.Tensor, dict]:
        """Mean cross-entropy over valid one-label samples (`mean_counts`: as in losses.attribute_loss)."""
        logits = out["logits"].float()
        target = y.argmax(1)
        keep = valid & (m.all(1)) & (y.sum(1) == 1)
        per = F.cross_entropy(logits, target, reduction="none")
        count = keep.float().sum()
        if mean_counts is not None:
            count = mean_counts(count[None])[0]
        ce = (per * keep.float()).sum() / count.clamp_min(1e-6)
        return ce, {"ce": ce.detach()}

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.softmax(logits.float(), dim=1)

    def evaluate(self, p, y, m, *, prior, names, thresholds=None, tune=False):
        one = (y.sum(1) == 1) & m.all(1)
        p, labels = np.asarray(p)[one], np.asarray(y)[one].argmax(1)
        prior = None if prior is None else np.asarray(prior) / max(float(np.sum(prior)), 1e-12)
        return evaluate_multiclass(p, labels, prior=prior, names=names), None


class Detection:
    """Boxes: torchvision's detection losses in the model; COCO mAP in attrdist.train.detection_trainer."""

    kind = "detection"
    headline = "mAP50"
    baselines = ("shuffled",)
    scalars = [("mAP", "mAP @ IoU 0.50:0.95"), ("mAP50", "mAP @ IoU 0.50"), ("mAP75", "mAP @ IoU 0.75")]


def make_task(kind: str):
    if kind == "multilabel":
        return MultiLabel()
    if kind == "multiclass":
        return MultiClass()
    if kind == "detection":
        return Detection()
    raise AttrdistError(f"data.task={kind!r}: unknown task (multilabel, multiclass, detection)")
