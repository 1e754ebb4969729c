"""Cross-modal attribute recognition: attribute embeddings as queries over image features.

    image -> backbone -> [B, C, h, w] -> 1x1 conv -> tokens [B, hw, d] (+ conv position encoding)
    attribute embeddings E [A, d] --(queries)--> fusion_layers x (8-head attention over the tokens
    + FFN) --> [B, A, d] -> shared MLP head (head_dims, e.g. 256, 128) -> per-attribute linear -> logits [B, A]
    contrastive: pooled image embedding vs projected attribute embeddings (cosine / T)

The labels are never an input (the experiment reports' attribute encoder took the label vector:
that leaks the answer in training and has nothing to feed at test time). The attribute side is a
set of embeddings, learned from random init or initialised from an open_clip text tower over the
attribute names (model.attr_init=text; models/text.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from attrdist.core.config import ModelConfig
from attrdist.errors import AttrdistError
from attrdist.models.backbone import create_backbone, freeze_stages


class FusionBlock(nn.Module):
    """Attribute queries attend (multi-head) to image tokens, then a feed-forward layer; pre-norm, residual."""

    def __init__(self, d: int, heads: int, dropout: float):
        super().__init__()
        self.norm_q, self.norm_kv = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, dropout=dropout, batch_first=True)
        self.norm_ffn = nn.LayerNorm(d)
        self.ffn = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Dropout(dropout), nn.Linear(2 * d, d))

    def forward(self, q: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        kv = self.norm_kv(tokens)
        h = q + self.attn(self.norm_q(q), kv, kv, need_weights=False)[0]
        return h + self.ffn(self.norm_ffn(h))


def mlp(dims: list[int], dropout: float) -> nn.Sequential:
    """Linear -> GELU -> Dropout for each consecutive pair of widths (empty for one width)."""
    layers: list[nn.Module] = []
    for a, b in zip(dims[:-1], dims[1:]):
        layers += [nn.Linear(a, b), nn.GELU(), nn.Dropout(dropout)]
    return nn.Sequential(*layers)


class CrossModalAttributes(nn.Module):
    def __init__(self, cfg: ModelConfig, num_attributes: int, attribute_names: list[str] | None = None):
        super().__init__()
        d, A = cfg.dim, num_attributes
        self.backbone, channels, self.weights_source = create_backbone(cfg.backbone, cfg.feature_level, cfg.pretrained)
        self._frozen_norms = freeze_stages(self.backbone, cfg.frozen_stages)
        self.proj = nn.Sequential(nn.Conv2d(channels, d, 1), nn.BatchNorm2d(d), nn.GELU())
        self.pos = nn.Conv2d(d, d, 3, padding=1, groups=d)  # conditional position encoding
        self.attr_embed = nn.Parameter(torch.randn(A, d) * 0.02)
        self.blocks = nn.ModuleList(FusionBlock(d, cfg.heads, cfg.dropout) for _ in range(cfg.fusion_layers))
        self.norm_out = nn.LayerNorm(d)
        self.head = mlp([d, *cfg.head_dims], cfg.dropout)  # shared by every attribute query
        width = cfg.head_dims[-1] if cfg.head_dims else d
        self.cls_weight = nn.Parameter(torch.randn(A, width) * 0.02)
        self.cls_bias = nn.Parameter(torch.zeros(A))
        self.img_proj = nn.Linear(d, cfg.contrastive_dim)
        self.attr_proj = nn.Linear(d, cfg.contrastive_dim)
        self.attr_source = "learned (random init)"
        if cfg.attr_init == "text":
            self._init_from_text(cfg, attribute_names, A)

    def _init_from_text(self, cfg: ModelConfig, names: list[str] | None, A: int) -> None:
        """Attribute queries start as the text embeddings of their names, mapped to `dim` by a fixed
        seeded orthogonal projection and scaled to the learned init's spread; then they train."""
        from attrdist.models.text import encode_names

        if not names or len(names) != A:
            raise AttrdistError("model.attr_init=text needs the attribute names (from the shards' manifest)")
        emb, self.attr_source = encode_names(names, cfg.text_encoder, cfg.text_pretrained)  # [A, D], unit norm
        g = torch.Generator().manual_seed(0)
        q, _ = torch.linalg.qr(torch.randn(emb.shape[1], max(emb.shape[1], cfg.dim), generator=g))
        init = emb @ q[:, : cfg.dim]
        with torch.no_grad():
            self.attr_embed.copy_(init / init.std().clamp_min(1e-6) * 0.02)

    def train(self, mode: bool = True):
        super().train(mode)
        for m in self._frozen_norms:  # frozen pretrained stages keep their running statistics
            m.eval()
        return self

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        fmap = self.proj(self.backbone(x)[-1])
        fmap = fmap + self.pos(fmap)
        tokens = fmap.flatten(2).transpose(1, 2)  # [B, hw, d]
        h = self.attr_embed.unsqueeze(0).expand(x.shape[0], -1, -1)
        for block in self.blocks:
            h = block(h, tokens)
        logits = (self.head(self.norm_out(h)) * self.cls_weight).sum(-1) + self.cls_bias
        img = F.normalize(self.img_proj(tokens.mean(1)), dim=-1)
        attr = F.normalize(self.attr_proj(self.attr_embed), dim=-1)
        return {"logits": logits, "img_emb": img, "attr_emb": attr}
