"""Checkpoints that are never half-written and never execute code when loaded.

    <run>/checkpoints/step-00000420/model.safetensors   model weights (safetensors)
                                   /state.pt            optimizer, scheduler, loop state
                                                        (loads with torch.load(weights_only=True))
                                   /meta.json           epoch, step, attributes, config, and the
                                                        size + sha256 of every file above
    <run>/checkpoints/last.json, best.json              pointers: {"dir": "step-00000420", ...}

A checkpoint directory is written under a temporary name and renamed into place when complete;
the pointer files are replaced atomically after that. Loading verifies sizes and checksums and
falls back to the newest intact checkpoint, with a warning, when the pointed-to one is damaged.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from attrdist import atomic
from attrdist.errors import AttrdistError
from attrdist.shards import sha256_file

log = logging.getLogger("attrdist")
FILES = ("model.safetensors", "state.pt")
DEEPSPEED_DIR, DEEPSPEED_TAG = "deepspeed", "engine"  # <step dir>/deepspeed/engine/: the ZeRO partitions of every rank


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def save(ckpt_root: Path, *, step: int, model_state: dict, train_state: dict, meta: dict,
         pointers: tuple[str, ...] = ("last",), keep: int = 2, staged: Path | None = None) -> Path:
    """Write one checkpoint directory atomically and point `pointers` (last/best) at it. `staged`: a
    directory other ranks already wrote files into (DeepSpeed partitions); it becomes the checkpoint,
    every file in it listed with size and sha256 in meta.json."""
    ckpt_root.mkdir(parents=True, exist_ok=True)
    name = step_dir_name(step)
    final = ckpt_root / name
    if not final.exists():
        tmp = staged or ckpt_root / f".{name}.tmp-{os.getpid()}"
        if staged is None:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
        try:
            state = {k: v.detach().contiguous().cpu() for k, v in model_state.items()}
            save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
            torch.save(train_state, tmp / "state.pt")
            files = {}
            for path in sorted(q for q in tmp.rglob("*") if q.is_file()):
                f = path.relative_to(tmp).as_posix()
                with open(path, "rb") as fh:
                    os.fsync(fh.fileno())
                files[f] = {"bytes": path.stat().st_size, "sha256": sha256_file(path)}
            atomic.write_json(tmp / "meta.json", {**meta, "step": step, "files": files})
            os.replace(tmp, final)
            atomic.fsync_dir(ckpt_root)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    for p in pointers:
        atomic.write_json(ckpt_root / f"{p}.json", {"dir": name, "step": step, "epoch": meta.get("epoch")})
    _prune(ckpt_root, keep)
    return final


def _pointed(ckpt_root: Path) -> set[str]:
    out = set()
    for p in ckpt_root.glob("*.json"):
        try:
            out.add(json.loads(p.read_text())["dir"])
        except (OSError, ValueError, KeyError):
            pass
    return out


def _prune(ckpt_root: Path, keep: int) -> None:
    steps = sorted(d for d in ckpt_root.glob("step-*") if d.is_dir())
    protected = _pointed(ckpt_root) | {d.name for d in steps[-keep:]} if keep else _pointed(ckpt_root)
    for d in steps:
        if d.name not in protected:
            shutil.rmtree(d, ignore_errors=True)


def verify(ckpt_dir: Path) -> dict:
    """Return meta.json of an intact checkpoint, or raise AttrdistError saying what is wrong."""
    meta_path = ckpt_dir / "meta.json"
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError) as e:
        raise AttrdistError(f"{meta_path}: unreadable ({e})") from None
    for f, want in meta.get("files", {}).items():
        p = ckpt_dir / f
        if not p.is_file() or p.stat().st_size != want["bytes"]:
            raise AttrdistError(f"{p}: missing or wrong size (expected {want['bytes']} bytes)")
        if sha256_file(p) != want["sha256"]:
            raise AttrdistError(f"{p}: checksum mismatch (file corrupted)")
    return meta


def resolve(path: str | os.PathLike, which: str = "best") -> Path:
    """A checkpoint directory from a run dir, a checkpoints dir, a pointer file or a step dir."""
    p = Path(path)
    for root in (p / "checkpoints", p):
        ptr = root / f"{which}.json"
        if ptr.is_file():
            return root / json.loads(ptr.read_text())["dir"]
        if which == "best" and (root / "last.json").is_file():
            return root / json.loads((root / "last.json").read_text())["dir"]
    if p.suffix == ".json" and p.is_file():
        return p.parent / json.loads(p.read_text())["dir"]
    if (p / "meta.json").is_file():
        return p
    if p.name == "model.safetensors" and (p.parent / "meta.json").is_file():
        return p.parent
    raise AttrdistError(f"{p}: no checkpoint here (expected a run directory or a checkpoints/step-* directory)")


def find_resumable(ckpt_root: Path) -> tuple[Path, dict] | None:
    """The checkpoint `last` points at if intact, else the newest intact one (with a warning)."""
    if not ckpt_root.is_dir():
        return None
    candidates = []
    ptr = ckpt_root / "last.json"
    if ptr.is_file():
        try:
            candidates.append(ckpt_root / json.loads(ptr.read_text())["dir"])
        except (ValueError, KeyError):
            log.warning("%s is unreadable; looking for the newest intact checkpoint", ptr)
    candidates += sorted((d for d in ckpt_root.glob("step-*") if d.is_dir()), reverse=True)
    for i, d in enumerate(candidates):
        try:
            meta = verify(d)
        except AttrdistError as e:
            log.warning("skipping damaged checkpoint: %s", e)
            continue
        if i > 0:
            log.warning("resuming from %s instead of the damaged latest checkpoint", d)
        return d, meta
    return None


def load_model_state(ckpt_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(ckpt_dir / "model.safetensors"))


def init_model(model: torch.nn.Module, source: str | os.PathLike) -> Path:
    """run.init_from: load a whole model's weights from a checkpoint (run dir: its best; step dir;
    model.safetensors) or any .safetensors file of this model; every key must match."""
    p = Path(source)
    if p.suffix == ".safetensors" and p.is_file() and not (p.parent / "meta.json").is_file():
        file = p
    else:
        ckpt = resolve(p, "best")
        verify(ckpt)
        file = ckpt / "model.safetensors"
    try:
        state = load_file(str(file))
    except Exception as e:  # truncated or not safetensors
        raise AttrdistError(f"{file}: not a readable safetensors file ({type(e).__name__}); fix run.init_from") from None
    own = model.state_dict()
    missing, unexpected = sorted(own.keys() - state.keys()), sorted(state.keys() - own.keys())
    wrong = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    if missing or unexpected or wrong:
        raise AttrdistError(f"{file}: not this model's weights ({len(missing)} missing, {len(unexpected)} unexpected, "
                            f"{len(wrong)} shape-mismatched keys, e.g. {(missing + unexpected + wrong)[:3]}); "
                            f"run.init_from needs a checkpoint of the same recipe and model config")
    model.load_state_dict(state)
    log.info("model initialised from %s (%d tensors); fresh optimizer and schedule", file, len(state))
    return file


def load_train_state(ckpt_dir: Path) -> dict:
    return torch.load(ckpt_dir / "state.pt", map_location="cpu", weights_only=True)
