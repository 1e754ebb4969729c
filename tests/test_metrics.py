"""Tests for attrdist.core.metrics, cross-checked against scikit-learn."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import average_precision_score, precision_recall_fscore_support

from attrdist.core import metrics as M


def _data(seed, n=200, a=7, density=0.15, decimals=None, masked=False):
    rng = np.random.default_rng(seed)
    y = (rng.random((n, a)) < density).astype(int)
    s = np.clip(0.35 * y + rng.random((n, a)) * 0.75, 0, 1)
    if decimals is not None:
        s = np.round(s, decimals)
    m = rng.random((n, a)) < 0.7 if masked else None
    return s, y, m


def _sk_ap(s, y, m):
    m = np.ones_like(y, bool) if m is None else m
    return np.array([average_precision_score(y[m[:, j], j], s[m[:, j], j])
                     if y[m[:, j], j].any() else np.nan for j in range(y.shape[1])])


@pytest.mark.parametrize("decimals", [None, 1])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("seed", range(4))
def test_ap_matches_sklearn(seed, masked, decimals):
    s, y, m = _data(seed, decimals=decimals, masked=masked)
    np.testing.assert_allclose(M.average_precision(s, y, m), _sk_ap(s, y, m), rtol=1e-12)


def test_ap_nan_without_positive_and_masked_positive_ignored():
    s, y, _ = _data(0)
    y[:, 2] = 0
    m = np.ones_like(y, bool)
    y[:5, 3], y[5:, 3], m[:5, 3] = 1, 0, False  # attribute 3's only positives are masked out
    ap = M.average_precision(s, y, m)
    assert math.isnan(ap[2]) and math.isnan(ap[3])
    assert np.isfinite(np.delete(ap, [2, 3])).all()


def test_micro_ap_matches_sklearn():
    s, y, _ = _data(1, decimals=2)
    assert M.micro_average_precision(s, y) == pytest.approx(
        average_precision_score(y, s, average="micro"), rel=1e-12)
    _, _, m = _data(2, masked=True)
    assert M.micro_average_precision(s, y, m) == pytest.approx(
        average_precision_score(y[m], s[m]), rel=1e-12)
    assert math.isnan(M.micro_average_precision(s, np.zeros_like(y)))


@pytest.mark.parametrize("masked", [False, True])
def test_precision_recall_f1_matches_sklearn(masked):
    s, y, m = _data(3, masked=masked)
    y[:, 0] = 0  # an attribute without positives: excluded from macro, 0/0 -> 0
    thr = np.linspace(0.3, 0.7, y.shape[1])
    out = M.precision_recall_f1(s, y, m, thresholds=thr)
    mm = np.ones_like(y, bool) if m is None else m
    pred = (s >= thr).astype(int)
    for j in range(y.shape[1]):
        p, r, f, sup = precision_recall_fscore_support(
            y[mm[:, j], j], pred[mm[:, j], j], average="binary", zero_division=0)
        assert (out["precision"][j], out["recall"][j], out["f1"][j]) == pytest.approx((p, r, f))
        assert out["support"][j] == y[mm[:, j], j].sum()
    micro = (out["micro_precision"], out["micro_recall"], out["micro_f1"])
    p, r, f, _ = precision_recall_fscore_support(y[mm], pred[mm], average="binary",
                                                 zero_division=0)
    assert micro == pytest.approx((p, r, f))
    has = out["support"] > 0
    assert out["macro_f1"] == pytest.approx(out["f1"][has].mean())
    if m is None:  # sklearn's micro average over the full multilabel matrix
        p, r, f, _ = precision_recall_fscore_support(y, pred, average="micro", zero_division=0)
        assert micro == pytest.approx((p, r, f))


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("decimals", [None, 1])
def test_tune_thresholds_is_brute_force_max(masked, decimals):
    s, y, m = _data(4, n=120, decimals=decimals, masked=masked)
    y[:, 1] = 0
    mm = np.ones_like(y, bool) if m is None else m
    thr = M.tune_thresholds(s, y, m)
    assert thr[1] == 0.5
    f_tuned = M.precision_recall_f1(s, y, m, thr)["f1"]
    f_half = M.precision_recall_f1(s, y, m, 0.5)["f1"]
    assert (f_tuned >= f_half - 1e-12).all()
    for j in range(y.shape[1]):
        if not y[mm[:, j], j].any():
            continue
        cands = np.unique(s[mm[:, j], j])
        f1s = np.array([precision_recall_fscore_support(
            y[mm[:, j], j], (s[mm[:, j], j] >= t).astype(int), average="binary",
            zero_division=0)[2] for t in cands])
        assert thr[j] in cands
        assert f_tuned[j] == pytest.approx(f1s.max())
        assert thr[j] == cands[np.flatnonzero(np.isclose(f1s, f1s.max())).max()]  # larger on ties


@settings(max_examples=60, deadline=None)
@given(st.integers(2, 40).flatmap(lambda n: st.tuples(
    st.lists(st.integers(0, 20), min_size=n, max_size=n),
    st.lists(st.booleans(), min_size=n, max_size=n))))
def test_ap_bounded_and_monotone_invariant(data):
    raw, lab = data
    s = np.array(raw, float)[:, None] / 20
    y = np.array(lab, int)[:, None]
    ap = M.average_precision(s, y)[0]
    if not y.any():
        assert math.isnan(ap)
        return
    assert 0 <= ap <= 1
    for f in (lambda x: x ** 3, lambda x: np.exp(5 * x) - 7, lambda x: 1 / (1 + np.exp(-x))):
        assert M.average_precision(f(s), y)[0] == pytest.approx(ap, rel=1e-12)
    assert ap == pytest.approx(average_precision_score(y[:, 0], s[:, 0]), rel=1e-12)


def test_trivial_predictors():
    s, y, _ = _data(5)
    const = np.full(s.shape, 0.3)
    np.testing.assert_allclose(M.average_precision(const, y), y.mean(0))
    rep = M.evaluate_multilabel(s, y, prior=y.mean(0) * 0 + 0.1)
    neg = rep["baselines"]["all_negative"]
    assert neg["macro_f1@0.5"] == 0 and neg["micro_f1@0.5"] == 0
    assert neg["accuracy@0.5"] == pytest.approx(1 - y.mean())
    assert neg["mAP"] == pytest.approx(y.mean(0).mean())
    assert rep["baselines"]["prior"]["prior_source"] == "train"
    assert M.evaluate_multilabel(s, y)["baselines"]["prior"]["prior_source"] == "eval"
    perfect = M.evaluate_multilabel(y * 0.9 + 0.05, y)
    assert perfect["mAP"] == 1 and perfect["micro_AP"] == 1 and perfect["macro_f1@0.5"] == 1


def test_fold_equals_concatenation():
    s, y, m = _data(6, n=97, masked=True)
    state = M.fold_init()
    for lo in range(0, 97, 20):
        before = state
        state = M.fold_update(state, s[lo:lo + 20], y[lo:lo + 20], m[lo:lo + 20])
        assert len(before[0]) == lo // 20  # pure: old state untouched
    fs, fy, fm = M.fold_result(state)
    np.testing.assert_array_equal(fs, s)
    np.testing.assert_array_equal(fy, y)
    np.testing.assert_array_equal(fm, m)
    a, b = M.evaluate_multilabel(fs, fy, fm), M.evaluate_multilabel(s, y, m)
    assert json.dumps(a, allow_nan=True) == json.dumps(b, allow_nan=True)
    fs, _, fm = M.fold_result(M.fold_update(M.fold_init(), s, y))
    assert fm.all() and fs.shape == s.shape
    assert M.fold_result(M.fold_init())[0].shape == (0, 0)


def test_evaluate_report_json_and_keys():
    s, y, m = _data(7, masked=True)
    y[:, 0] = 0
    thr = M.tune_thresholds(s, y, m)
    rep = M.evaluate_multilabel(s, y, m, prior=np.full(7, 0.2), thresholds=thr,
                                names=list("abcdefg"))
    text = json.dumps(rep, allow_nan=True)
    assert json.loads(text)["n_samples"] == 200
    assert rep["n_attr_with_pos"] == 6 and rep["n_attr_without_pos"] == 1
    assert math.isnan(rep["per_attribute"][0]["ap"])
    assert rep["mAP"] == pytest.approx(np.nanmean(M.average_precision(s, y, m)))
    assert rep["macro_f1@tuned"] >= rep["macro_f1@0.5"]
    assert {"threshold", "f1@tuned", "name", "support"} <= rep["per_attribute"][1].keys()
    for base in rep["baselines"].values():
        assert set(M._SCALAR_KEYS) | {"macro_f1@tuned", "micro_f1@tuned"} <= base.keys()
        assert "per_attribute" not in base


def test_empty_input_is_nan():
    z = np.zeros((0, 3))
    assert np.isnan(M.average_precision(z, z)).all()
    assert math.isnan(M.micro_average_precision(z, z))
    assert math.isnan(M.accuracy(z, z))
    rep = M.evaluate_multilabel(z, z)
    json.dumps(rep, allow_nan=True)
    assert rep["n_samples"] == 0 and math.isnan(rep["mAP"]) and math.isnan(rep["macro_f1@0.5"])
    np.testing.assert_array_equal(M.tune_thresholds(z, z), [0.5] * 3)


def test_bad_input_raises():
    with pytest.raises(ValueError):
        M.average_precision(np.zeros((4, 2)), np.zeros((4, 3)))
    with pytest.raises(ValueError):
        M.average_precision(np.zeros((2, 1)), [[2], [0]])


def test_masked_entries_are_absent():
    s, y, m = _data(8, masked=True)
    s2, y2 = s.copy(), y.copy()
    s2[~m], y2[~m] = np.nan, -1  # garbage where unlabelled must not matter
    a, b = M.evaluate_multilabel(s, y, m), M.evaluate_multilabel(s2, y2, m)
    assert json.dumps(a, allow_nan=True) == json.dumps(b, allow_nan=True)
    np.testing.assert_array_equal(M.tune_thresholds(s, y, m), M.tune_thresholds(s2, y2, m))
