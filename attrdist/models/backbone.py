"""timm backbones as spatial feature extractors, with offline-only pretrained weights and freezing.

Pretrained weights never come from the network. `pretrained` is
  ''      -> random init (said so in the log),
  a path  -> a local .safetensors (preferred) or .pth/.pt file, loaded with weights_only=True,
  'auto'  -> the file already in the local Hugging Face or torch hub cache for this timm model,
             if one is there; else random init with a clear message saying where to put weights.
"""

from __future__ import annotations

import logging
from pathlib import Path

import timm
import torch
from torch import nn

from attrdist.errors import AttrdistError

log = logging.getLogger("attrdist")


def cached_pretrained_file(arch: str) -> str | None:
    """Path of already-downloaded weights for a timm architecture, or None. Never downloads."""
    cfg = timm.models.get_pretrained_cfg(arch)
    if cfg is None:
        return None
    hf_id = getattr(cfg, "hf_hub_id", None)
    if hf_id:
        from huggingface_hub import try_to_load_from_cache

        for fname in ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin"):
            hit = try_to_load_from_cache(hf_id, fname)
            if isinstance(hit, str):
                return hit
    url = getattr(cfg, "url", None)
    if url:
        p = Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1]
        if p.is_file():
            return str(p)
    return None


def load_state_file(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise AttrdistError(f"{path}: pretrained weights file not found; set model.pretrained to a local file or ''")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise AttrdistError(f"{path}: cannot load as a weights-only checkpoint ({type(e).__name__}); convert it to .safetensors") from None
    for key in ("state_dict", "model", "module"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    return state


def load_pretrained(net: nn.Module, arch: str, pretrained: str, head_note: str = "") -> str:
    """Load `pretrained` ('' | path | 'auto') into `net` where names and shapes match; say what was used."""
    path = pretrained
    if pretrained == "auto":
        path = cached_pretrained_file(arch)
        if path is None:
            log.warning("no pretrained weights for %s in the local caches (nothing is downloaded): training from "
                        "scratch. Put weights in a file and set model.pretrained=PATH.", arch)
            return f"random init (no cached weights for {arch})"
    if not path:
        return "random init (model.pretrained='')"
    state = load_state_file(path)
    own = net.state_dict()
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    if not usable:
        raise AttrdistError(f"{path}: no tensor matches {arch} (wrong architecture?)")
    net.load_state_dict(usable, strict=False)
    return f"{path} ({len(usable)}/{len(own)} tensors{head_note})"


def create_backbone(arch: str, feature_level: int, pretrained: str) -> tuple[nn.Module, int, str]:
    """(feature extractor returning [B, C, h, w], C, description of the weights used)."""
    try:
        net = timm.create_model(arch, pretrained=False, features_only=True, out_indices=(feature_level,))
    except RuntimeError as e:
        raise AttrdistError(f"model.backbone={arch!r}: {e}") from None
    except IndexError:
        raise AttrdistError(f"model.feature_level={feature_level} does not exist for {arch}") from None
    source = load_pretrained(net, arch, pretrained)
    return net, net.feature_info.channels()[-1], source


def freeze_stages(net: nn.Module, stages: int) -> list[nn.Module]:
    """Freeze the stem and the first `stages` stages; return the frozen norm layers (kept in eval)."""
    if stages <= 0:
        return []
    info = net.feature_info.info
    if stages + 1 >= len(info):
        raise AttrdistError(f"model.frozen_stages={stages}: the backbone has only {len(info) - 1} freezable stages")
    boundary = info[stages + 1]["module"]
    prefixes = (boundary + ".", boundary.replace(".", "_") + ".")
    frozen_modules = []
    for name, module in net.named_modules():
        if name and name.startswith(prefixes):
            break
        if name and not any(True for _ in module.children()):
            for p in module.parameters(recurse=False):
                p.requires_grad_(False)
            frozen_modules.append(module)
    return [m for m in frozen_modules if isinstance(m, nn.modules.batchnorm._BatchNorm)]
