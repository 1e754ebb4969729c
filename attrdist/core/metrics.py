"""Honest multi-label metrics: pure functions of numpy arrays.

Sparse multi-hot labels make naive figures misleading (an all-negative predictor reaches
"100% accuracy"), so `evaluate_multilabel` reports every figure beside the same figure for
two trivial predictors: all-negative (every score 0) and prior (every score = the
attribute's positive rate).

Conventions, shared by every function:
  scores  float [N, A], probabilities in [0, 1];
  labels  {0, 1} [N, A];
  mask    bool [N, A], True = labelled. Entries with mask False are ignored by every metric,
          exactly as if absent. None means all True.
Inputs may be anything `np.asarray` accepts (lists, numpy arrays, CPU torch tensors).
A 1-D array is read as one attribute [N, 1]. N may be 0: metrics are then NaN. AP matches
`sklearn.metrics.average_precision_score` (tied scores form one step).
"""

from __future__ import annotations

import math

import numpy as np

_SCALAR_KEYS = ("mAP", "micro_AP", "macro_f1@0.5", "micro_f1@0.5", "macro_precision@0.5",
                "macro_recall@0.5", "micro_precision@0.5", "micro_recall@0.5", "accuracy@0.5")


def _prep(scores, labels, mask=None):
    """Validate and return (scores float [N,A], labels bool [N,A], mask bool [N,A])."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels)
    if s.ndim == 1:
        s = s[:, None]
    if y.ndim == 1:
        y = y[:, None]
    if s.ndim != 2 or s.shape != y.shape:
        raise ValueError(f"scores {s.shape} and labels {y.shape} must both be [N, A]")
    m = np.ones(s.shape, bool) if mask is None else np.asarray(mask, dtype=bool)
    if m.ndim == 1:
        m = m[:, None]
    if m.shape != s.shape:
        raise ValueError(f"mask {m.shape} must have the shape of scores {s.shape}")
    if not np.all((y[m] == 0) | (y[m] == 1)):
        raise ValueError("labels must be 0 or 1 wherever mask is True")
    if np.isnan(s[m]).any():
        raise ValueError("scores must not be NaN wherever mask is True")
    return s, (y == 1) & m, m


def _sorted_columns(s, y, m):
    """Sort each attribute by descending score (masked entries last, at -inf).

    Works on transposed [A, N] contiguous copies. Returns sorted scores, sorted labels,
    sorted mask, cumulative TP and FP counts (included entries only), and a bool array
    marking the last entry of each group of tied scores.
    """
    s = np.ascontiguousarray(np.where(m, s, -np.inf).T)
    order = np.argsort(-s, axis=1)  # tie order is irrelevant: ties are collapsed below
    ss = np.take_along_axis(s, order, axis=1)
    ys = np.take_along_axis(np.ascontiguousarray(y.T), order, axis=1)
    ms = np.take_along_axis(np.ascontiguousarray(m.T), order, axis=1)
    tp = np.cumsum(ys, axis=1)
    fp = np.cumsum(ms, axis=1) - tp
    last = np.ones_like(ms)
    last[:, :-1] = ss[:, :-1] != ss[:, 1:]
    return ss, ys, ms, tp, fp, last


def _ap_columns(s, y, m):
    """Per-column AP (NaN where a column has no included positive), vectorised over columns."""
    n, a = s.shape
    pos = y.sum(axis=0)
    if n == 0:
        return np.full(a, np.nan)
    _, _, _, tp, fp, last = _sorted_columns(s, y, m)
    # AP = sum over tie-group ends k of (TP_k - TP_{k-1}) / P * precision_k, all columns at once.
    idx = np.flatnonzero(last)
    col = idx // n
    tpk, fpk = tp.ravel()[idx], fp.ravel()[idx]
    gain = np.diff(tpk, prepend=0)
    starts = np.r_[True, col[1:] != col[:-1]]
    gain[starts] = tpk[starts]
    ap_sum = np.bincount(col, weights=gain * (tpk / np.maximum(tpk + fpk, 1)), minlength=a)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(pos > 0, ap_sum / pos, np.nan)


def average_precision(scores, labels, mask=None) -> np.ndarray:
    """Per-attribute average precision, shape [A]; NaN where an attribute has no positive."""
    return _ap_columns(*_prep(scores, labels, mask))


def micro_average_precision(scores, labels, mask=None) -> float:
    """AP over all included (sample, attribute) entries flattened; NaN if no positive."""
    s, y, m = _prep(scores, labels, mask)
    return float(_ap_columns(s[m][:, None], y[m][:, None], np.ones((int(m.sum()), 1), bool))[0])


def _div(num, den):
    """num / den elementwise, 0.0 where den == 0 (sklearn zero_division=0)."""
    num, den = np.asarray(num, np.float64), np.asarray(den, np.float64)
    return np.divide(num, den, out=np.zeros(np.broadcast(num, den).shape), where=den != 0)


def _predict(s, thresholds):
    """Binary predictions score >= threshold; thresholds scalar or [A]."""
    t = np.asarray(thresholds, dtype=np.float64)
    if t.ndim not in (0, 1) or (t.ndim == 1 and t.shape[0] != s.shape[1]):
        raise ValueError(f"thresholds must be a scalar or shape [{s.shape[1]}], got {t.shape}")
    return s >= t


def precision_recall_f1(scores, labels, mask=None, thresholds=0.5) -> dict:
    """Per-attribute, macro and micro precision/recall/F1 at `thresholds` (0/0 -> 0.0).

    Macro figures average over attributes with at least one positive (NaN if none).
    """
    s, y, m = _prep(scores, labels, mask)
    p = _predict(s, thresholds) & m
    tp, fp, fn = (p & y).sum(0), (p & ~y).sum(0), (~p & y).sum(0)
    prec, rec, f1 = _div(tp, tp + fp), _div(tp, tp + fn), _div(2 * tp, 2 * tp + fp + fn)
    has = (tp + fn) > 0
    macro = {k: float(v[has].mean()) if has.any() else math.nan
             for k, v in (("precision", prec), ("recall", rec), ("f1", f1))}
    TP, FP, FN = tp.sum(), fp.sum(), fn.sum()
    return {"precision": prec, "recall": rec, "f1": f1, "support": tp + fn,
            "macro_precision": macro["precision"], "macro_recall": macro["recall"],
            "macro_f1": macro["f1"],
            "micro_precision": float(_div(TP, TP + FP)), "micro_recall": float(_div(TP, TP + FN)),
            "micro_f1": float(_div(2 * TP, 2 * TP + FP + FN))}


def tune_thresholds(scores, labels, mask=None) -> np.ndarray:
    """Per-attribute threshold [A] maximising F1 on the given data.

    Candidates are score values present among included entries (predict positive if
    score >= t); ties in F1 go to the larger threshold; attributes without positives get 0.5.
    """
    s, y, m = _prep(scores, labels, mask)
    n, a = s.shape
    pos = y.sum(axis=0)
    out = np.full(a, 0.5)
    if n == 0:
        return out
    ss, _, ms, tp, fp, last = _sorted_columns(s, y, m)
    f1 = np.where(last & ms, 2 * tp / (tp + fp + pos[:, None]), -np.inf)
    best = np.argmax(f1, axis=1)  # first maximum in descending score order = larger threshold
    thr = ss[np.arange(a), best]
    return np.where(pos > 0, thr, out)


def accuracy(scores, labels, mask=None, thresholds=0.5) -> float:
    """Element-wise accuracy over included entries (NaN if none)."""
    s, y, m = _prep(scores, labels, mask)
    if not m.any():
        return math.nan
    return float((_predict(s, thresholds) == y)[m].mean())


def _f(x):
    """Plain Python float (NaN kept)."""
    return float(x)


def _scalars(s, y, m, thresholds):
    """The scalar figures of `evaluate_multilabel` for one predictor, plus per-attr arrays."""
    ap = _ap_columns(s, y, m)
    prf = precision_recall_f1(s, y, m)
    has = ~np.isnan(ap)
    out = {"mAP": _f(ap[has].mean()) if has.any() else math.nan,
           "micro_AP": micro_average_precision(s, y, m),
           **{f"{k}@0.5": _f(prf[k]) for k in ("macro_f1", "micro_f1", "macro_precision",
                                               "macro_recall", "micro_precision", "micro_recall")},
           "accuracy@0.5": accuracy(s, y, m)}
    tuned = None
    if thresholds is not None:
        tuned = precision_recall_f1(s, y, m, thresholds)
        out["macro_f1@tuned"], out["micro_f1@tuned"] = tuned["macro_f1"], tuned["micro_f1"]
    return out, ap, prf, tuned


def evaluate_multilabel(scores, labels, mask=None, *, prior=None, thresholds=None,
                        names=None) -> dict:
    """Full JSON-serialisable report: model figures, per-attribute rows and two baselines.

    prior: training-split positive rate per attribute [A] for the prior baseline; None uses
    the evaluated data's own label rate ("prior_source": "eval"). thresholds: [A] tuned
    thresholds (e.g. from `tune_thresholds` on a validation split) adding "@tuned" figures.
    """
    s, y, m = _prep(scores, labels, mask)
    n, a = s.shape
    names = [f"attr_{i}" for i in range(a)] if names is None else [str(x) for x in names]
    if len(names) != a:
        raise ValueError(f"got {len(names)} names for {a} attributes")
    if thresholds is not None:
        thresholds = np.broadcast_to(np.asarray(thresholds, np.float64), (a,))
    model, ap, prf, tuned = _scalars(s, y, m, thresholds)

    rows = []
    for i, name in enumerate(names):
        row = {"name": name, "ap": _f(ap[i]), "f1@0.5": _f(prf["f1"][i]),
               "precision@0.5": _f(prf["precision"][i]), "recall@0.5": _f(prf["recall"][i]),
               "support": int(prf["support"][i])}
        if tuned is not None:
            row["threshold"], row["f1@tuned"] = _f(thresholds[i]), _f(tuned["f1"][i])
        rows.append(row)

    if prior is None:
        source = "eval"
        prior = _div(y.sum(0), m.sum(0))
    else:
        source = "train"
        prior = np.broadcast_to(np.asarray(prior, np.float64), (a,))
    baselines = {"all_negative": _scalars(np.zeros_like(s), y, m, thresholds)[0],
                 "prior": {**_scalars(np.broadcast_to(prior, s.shape), y, m, thresholds)[0],
                           "prior_source": source, "prior": [_f(p) for p in prior]}}
    return {"n_samples": int(n), "n_attributes": int(a),
            "n_attr_with_pos": int((~np.isnan(ap)).sum()),
            "n_attr_without_pos": int(np.isnan(ap).sum()),
            **model, "prior_source": source, "per_attribute": rows, "baselines": baselines}


def fold_init() -> tuple:
    """Empty accumulator state for `fold_update`."""
    return ((), (), ())


def fold_update(state, scores, labels, mask=None) -> tuple:
    """Return a new state with one batch appended (the input state is not mutated)."""
    s, y, m = _prep(scores, labels, mask)
    if state[0] and state[0][0].shape[1] != s.shape[1]:
        raise ValueError(f"batch has {s.shape[1]} attributes, earlier ones {state[0][0].shape[1]}")
    y = np.asarray(labels).reshape(s.shape).astype(np.int8)  # keep labels even where masked
    return (state[0] + (s.copy(),), state[1] + (y,), state[2] + (m.copy(),))


def fold_result(state) -> tuple:
    """Concatenate the batches: (scores [N,A] float, labels [N,A] int8, mask [N,A] bool)."""
    if not state[0]:
        return np.zeros((0, 0)), np.zeros((0, 0), np.int8), np.zeros((0, 0), bool)
    return tuple(np.concatenate(parts, axis=0) for parts in state)
