"""timm backbones as spatial feature extractors, with offline-only pretrained weights and freezing.

Pretrained weights never come from the network. `pretrained` is
  'none'  -> random init, on purpose (said so in the log; '' is the same),
  a path  -> a local .safetensors (preferred) or .pth/.pt file, loaded with weights_only=True,
  'auto'  -> the file already in the local Hugging Face or torch hub cache for this timm model; if
             there is none the run stops (AttrdistError saying where weights go, and that 'none'
             trains from scratch): a recipe whose learning rate and frozen stages assume pretrained
             weights must not quietly train from scratch (characters' full profile did: chance accuracy).

Tensors are loaded where name and shape match the model; everything else is reported, never
silently dropped: a table in the log lists the model tensors the file lacks (missing, they keep
their random init), the file's tensors the model has no place for (unexpected), and those whose
shapes differ (e.g. a 1000-class head loaded into a 5-class model). A file that matches nothing
is an error. Checkpoints with other key names are converted once, offline, into a timm
.safetensors file (see models/convert.py):

    python -m attrdist.models.convert efficientnet-lite0 IN.pth OUT.safetensors
    python recipes/characters.py model.backbone=tf_efficientnet_lite0 model.pretrained=OUT.safetensors
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
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
        raise AttrdistError(f"{path}: pretrained weights file not found; set model.pretrained to a local file, or none")
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


@dataclass
class KeyReport:
    """How a checkpoint's tensors line up with a model's state dict."""

    usable: dict[str, torch.Tensor] = field(default_factory=dict)  # name and shape match: loaded
    missing: list[str] = field(default_factory=list)  # in the model, not in the file: stay at init
    unexpected: list[str] = field(default_factory=list)  # in the file, nowhere in the model
    mismatched: list[tuple[str, tuple, tuple]] = field(default_factory=list)  # (name, file shape, model shape)

    @property
    def clean(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)


def compare_keys(own: dict[str, torch.Tensor], state: dict) -> KeyReport:
    """Sort the checkpoint `state` against the model's `own` state dict. BatchNorm step counters
    (num_batches_tracked) absent from the file are not counted as missing: they hold no weights."""
    rep = KeyReport()
    for k, v in state.items():
        if k not in own or not isinstance(v, torch.Tensor):
            rep.unexpected.append(k)
        elif own[k].shape != v.shape:
            rep.mismatched.append((k, tuple(v.shape), tuple(own[k].shape)))
        else:
            rep.usable[k] = v
    rep.missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    return rep


def key_table(rep: KeyReport, path: str, limit: int = 10) -> str:
    """The report as a few readable lines: counts, then the first `limit` names of each kind."""
    shapes = [f"{k}: file {list(a)} vs model {list(b)}" for k, a, b in rep.mismatched]
    rows = [("missing (not in the file; random init)", rep.missing),
            ("unexpected (in the file; not used)", rep.unexpected),
            ("shape-mismatched (not loaded)", shapes)]
    lines = [f"pretrained weights {path}: {len(rep.usable)} tensors loaded"]
    for title, names in rows:
        if names:
            more = f"  ... and {len(names) - limit} more" if len(names) > limit else ""
            lines.append(f"  {len(names):5d} {title}:")
            lines += [f"          {n}" for n in names[:limit]] + ([more] if more else [])
    return "\n".join(lines)


FROM_SCRATCH = ("none", "")  # model.pretrained / text_pretrained values that mean random init, on purpose


def load_pretrained(net: nn.Module, arch: str, pretrained: str, head_note: str = "",
                    key_map: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None) -> str:
    """Load `pretrained` ('none' | path | 'auto') into `net` where names and shapes match; log a table of
    missing / unexpected / shape-mismatched keys; return a one-line description of what was used.
    'auto' with nothing cached is an AttrdistError. `key_map` (optional) renames a foreign checkpoint's keys
    before matching (see models/convert.py)."""
    path = pretrained
    if pretrained in FROM_SCRATCH:
        log.info("model.pretrained=none: %s trains from scratch (random init)", arch)
        return "random init (model.pretrained=none)"
    if pretrained == "auto":
        path = cached_pretrained_file(arch)
        if path is None:
            raise AttrdistError(f"model.pretrained=auto: no pretrained weights for {arch} in the local timm/HF caches "
                                f"(HF_HOME, TORCH_HOME; nothing is downloaded): put them there or pass "
                                f"model.pretrained=PATH (.safetensors/.pth), or model.pretrained=none to train from "
                                f"scratch on purpose (this profile's learning rate assumes pretrained weights)")
    state = load_state_file(path)
    if key_map is not None:
        state = key_map(state)
    own = net.state_dict()
    rep = compare_keys(own, state)
    if all(k.endswith("num_batches_tracked") for k in rep.usable):  # scalar counters fit any BatchNorm model
        raise AttrdistError(f"{path}: no tensor matches {arch} by name and shape (wrong architecture? convert it "
                            f"with python -m attrdist.models.convert)")
    net.load_state_dict(rep.usable, strict=False)
    if rep.missing or rep.mismatched:
        log.warning("%s", key_table(rep, str(path)))
    elif rep.unexpected:
        log.info("%s", key_table(rep, str(path)))
    else:
        log.info("pretrained weights %s: all %d tensors of %s loaded", path, len(rep.usable), arch)
    counts = f"{len(rep.missing)} missing, {len(rep.unexpected)} unexpected, {len(rep.mismatched)} shape-mismatched"
    return f"{path} ({len(rep.usable)}/{len(own)} tensors{head_note}; {counts})"


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
