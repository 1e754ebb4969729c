import math

import pytest

from attrdist.config import ScheduleConfig
from attrdist.losses import masked_bce, multi_positive_contrastive
from attrdist.schedules import lr_factor


def f(cfg, step, spe=10, total=100):
    return lr_factor(step, cfg, spe, total)


def test_cosine_with_warmup():
    cfg = ScheduleConfig(name="cosine", warmup_epochs=1)
    assert f(cfg, 0) == pytest.approx(0.1) and f(cfg, 9) == pytest.approx(1.0)
    assert f(cfg, 10) == pytest.approx(1.0)
    assert f(cfg, 55) == pytest.approx(0.5)
    assert f(cfg, 100) == pytest.approx(0.0, abs=1e-12)
    assert all(f(cfg, s) >= f(cfg, s + 1) for s in range(10, 100))


def test_step_decay():
    cfg = ScheduleConfig(name="step", step_epochs=3, step_gamma=0.5)
    assert [f(cfg, s) for s in (0, 29, 30, 59, 60)] == [1.0, 1.0, 0.5, 0.5, 0.25]


def test_warm_restarts():
    cfg = ScheduleConfig(name="warm_restarts", restart_epochs=2, restart_mult=2)
    assert f(cfg, 0) == 1.0 and f(cfg, 20) == 1.0 and f(cfg, 60) == 1.0  # cycles of 20, then 40 steps
    assert f(cfg, 10) == pytest.approx(0.5) and f(cfg, 40) == pytest.approx(0.5)


def test_losses_respect_the_ignore_mask():
    import torch

    logits = torch.tensor([[5.0, -5.0, 3.0]])
    y = torch.tensor([[1.0, 0.0, 0.0]])
    full = masked_bce(logits, y, torch.ones(1, 3, dtype=torch.bool))
    ignored = masked_bce(logits, y, torch.tensor([[True, True, False]]))
    assert ignored < full  # the wrong third entry no longer counts
    assert math.isclose(float(ignored), float(torch.nn.functional.softplus(torch.tensor(-5.0))), rel_tol=1e-5)
    img = torch.nn.functional.normalize(torch.randn(2, 4), dim=1)
    attr = torch.nn.functional.normalize(torch.randn(3, 4), dim=1)
    none = multi_positive_contrastive(img, attr, torch.zeros(2, 3), torch.ones(2, 3, dtype=torch.bool), 0.1)
    assert float(none) == 0.0  # images without positives contribute nothing (no default labels)
