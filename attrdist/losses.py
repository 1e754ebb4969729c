"""Pure loss functions of tensors. `mask` marks labelled entries (False = ignore)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def masked_bce(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean BCE-with-logits over labelled entries only (mask True); 0 if none."""
    per = F.binary_cross_entropy_with_logits(logits.float(), labels.float(), reduction="none")
    m = mask.float()
    return (per * m).sum() / m.sum().clamp_min(1.0)


def multi_positive_contrastive(img: torch.Tensor, attr: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor,
                               temperature: float) -> torch.Tensor:
    """Image-to-attribute InfoNCE with several positives.

    img [B, D] and attr [A, D] are L2-normalised embeddings. For each image with at least one
    positive, the loss is the mean over its positives of -log softmax_a(sim / T); ignored
    (unlabelled) attributes are left out of the softmax. Images without positives contribute 0.
    """
    sim = (img.float() @ attr.float().t()) / temperature
    sim = sim.masked_fill(~mask, -1e4)  # finite: rows with no labelled entry must not give NaN grads
    logp = torch.log_softmax(sim, dim=1)
    pos = labels.float() * mask.float()
    npos = pos.sum(1)
    has = npos > 0
    if not has.any():
        return sim.new_zeros(())
    per_img = -(torch.where(pos > 0, logp, torch.zeros_like(logp)) * pos).sum(1) / npos.clamp_min(1.0)
    return per_img[has].mean()


def attribute_loss(out: dict, labels: torch.Tensor, mask: torch.Tensor, valid: torch.Tensor, *,
                   bce_weight: float, contrastive_weight: float, temperature: float) -> tuple[torch.Tensor, dict]:
    """Total loss of the cross-modal attribute model and its parts (for logging)."""
    mask = mask & valid[:, None]
    bce = masked_bce(out["logits"], labels, mask)
    total = bce_weight * bce
    parts = {"bce": bce.detach()}
    if contrastive_weight and "img_emb" in out:
        con = multi_positive_contrastive(out["img_emb"], out["attr_emb"], labels, mask, temperature)
        total = total + contrastive_weight * con
        parts["contrastive"] = con.detach()
    return total, parts
