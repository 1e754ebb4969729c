import math

import pytest
import torch

from attrdist.core.config import ScheduleConfig
from attrdist.core.losses import masked_bce, multi_positive_contrastive
from attrdist.core.schedules import lr_factor


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


def test_rank_split_with_global_counts_equals_the_global_batch_mean():
    """Two 'ranks' holding unequal numbers of labelled entries and positives: with mean_counts (the
    all-reduce mean of their counts) the average of their losses and gradients is exactly the loss
    and gradient of the whole batch in one process; with per-rank counts it is not."""
    from attrdist.core.losses import attribute_loss, loss_counts

    g = torch.Generator().manual_seed(0)
    B, A, D = 6, 5, 8
    logits = torch.randn(B, A, generator=g, requires_grad=True)
    img = torch.nn.functional.normalize(torch.randn(B, D, generator=g), dim=1).requires_grad_(True)
    attr = torch.nn.functional.normalize(torch.randn(A, D, generator=g), dim=1)
    labels = (torch.rand(B, A, generator=g) < 0.4).float()
    labels[:2] = 0  # rank 0's first images have no positive
    mask = torch.rand(B, A, generator=g) < 0.8
    mask[3:, :3] = False  # and rank 1 has fewer labelled entries
    valid = torch.ones(B, dtype=torch.bool)
    kw = dict(bce_weight=1.0, contrastive_weight=0.5, temperature=0.1)

    def run(parts, mean_counts):
        logits.grad = img.grad = None
        losses = [attribute_loss({"logits": logits[s], "img_emb": img[s], "attr_emb": attr}, labels[s], mask[s],
                                 valid[s], mean_counts=mean_counts, **kw)[0] for s in parts]
        (sum(losses) / len(losses)).backward()  # DDP averages the ranks' gradients
        return float(sum(losses) / len(losses)), logits.grad.clone(), img.grad.clone()

    whole = run([slice(0, B)], None)
    halves = [slice(0, 3), slice(3, B)]
    mean = torch.stack([loss_counts(labels[s], mask[s]) for s in halves]).mean(0)
    split = run(halves, lambda c: mean)
    assert split[0] == pytest.approx(whole[0], rel=1e-6)
    assert torch.allclose(split[1], whole[1], atol=1e-7) and torch.allclose(split[2], whole[2], atol=1e-7)
    naive = run(halves, None)  # each rank's own denominators: not the global mean here
    assert abs(naive[0] - whole[0]) > 1e-3
