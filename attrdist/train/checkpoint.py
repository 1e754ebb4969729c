"""Checkpoints that are never half-written and never execute code when loaded.

    <run>/checkpoints/step-00000420/model.safetensors   model weights (safetensors)
                                   /state.pt            optimizer, scheduler, loop state
                                                        (loads with torch.load(weights_only=True))
                                   /meta.json           epoch, step, attributes, config, and the
                                                        size + sha256 of every file above
    <run>/checkpoints/last.json, best.json              pointers: {"dir": "step-00000420", ...}

A checkpoint directory is written under a temporary name and renamed into place when complete;
the pointer files are replaced atomically after that; an old checkpoint is renamed out of sight
before it is deleted. So a process killed at any instant leaves only complete checkpoints under
step-* names, plus hidden leftovers (.step-*) that `clean_stale` removes at the next start. A full
disk stops the run with one line naming the checkpoint, and the previous checkpoint stays as it was.
Loading verifies sizes and checksums; a resume falls back to the newest intact checkpoint, with a
warning naming the damaged file, and refuses (never starts over) when no checkpoint is intact.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from attrdist import atomic
from attrdist.errors import AttrdistError
from attrdist.atomic import sha256_file


log = logging.getLogger("attrdist")
FILES = ("model.safetensors", "state.pt")
DEEPSPEED_DIR, DEEPSPEED_TAG = "deepspeed", "engine"  # <step dir>/deepspeed/engine/: the ZeRO partitions of every rank


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


class DamagedCheckpoint(AttrdistError):
    """A checkpoint whose files do not match meta.json: `file` is the damaged file, `why` what is wrong."""

    def __init__(self, file: Path, why: str):
        super().__init__(f"{file}: {why}: this checkpoint is damaged; use another one (an earlier step-* directory "
                         f"beside it) or restore it from a copy")
        self.file, self.why = file, why


_NO_SPACE_TEXT = ("No space left on device", "os error 28", "Disk quota exceeded", "os error 122")


def no_space(e: BaseException | None) -> bool:
    """Whether an exception comes from a full disk (or quota), directly or through the exceptions it was
    raised from or while handling: torch.save into a file object reports ENOSPC as an unrelated
    RuntimeError raised while handling the OSError, safetensors as text ("os error 28")."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if any(t in str(e) for t in _NO_SPACE_TEXT):
            return True
        e = e.__cause__ or e.__context__
    return False


def no_space_error(ckpt_root: Path, what: str) -> AttrdistError:
    """The one-line error for a disk that filled up while writing `what` (a checkpoint or a pointer)."""
    try:
        free = f"{shutil.disk_usage(ckpt_root).free / 2**20:.1f} MiB free there now"
    except OSError:
        free = "free space unknown"
    prev = pointer_target(ckpt_root, "last")
    kept = f"the previous checkpoint {prev} is intact" if prev else "no earlier checkpoint exists"
    return AttrdistError(f"{ckpt_root / what}: no space left on device (disk or quota full) while writing it; nothing "
                         f"half-written was kept and {kept} ({free}): free space on that disk, or copy the run directory "
                         f"to another disk and point run.run_dir at it, then continue with --resume")


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
        try:
            if staged is None:
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir()
            state = {k: v.detach().contiguous().cpu() for k, v in model_state.items()}
            save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
            with open(tmp / "state.pt", "wb") as fh:  # a file object: a full disk surfaces as OSError(ENOSPC)
                torch.save(train_state, fh)
            files = {}
            for path in sorted(q for q in tmp.rglob("*") if q.is_file()):
                f = path.relative_to(tmp).as_posix()
                with open(path, "rb") as fh:
                    os.fsync(fh.fileno())
                files[f] = {"bytes": path.stat().st_size, "sha256": sha256_file(path)}
            atomic.write_json(tmp / "meta.json", {**meta, "step": step, "files": files})
            os.replace(tmp, final)
            atomic.fsync_dir(ckpt_root)
        except Exception as e:
            if not no_space(e):
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # give its space back before saying how much is free
            raise no_space_error(ckpt_root, name) from None
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    for p in pointers:
        try:
            atomic.write_json(ckpt_root / f"{p}.json", {"dir": name, "step": step, "epoch": meta.get("epoch")})
        except OSError as e:
            if not no_space(e):
                raise
            raise no_space_error(ckpt_root, f"{p}.json") from None
    _prune(ckpt_root, keep)
    return final


