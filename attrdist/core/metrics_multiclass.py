"""Honest single-label (softmax) classification metrics: pure functions of numpy arrays.

`evaluate_multiclass` reports accuracy, top-k accuracy, balanced accuracy (mean per-class
recall) and macro F1, each beside the same figure for two trivial predictors: the majority
class of the training split, and the training prior (every image gets the prior as its
probability vector). A validation accuracy that a constant could reach is then visible at once.

  probs   float [N, C] (rows are probability vectors)
  labels  int [N] class indices
"""

from __future__ import annotations

import numpy as np


def confusion(pred: np.ndarray, labels: np.ndarray, C: int) -> np.ndarray:
    """[C, C] counts: rows = true class, columns = predicted class."""
    return np.bincount(labels * C + pred, minlength=C * C).reshape(C, C)


def _scalars(probs: np.ndarray, labels: np.ndarray, k: int) -> dict:
    N, C = probs.shape
    if N == 0:
        nan = float("nan")
        return {"accuracy": nan, f"top{k}_accuracy": nan, "balanced_accuracy": nan, "macro_f1": nan}
    pred = probs.argmax(1)
    cm = confusion(pred, labels, C)
    tp = np.diag(cm).astype(float)
    support, predicted = cm.sum(1), cm.sum(0)
    recall = np.divide(tp, support, out=np.zeros(C), where=support > 0)
    precision = np.divide(tp, predicted, out=np.zeros(C), where=predicted > 0)
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros(C), where=(precision + recall) > 0)
    present = support > 0
    # top-k: the true class is among the k highest; ties broken by class index (stable)
    kk = min(k, C)
    topk = np.argsort(-probs, axis=1, kind="stable")[:, :kk]
    return {"accuracy": float(tp.sum() / N), f"top{k}_accuracy": float((topk == labels[:, None]).any(1).mean()),
            "balanced_accuracy": float(recall[present].mean()), "macro_f1": float(f1[present].mean()),
            "_per_class": (precision, recall, f1, support), "_cm": cm}


def evaluate_multiclass(probs, labels, *, prior=None, names=None, k: int = 5) -> dict:
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    N, C = probs.shape
    names = list(names) if names is not None else [f"class_{i}" for i in range(C)]
    prior_source = "train"
    if prior is None:
        prior = np.bincount(labels, minlength=C) / max(1, N)
        prior_source = "eval"
    prior = np.asarray(prior, dtype=np.float64)
    main = _scalars(probs, labels, k)
    out = {"n_samples": N, "n_classes": C, "prior_source": prior_source,
           **{key: v for key, v in main.items() if not key.startswith("_")}}
    majority = np.zeros((N, C))
    majority[:, int(prior.argmax())] = 1.0
    constant = np.tile(prior, (N, 1))
    out["baselines"] = {
        "majority": {key: v for key, v in _scalars(majority, labels, k).items() if not key.startswith("_")},
        "prior": {key: v for key, v in _scalars(constant, labels, k).items() if not key.startswith("_")},
    }
    if N:
        p, r, f, s = main["_per_class"]
        out["per_class"] = [{"name": names[c], "precision": float(p[c]), "recall": float(r[c]), "f1": float(f[c]),
                             "support": int(s[c])} for c in range(C)]
        out["confusion"] = main["_cm"].tolist()
    return out
