"""multiclass: softmax over classes, cross-entropy over one-label samples; accuracy, top-5, balanced
accuracy and macro F1 beside majority-class and prior predictors (attrdist.core.metrics_multiclass), a
per-class table and the confusion matrix."""

from __future__ import annotations

import numpy as np
import torch

from attrdist.core.losses import cross_entropy
from attrdist.core.metrics_multiclass import evaluate_multiclass
from attrdist.tasks.base import fmt
from attrdist.tasks.classification import Classification


class Task(Classification):
    kind = "multiclass"
    headline = "accuracy"
    baselines = ("prior", "majority")
    scalars = [("accuracy", "accuracy"), ("top5_accuracy", "top-5 accuracy"),
               ("balanced_accuracy", "balanced accuracy (mean per-class recall)"), ("macro_f1", "macro F1")]

    def loss(self, out, y, m, valid, optim, mean_counts=None) -> tuple[torch.Tensor, dict]:
        ce = cross_entropy(out["logits"], y, m, valid, mean_counts=mean_counts)
        return ce, {"ce": ce.detach()}

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.softmax(logits.float(), dim=1)

    def metrics(self, p, y, m, *, prior, names, thresholds=None, tune=False):
        one = (y.sum(1) == 1) & m.all(1)
        p, labels = np.asarray(p)[one], np.asarray(y)[one].argmax(1)
        prior = None if prior is None else np.asarray(prior) / max(float(np.sum(prior)), 1e-12)
        return evaluate_multiclass(p, labels, prior=prior, names=names), None

    def report_details(self, results: dict, run_dir, recipe: str) -> list[str]:
        """Per-class precision/recall/F1 and the confusion matrix (as a picture too: report.write draws
        confusion.png from the details)."""
        split, first = ("test" if "test" in results else "val"), self.cfg.data.eval_labels[0]
        d = results[split]["_details"][first]
        if "per_class" not in d:
            return []
        L = [f"## Per-class results on {split} vs `{first}`", "", "| class | precision | recall | F1 | support |",
             "| --- | ---: | ---: | ---: | ---: |"]
        L += [f"| {c['name']} | {fmt(c['precision'])} | {fmt(c['recall'])} | {fmt(c['f1'])} | {c['support']} |"
              for c in d["per_class"]]
        cm = d.get("confusion")
        if cm and len(cm) <= 30:
            names = [c["name"] for c in d["per_class"]]
            L += ["", "Confusion matrix (rows: true class, columns: predicted):", "",
                  "| true \\ pred | " + " | ".join(names) + " |", "| --- |" + " ---: |" * len(names)]
            L += [f"| {names[i]} | " + " | ".join(str(v) for v in row) + " |" for i, row in enumerate(cm)]
        L.append("")
        if cm:
            L += ["Confusion matrix as a picture: `confusion.png` (rows normalised to recall).", ""]
        return L

    def confusion(self, results: dict):
        split, first = ("test" if "test" in results else "val"), self.cfg.data.eval_labels[0]
        d = results[split]["_details"][first]
        if "per_class" not in d or not d.get("confusion"):
            return None
        return d["confusion"], [c["name"] for c in d["per_class"]], f"{split} vs {first}"