def pointer_target(ckpt_root: Path, which: str) -> Path | None:
    """The directory <ckpt_root>/<which>.json names, or None if that pointer is missing or unreadable."""
    try:
        return _read_pointer(ckpt_root / f"{which}.json")
    except AttrdistError:
        return None


def _read_pointer(ptr: Path) -> Path:
    """The checkpoint directory a pointer file names; AttrdistError when it is missing, garbled, or names
    anything but an existing step-* directory beside it."""
    try:
        name = json.loads(ptr.read_text())["dir"]
    except FileNotFoundError:
        raise AttrdistError(f"{ptr}: missing") from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise AttrdistError(f"{ptr}: unreadable checkpoint pointer ({type(e).__name__})") from None
    if not (isinstance(name, str) and name.startswith("step-") and Path(name).name == name):
        raise AttrdistError(f"{ptr}: names {name!r}, not a step-* directory beside it")
    if not (ptr.parent / name).is_dir():
        raise AttrdistError(f"{ptr}: names {name}, which is not there")
    return ptr.parent / name


def clean_stale(ckpt_root: Path) -> list[str]:
    """Remove what a killed writer left behind: hidden .step-* directories (being written, staged by
    DeepSpeed, or being deleted) and .*.tmp-* pointer files. Call it only while holding the run
    directory's lock: then no writer is alive. Returns the names removed."""
    removed = []
    for p in sorted(ckpt_root.glob(".*")) if ckpt_root.is_dir() else []:
        if p.is_dir() and p.name.startswith(".step-"):
            shutil.rmtree(p, ignore_errors=True)
        elif p.is_file() and ".tmp-" in p.name:
            p.unlink(missing_ok=True)
        else:
            continue
        removed.append(p.name)
    return removed


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
            trash = d.with_name(f".{d.name}.del-{os.getpid()}")
            try:  # out of sight first: a kill halfway through the delete leaves no partial step-* directory
                os.replace(d, trash)
            except OSError:
                continue
            shutil.rmtree(trash, ignore_errors=True)


def verify(ckpt_dir: Path) -> dict:
    """Return meta.json of an intact checkpoint, or raise DamagedCheckpoint naming the damaged file."""
    meta_path = ckpt_dir / "meta.json"
    try:
        meta = json.loads(meta_path.read_text())
        files = meta["files"]
        if not isinstance(files, dict) or "model.safetensors" not in files:
            raise ValueError("it lists no model.safetensors")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DamagedCheckpoint(meta_path, f"missing or unreadable ({type(e).__name__}: {e})") from None
    for f, want in files.items():
        p = ckpt_dir / f
        if not (isinstance(want, dict) and isinstance(want.get("bytes"), int) and isinstance(want.get("sha256"), str)):
            raise DamagedCheckpoint(meta_path, f"its entry for {f} is garbled")
        if not p.is_file():
            raise DamagedCheckpoint(p, "missing")
        if p.stat().st_size != want["bytes"]:
            raise DamagedCheckpoint(p, f"{p.stat().st_size} bytes, meta.json recorded {want['bytes']} (truncated or "
                                       f"overwritten)")
        if sha256_file(p) != want["sha256"]:
            raise DamagedCheckpoint(p, "sha256 differs from the one meta.json recorded when it was written (corrupted)")
    return meta


