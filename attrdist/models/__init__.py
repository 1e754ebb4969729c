"""Models built from config: `build_model(cfg.model, num_attributes)`."""

from __future__ import annotations

from torch import nn

from attrdist.config import ModelConfig
from attrdist.errors import AttrdistError


def build_model(cfg: ModelConfig, num_attributes: int, names: list[str] | None = None, *,
                state: dict | None = None) -> nn.Module:
    """`names` (the attribute/class names, from the manifest) are needed by model.attr_init=text.
    `state`: the checkpoint state dict the caller loads next; the detector takes its layout from it."""
    if cfg.name == "cross_modal":
        from attrdist.models.cross_modal import CrossModalAttributes

        return CrossModalAttributes(cfg, num_attributes, names)
    if cfg.name == "open_vocab_detector":
        from attrdist.dior import prompt
        from attrdist.models.detector import build_detector

        if not names:
            raise AttrdistError("model.name=open_vocab_detector needs the class names (from the shards' manifest)")
        return build_detector(cfg.detector, [prompt(n) for n in names], clip=cfg.backbone, checkpoint=cfg.pretrained,
                              frozen_stages=cfg.frozen_stages, state=state)
    if cfg.name == "classifier":
        from attrdist.models.classifier import build_classifier

        return build_classifier(cfg, num_attributes)
    raise AttrdistError(f"model.name={cfg.name!r}: unknown model (available: cross_modal, classifier, open_vocab_detector)")


def count_parameters(model: nn.Module) -> tuple[int, int]:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return total, trainable
