"""The run directory: chosen once (rank 0 decides, every rank agrees), locked while a run writes to it,
holding train.log (rank 0; other ranks log warnings to stdout).

    <out_dir>/<name>-YYYYmmdd-HHMMSS/   config.json, train.log, metrics.jsonl, checkpoints/, report.md, ...
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import time
from pathlib import Path

from attrdist.core.config import Config
from attrdist.errors import AttrdistError

log = logging.getLogger("attrdist")


def setup_logging(run_dir: Path | None, rank: int) -> None:
    fmt = logging.Formatter(f"%(asctime)s [rank{rank}] %(levelname)s %(message)s", "%H:%M:%S")
    log.handlers.clear()
    log.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    h = logging.StreamHandler(sys.stdout)
    h.setFormatter(fmt)
    log.addHandler(h)
    if run_dir is not None and rank == 0:
        fh = logging.FileHandler(run_dir / "train.log")
        fh.setFormatter(fmt)
        log.addHandler(fh)
    log.propagate = False


def planned_run_dir(cfg: Config) -> Path:
    """This process's choice of run directory (run.run_dir, the latest <out_dir>/<name>-* to resume, or a new
    timestamped one). Rank 0's is the run's: resolve_run_dir hands it to every rank. Known before the
    Accelerator exists: it is rank 0's accelerate project_dir (its trackers' files)."""
    r = cfg.run
    if r.run_dir:
        return Path(r.run_dir)
    base = Path(r.out_dir)
    existing = sorted(base.glob(f"{r.name}-2*")) if base.is_dir() else []
    if r.resume == "auto" and existing:
        return existing[-1]
    return base / f"{r.name}-{time.strftime('%Y%m%d-%H%M%S')}"


def resolve_run_dir(cfg: Config, acc, planned: Path | None = None) -> Path:
    """Same directory on every rank (rank 0 decides: its `planned` directory)."""
    from accelerate.utils import broadcast_object_list

    r = cfg.run
    chosen = str(planned or planned_run_dir(cfg))
    obj = [chosen, _lock_run_dir(Path(chosen)) if acc.is_main_process else None]
    if acc.num_processes > 1:
        broadcast_object_list(obj, from_process=0)  # rank 0's verdict on the lock reaches every rank
    run_dir = Path(obj[0])
    if obj[1]:
        raise AttrdistError(obj[1])
    has_ckpt = (run_dir / "checkpoints").is_dir() and any((run_dir / "checkpoints").glob("step-*"))
    if has_ckpt and r.resume != "auto":
        raise AttrdistError(f"{run_dir}: already holds a run; pass --resume (run.resume=auto) to continue it, "
                            f"or choose another run.run_dir")
    acc.wait_for_everyone()
    return run_dir


_RUN_LOCKS: list = []  # held for the life of the process


def _lock_run_dir(run_dir: Path) -> str | None:
    """Rank 0 holds <run_dir>/.run.lock while it runs (an fcntl lock: the kernel drops it when the
    process dies, SIGKILL included) and records itself (pid, host, start time) in .run.lock.json beside
    it, which the lock file cannot hold: contenders open it too. Returns the error when another live
    run holds the lock, naming that run."""
    from filelock import FileLock, Timeout

    from attrdist import atomic

    run_dir.mkdir(parents=True, exist_ok=True)
    lock, holder_file = FileLock(str(run_dir / ".run.lock")), run_dir / ".run.lock.json"
    try:
        lock.acquire(timeout=0)
    except Timeout:
        return (f"{run_dir}: another run is writing to this directory right now: {_lock_holder(holder_file)} (it holds "
                f"{run_dir}/.run.lock); wait for it to end or stop it, or choose another run.run_dir")
    _RUN_LOCKS.append(lock)
    atomic.write_json(holder_file, {"pid": os.getpid(), "host": socket.gethostname(),
                                    "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "argv": sys.argv})
    return None


def _lock_holder(holder_file: Path) -> str:
    """Who holds a run directory's lock, from the .run.lock.json it wrote; a holder on another host is
    said to be there: it may be alive on that node, which this one cannot check."""
    try:
        h = json.loads(holder_file.read_text())
        pid, host, started = int(h["pid"]), str(h["host"]), str(h["started"])
    except (OSError, ValueError, KeyError, TypeError):
        return f"holder unknown ({holder_file.name} is missing or unreadable)"
    if host == socket.gethostname():
        return f"pid {pid} on this host ({host}), started {started}; `kill {pid}` stops it (in its training loop it saves a checkpoint first)"
    return (f"pid {pid} on host {host}, another node, started {started}: the run may be alive there (check on {host}; "
            f"this node cannot see its processes)")
