"""Pure loss functions of tensors. `mask` marks labelled entries (False = ignore)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _divide(total: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    return total / count.clamp_min(1e-6)  # a zero count has a zero total: 0, never NaN


def masked_bce(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor,
               count: torch.Tensor | None = None) -> torch.Tensor:
    """Mean BCE-with-logits over labelled entries only (mask True); 0 if none. `count`: the divisor
    instead of this batch's number of labelled entries (see `attribute_loss`)."""
    per = F.binary_cross_entropy_with_logits(logits.float(), labels.float(), reduction="none")
    m = mask.float()
    return _divide((per * m).sum(), m.sum() if count is None else count)


def multi_positive_contrastive(img: torch.Tensor, attr: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor,
                               temperature: float, count: torch.Tensor | None = None) -> torch.Tensor:
    """Image-to-attribute InfoNCE with several positives.

    img [B, D] and attr [A, D] are L2-normalised embeddings. For each image with at least one
    positive, the loss is the mean over its positives of -log softmax_a(sim / T); ignored
    (unlabelled) attributes are left out of the softmax. Images without positives contribute 0.
    The mean is over images with a positive, or `count` (see `attribute_loss`).
    """
    sim = (img.float() @ attr.float().t()) / temperature
    sim = sim.masked_fill(~mask, -1e4)  # finite: rows with no labelled entry must not give NaN grads
    logp = torch.log_softmax(sim, dim=1)
    pos = labels.float() * mask.float()
    npos = pos.sum(1)
    has = npos > 0
    per_img = -(torch.where(pos > 0, logp, torch.zeros_like(logp)) * pos).sum(1) / npos.clamp_min(1.0)
    return _divide(torch.where(has, per_img, torch.zeros_like(per_img)).sum(), has.float().sum() if count is None else count)


def loss_counts(labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[labelled entries, images with a positive]: the denominators of `attribute_loss`'s two means."""
    m = mask.float()
    return torch.stack([m.sum(), ((labels.float() * m).sum(1) > 0).float().sum()])


def attribute_loss(out: dict, labels: torch.Tensor, mask: torch.Tensor, valid: torch.Tensor, *,
                   bce_weight: float, contrastive_weight: float, temperature: float,
                   mean_counts=None) -> tuple[torch.Tensor, dict]:
    """Total loss of the cross-modal attribute model and its parts (for logging).

    `mean_counts` (data-parallel training): maps this rank's `loss_counts` to their mean over the
    ranks. Each rank then divides its sums by (global count / ranks), so the average DDP takes of the
    ranks' gradients is exactly the gradient of the global batch's mean, however the labelled entries
    and positives fall between ranks. Without it (one process) the divisors are this batch's counts."""
    mask = mask & valid[:, None]
    counts = loss_counts(labels, mask)
    if mean_counts is not None:
        counts = mean_counts(counts)  # collective: every rank calls it once per micro-batch
    bce = masked_bce(out["logits"], labels, mask, counts[0])
    total = bce_weight * bce
    parts = {"bce": bce.detach()}
    if contrastive_weight and "img_emb" in out:
        con = multi_positive_contrastive(out["img_emb"], out["attr_emb"], labels, mask, temperature, counts[1])
        total = total + contrastive_weight * con
        parts["contrastive"] = con.detach()
    return total, parts


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor, valid: torch.Tensor,
                  mean_counts=None) -> torch.Tensor:
    """Mean cross-entropy over valid one-label samples: `labels` one-hot (multi-hot rows with != 1 positive,
    or any unlabelled entry, are left out). `mean_counts`: as in `attribute_loss` (several ranks: divide by
    the global count)."""
    target = labels.argmax(1)
    keep = valid & (mask.all(1)) & (labels.sum(1) == 1)
    per = F.cross_entropy(logits.float(), target, reduction="none")
    count = keep.float().sum()
    if mean_counts is not None:
        count = mean_counts(count[None])[0]
    return (per * keep.float()).sum() / count.clamp_min(1e-6)
