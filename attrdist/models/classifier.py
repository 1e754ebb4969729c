"""A timm image classifier: backbone + dropout + linear head (e.g. EfficientNet-B0: Dropout(0.2) + Linear(1280, C)).

Backbone weights follow the same offline rules as every attrdist model (see models/backbone.py):
a local file or an already-populated cache, else random init said out loud. The classification
head is always new (its shape depends on the classes).
"""

from __future__ import annotations

import timm
import torch
from torch import nn

from attrdist.config import ModelConfig
from attrdist.errors import AttrdistError
from attrdist.models.backbone import load_pretrained


class Classifier(nn.Module):
    def __init__(self, net: nn.Module, weights_source: str):
        super().__init__()
        self.net = net
        self.weights_source = weights_source

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"logits": self.net(x)}


def build_classifier(cfg: ModelConfig, num_classes: int) -> Classifier:
    try:
        net = timm.create_model(cfg.backbone, pretrained=False, num_classes=num_classes, drop_rate=cfg.dropout)
    except RuntimeError as e:
        raise AttrdistError(f"model.backbone={cfg.backbone!r}: {e}") from None
    source = load_pretrained(net, cfg.backbone, cfg.pretrained, head_note="; the head is new")
    return Classifier(net, source)
