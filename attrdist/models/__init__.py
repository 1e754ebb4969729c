"""Models built from config: `build_model(cfg.model, num_attributes)`."""

from __future__ import annotations

from torch import nn

from attrdist.core.config import ModelConfig
from attrdist.errors import AttrdistError


def build_model(cfg: ModelConfig, num_attributes: int, names: list[str] | None = None, *,
                state: dict | None = None) -> nn.Module:
    """`names` (the attribute/class names, from the manifest) are needed by model.attr_init=text.
    `state`: the checkpoint state dict the caller loads next; the detector takes its layout from it."""
    if cfg.name == "cross_modal":
        from attrdist.models.cross_modal import CrossModalAttributes

        return CrossModalAttributes(cfg, num_attributes, names)
    if cfg.name == "open_vocab_detector":
        from attrdist.pack.dior import prompt
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


def _batchnorms(model: nn.Module, skip: set[int]) -> list[tuple[nn.Module, str, nn.Module]]:
    """(parent, attribute name, module) of every BatchNorm*d below `model` not in `skip` (ids)."""
    out = []
    for parent in model.modules():
        for name, child in parent.named_children():
            if isinstance(child, nn.modules.batchnorm._BatchNorm) and id(child) not in skip:
                out.append((parent, name, child))
    return out


def convert_sync_batchnorm(model: nn.Module) -> int:
    """model.sync_bn: replace BatchNorm*d by torch.nn.SyncBatchNorm (same parameters and buffers, so
    the state dict and its keys are unchanged), except norms a model keeps in eval mode (frozen
    pretrained stages: `_frozen_norms`), which never use batch statistics. Returns how many."""
    skip = {id(m) for m in getattr(model, "_frozen_norms", ())}
    found = _batchnorms(model, skip)
    for parent, name, bn in found:
        setattr(parent, name, nn.SyncBatchNorm.convert_sync_batchnorm(bn))
    return len(found)


def freeze_batchnorm_stats(model: nn.Module) -> int:
    """model.freeze_bn_stats: every BatchNorm*d stays in eval mode whatever `model.train()` says (it
    normalises with its running statistics, which no longer update; weight and bias still train), so a
    sample's output does not depend on the rest of its batch. Returns how many."""
    import types

    def eval_only(self, mode: bool = True):
        return nn.Module.train(self, False)

    found = _batchnorms(model, set())
    for _parent, _name, bn in found:
        bn.train = types.MethodType(eval_only, bn)
        bn.eval()
    return len(found)
