"""Cross-modal attribute recognition: attribute embeddings as queries over image features.

    image -> backbone -> [B, C, h, w] -> 1x1 conv -> tokens [B, hw, d] (+ conv position encoding)
    attribute embeddings E [A, d] --(queries)--> 8-head attention over the tokens --> [B, A, d]
    -> FFN -> per-attribute linear -> logits [B, A]
    contrastive: pooled image embedding vs projected attribute embeddings (cosine / T)

The labels are never an input (the experiment reports' attribute encoder took the label vector:
that leaks the answer in training and has nothing to feed at test time). The attribute side is a
set of learned embeddings (a later recipe initialises them from a text encoder).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from attrdist.config import ModelConfig
from attrdist.models.backbone import create_backbone, freeze_stages


class CrossModalAttributes(nn.Module):
    def __init__(self, cfg: ModelConfig, num_attributes: int):
        super().__init__()
        d, A = cfg.dim, num_attributes
        self.backbone, channels, self.weights_source = create_backbone(cfg.backbone, cfg.feature_level, cfg.pretrained)
        self._frozen_norms = freeze_stages(self.backbone, cfg.frozen_stages)
        self.proj = nn.Sequential(nn.Conv2d(channels, d, 1), nn.BatchNorm2d(d), nn.GELU())
        self.pos = nn.Conv2d(d, d, 3, padding=1, groups=d)  # conditional position encoding
        self.attr_embed = nn.Parameter(torch.randn(A, d) * 0.02)
        self.norm_q, self.norm_kv = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, cfg.heads, dropout=cfg.dropout, batch_first=True)
        self.norm_ffn = nn.LayerNorm(d)
        self.ffn = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Dropout(cfg.dropout), nn.Linear(2 * d, d))
        self.norm_out = nn.LayerNorm(d)
        self.cls_weight = nn.Parameter(torch.randn(A, d) * 0.02)
        self.cls_bias = nn.Parameter(torch.zeros(A))
        self.img_proj = nn.Linear(d, cfg.contrastive_dim)
        self.attr_proj = nn.Linear(d, cfg.contrastive_dim)

    def train(self, mode: bool = True):
        super().train(mode)
        for m in self._frozen_norms:  # frozen pretrained stages keep their running statistics
            m.eval()
        return self

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        fmap = self.proj(self.backbone(x)[-1])
        fmap = fmap + self.pos(fmap)
        tokens = fmap.flatten(2).transpose(1, 2)  # [B, hw, d]
        q = self.attr_embed.unsqueeze(0).expand(x.shape[0], -1, -1)
        kv = self.norm_kv(tokens)
        h = q + self.attn(self.norm_q(q), kv, kv, need_weights=False)[0]
        h = h + self.ffn(self.norm_ffn(h))
        logits = (self.norm_out(h) * self.cls_weight).sum(-1) + self.cls_bias
        img = F.normalize(self.img_proj(tokens.mean(1)), dim=-1)
        attr = F.normalize(self.attr_proj(self.attr_embed), dim=-1)
        return {"logits": logits, "img_emb": img, "attr_emb": attr}
