"""A timm image classifier: backbone + dropout + linear head (e.g. EfficientNet-B0: Dropout(0.2) + Linear(1280, C)),
or, with model.head_dims, an MLP head on the pooled features (e.g. ResNet-50 + 2048 -> 512 -> 204 for
COCO Attributes: Linear, ReLU, Dropout per hidden layer).

Backbone weights follow the same offline rules as every attrdist model (see models/backbone.py):
a local file or an already-populated cache, else random init said out loud. The classification
head loads only when the file has one of the same shape (e.g. ImageNet's 1000 classes); otherwise it
starts at random init and the key table in the log lists it as shape-mismatched or missing.
"""

from __future__ import annotations

import timm
import torch
from torch import nn

from attrdist.core.config import ModelConfig
from attrdist.errors import AttrdistError
from attrdist.models.backbone import load_pretrained


class Classifier(nn.Module):
    def __init__(self, net: nn.Module, weights_source: str):
        super().__init__()
        self.net = net
        self.weights_source = weights_source

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"logits": self.net(x)}


def mlp_head(in_dim: int, hidden: tuple[int, ...], out_dim: int, dropout: float) -> nn.Sequential:
    layers: list[nn.Module] = []
    for width in hidden:
        layers += [nn.Linear(in_dim, width), nn.ReLU(inplace=True), nn.Dropout(dropout)]
        in_dim = width
    return nn.Sequential(*layers, nn.Linear(in_dim, out_dim))


def build_classifier(cfg: ModelConfig, num_classes: int) -> Classifier:
    head_classes = 0 if cfg.head_dims else num_classes  # 0: timm returns pooled features, our MLP follows
    try:
        net = timm.create_model(cfg.backbone, pretrained=False, num_classes=head_classes,
                                drop_rate=0.0 if cfg.head_dims else cfg.dropout)
    except RuntimeError as e:
        raise AttrdistError(f"model.backbone={cfg.backbone!r}: {e}") from None
    if cfg.frozen_stages:
        raise AttrdistError("model.frozen_stages is not supported by model.name=classifier (it trains every layer)")
    source = load_pretrained(net, cfg.backbone, cfg.pretrained)
    if cfg.head_dims:
        net = nn.Sequential(net, mlp_head(net.num_features, cfg.head_dims, num_classes, cfg.dropout))
    return Classifier(net, source)