def resolve(path: str | os.PathLike, which: str = "best") -> Path:
    """A checkpoint directory from a run dir, a checkpoints dir, a pointer file or a step dir."""
    p = Path(path)
    fix = "; pass a checkpoints/step-* directory instead"
    for root in (p / "checkpoints", p):
        for name in (which, "last") if which == "best" else (which,):
            ptr = root / f"{name}.json"
            if ptr.is_file():
                try:
                    return _read_pointer(ptr)
                except AttrdistError as e:
                    raise AttrdistError(f"{e}{fix}") from None
    if p.suffix == ".json" and p.is_file():
        try:
            return _read_pointer(p)
        except AttrdistError as e:
            raise AttrdistError(f"{e}{fix}") from None
    if (p / "meta.json").is_file():
        return p
    if p.name == "model.safetensors" and (p.parent / "meta.json").is_file():
        return p.parent
    raise AttrdistError(f"{p}: no checkpoint here (expected a run directory or a checkpoints/step-* directory)")


def find_resumable(ckpt_root: Path) -> tuple[Path, dict] | None:
    """The checkpoint `last` points at if intact, else the newest intact one, with a warning that names
    each damaged file and the checkpoint used instead. None when there is no checkpoint at all; when
    there are checkpoints but none is intact, AttrdistError: a resume must not silently start over."""
    steps = sorted((d for d in ckpt_root.glob("step-*") if d.is_dir()), reverse=True) if ckpt_root.is_dir() else []
    ptr = ckpt_root / "last.json"
    if not steps and not ptr.exists():
        return None
    problems, candidates = [], []
    try:
        candidates.append(_read_pointer(ptr))
    except AttrdistError as e:
        problems.append(str(e))
    candidates += [d for d in steps if d not in candidates]
    for d in candidates:
        try:
            meta = verify(d)
        except DamagedCheckpoint as e:
            problems.append(f"{e.file}: {e.why}")
            continue
        if problems:
            log.warning("damaged checkpoint data: %s; resuming from %s (step %s), the newest intact checkpoint, "
                        "instead", "; ".join(problems), d, meta.get("step"))
        return d, meta
    raise AttrdistError(f"{ckpt_root}: no intact checkpoint to resume from ({'; '.join(problems)}); restore the "
                        f"checkpoints from a copy, or start over without --resume in another run.run_dir")


def set_aside_damaged(ckpt_root: Path, resumed: Path) -> list[Path]:
    """Rename the damaged step-* directories newer than the checkpoint a run resumes from to
    damaged-step-*-<time> (kept for inspection; never loaded, never pruned): the resumed run writes
    those steps again, and a save never replaces a directory already under a step's name."""
    moved = []
    for d in sorted(ckpt_root.glob("step-*")):
        if not d.is_dir() or d.name <= resumed.name:
            continue
        try:
            verify(d)
            continue
        except DamagedCheckpoint:
            pass
        dst = d.with_name(f"damaged-{d.name}-{time.strftime('%Y%m%d-%H%M%S')}")
        os.replace(d, dst)
        moved.append(dst)
    return moved


def load_model_state(ckpt_dir: Path) -> dict[str, torch.Tensor]:
    file = ckpt_dir / "model.safetensors"
    try:
        return load_file(str(file))
    except Exception as e:  # truncated, or not safetensors at all
        raise AttrdistError(f"{file}: not a readable safetensors file ({type(e).__name__}); use another checkpoint "
                            f"(an earlier step-* directory beside it) or restore it from a copy") from None


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
    """Tensors and plain data only (weights_only=True): a state.pt that would run code is refused."""
    file = ckpt_dir / "state.pt"
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:
        first = (str(e).strip().splitlines() or [""])[0][:160]
        raise AttrdistError(f"{file}: not loadable as tensors and plain data ({type(e).__name__}: {first}); attrdist "
                            f"never unpickles code from a checkpoint: use a checkpoint attrdist wrote") from None
