import numpy as np
from sklearn.metrics import accuracy_score, balanced_accuracy_score, confusion_matrix, f1_score, top_k_accuracy_score

from attrdist.core.metrics_multiclass import evaluate_multiclass


def test_against_sklearn():
    rng = np.random.default_rng(0)
    N, C = 500, 7
    labels = rng.integers(0, C, N)
    logits = rng.normal(size=(N, C)) + 2.0 * np.eye(C)[labels] * rng.uniform(0, 1, (N, 1))
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    r = evaluate_multiclass(probs, labels, prior=np.bincount(labels, minlength=C) / N, k=5)
    pred = probs.argmax(1)
    assert np.isclose(r["accuracy"], accuracy_score(labels, pred))
    assert np.isclose(r["balanced_accuracy"], balanced_accuracy_score(labels, pred))
    assert np.isclose(r["macro_f1"], f1_score(labels, pred, average="macro"))
    assert np.isclose(r["top5_accuracy"], top_k_accuracy_score(labels, probs, k=5, labels=range(C)))
    assert r["confusion"] == confusion_matrix(labels, pred, labels=range(C)).tolist()


def test_baselines_expose_a_constant_predictor():
    labels = np.array([0] * 90 + [1] * 10)
    const = np.tile([0.9, 0.1], (100, 1))
    r = evaluate_multiclass(const, labels, prior=np.array([0.9, 0.1]), k=1)
    # 90 % accuracy, and the majority baseline beside it says a constant gets exactly that
    assert r["accuracy"] == 0.9 == r["baselines"]["majority"]["accuracy"] == r["baselines"]["prior"]["accuracy"]
    assert r["balanced_accuracy"] == 0.5
