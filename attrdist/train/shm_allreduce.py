"""DDP's gradient all-reduce through shared memory when every rank runs on this host's CPUs (`run.shm_allreduce`).

Why (bench/ddp.py; BENCHMARKS.md item 4): with 2 CPU ranks, gloo's all-reduce of ResNet-18's 11.2M fp32
gradients takes ~42 ms of a ~70 ms step, over loopback TCP. DeepSpeed ships a shared-memory all-reduce
kernel for ranks on one host (`deepspeed/ops/csrc/cpu/comm/shm.cpp`, built by its `ShareMemCommBuilder`):
the same reduction takes ~6-8 ms. attrdist uses that kernel as DDP's communication hook, with DDP's
gradients kept as views of its buckets (`gradient_as_bucket_view`), so no gradient is copied on the way.

    python -m launch local recipes/coconut.py --nproc 2                  # run.shm_allreduce=auto: shared memory here
    python -m launch local recipes/coconut.py --nproc 2 run.shm_allreduce=off  # gloo, as before

`run.shm_allreduce`:
  auto  shared memory when the run is CPU DDP with every rank on one node (the launcher's node layout,
        attrdist.train.nodes) and the kernel builds and maps; otherwise gloo, with the reason in train.log.
        A multi-node run uses gloo for the whole reduction (within its nodes too).
  on    the same, but the run fails with the reason instead of falling back.
  off   never: the process group's all-reduce (gloo on CPUs).

What is checked before it is used, since the kernel itself assumes all of it: every rank sees the other
ranks' files in /dev/shm (one host, one /dev/shm) and their processes (one pid namespace), /dev/shm has
room for the kernel's buffers (~66 MiB per rank; a full tmpfs would be a SIGBUS later), MASTER_ADDR and
MASTER_PORT name the segments, and the CPU has AVX2 (the kernel's fp32 path). Buckets that are not
contiguous float32 go through gloo (the kernel silently skips other dtypes).

The kernel waits for its peers by spinning on shared flags, with no timeout: a rank that died would leave
the others spinning forever, where gloo would have raised. So while a reduction is in flight a watchdog
thread checks every second that the peer processes are alive; if one has gone, or the reduction has run
longer than `run.dist_timeout_s`, it prints the one-line error a gloo timeout gives (attrdist/recipe.py) and
ends this process with status 2 (the launcher or srun then stops the rest). The segments are unlinked from /dev/shm as soon as every rank has mapped them, so a
crash leaves nothing behind.

Results are the same as gloo's: each rank's bucket is divided by the world size first, as DDP's own hook
does, and with 2 ranks each element is then a + b either way (IEEE addition commutes), so the losses and
weights are bit-identical (tests/test_shm_allreduce.py). With more ranks the summation order may differ.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import platform
import shutil
import sys
import threading
import time
import uuid
from pathlib import Path

import torch
import torch.distributed as dist

from attrdist.cache import cache_dir
from attrdist.errors import AttrdistError
from attrdist.train import nodes

log = logging.getLogger("attrdist")

SEGMENT_BYTES = 2 * 1048576 + 2 * 32 * 1048576  # shm.cpp's struct allreduce_workspace, per rank
_state: dict = {}  # this process's kernel, once initialised: {"world", "pids", "timeout_s"}


def cpu_kind(cpuinfo: str | None = None) -> str:
    """'cpu-' and 10 hex digits of this CPU's model name, instruction-set flags and architecture (`cpuinfo`:
    the text of /proc/cpuinfo, read when not given; elsewhere platform.processor())."""
    if cpuinfo is None:
        try:
            cpuinfo = open("/proc/cpuinfo").read()
        except OSError:
            cpuinfo = ""
    name = flags = ""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if not name and key.strip() == "model name":
            name = value.strip()
        elif not flags and key.strip() in ("flags", "Features"):  # x86, arm64
            flags = " ".join(sorted(value.split()))
    ident = f"{platform.machine()}|{name or platform.processor()}|{flags}"
    return "cpu-" + hashlib.sha256(ident.encode()).hexdigest()[:10]


def extensions_dir() -> str:
    """Where torch JIT-builds the kernel, and DeepSpeed its CPU ops (runtime.make_accelerator points
    TORCH_EXTENSIONS_DIR here): <TORCH_EXTENSIONS_DIR, else <cache>/torch_extensions>/<cpu_kind()>. One folder
    per kind of CPU because DeepSpeed compiles with -march=native and torch reuses a build whose sources and
    flags are unchanged: a cache on a cluster's shared file system would otherwise hand one node's build to a
    node with another CPU (an illegal instruction). Nodes with the same CPU share one build; torch's lock
    file in the build folder makes the first rank build it and the others wait."""
    base = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or cache_dir() / "torch_extensions")
    kind = cpu_kind()
    return str(base if base.name == kind else base / kind)


def build(verbose: bool = False):
    """Build (first time: ~25 s on 2 cores, cached in extensions_dir()) and load DeepSpeed's shm kernel."""
    os.environ["TORCH_EXTENSIONS_DIR"] = extensions_dir()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # else DeepSpeed warns that it fell back to CPU
    cpp_log = logging.getLogger("torch.utils.cpp_extension")
    level = cpp_log.level
    cpp_log.setLevel(logging.ERROR)  # "No CUDA runtime is found": true and irrelevant for a CPU kernel
    try:
        from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder

        return ShareMemCommBuilder().load(verbose=verbose)
    finally:
        cpp_log.setLevel(level)


def _segment_path(rank: int) -> str:
    # shm.cpp: "%s_%d_%s_%s" % (SHM_BUFFER_NAME, uid, MASTER_ADDR, MASTER_PORT), then "_%d" % rank
    return (f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
            f"{os.environ.get('MASTER_PORT', '')}_{rank}")


def _why_not(world: int, lay: nodes.Layout) -> str:
    """The reason this CPU DDP run cannot use the kernel, checked without touching the other ranks ('' = none)."""
    if lay.nodes > 1:
        return (f"the {world} ranks are on {lay.nodes} nodes ({lay.local_world} on this one), and shared memory "
                f"reaches only the ranks of one node")
    if not (os.environ.get("MASTER_ADDR") and os.environ.get("MASTER_PORT")):
        return "MASTER_ADDR/MASTER_PORT are not set (they name the shared segments)"
    if not os.path.isdir("/dev/shm"):
        return "no /dev/shm"
    free = shutil.disk_usage("/dev/shm").free
    if free < 2 * world * SEGMENT_BYTES:
        return f"/dev/shm has {free >> 20} MiB free, the kernel needs {world * SEGMENT_BYTES >> 20} MiB"
    return ""


def _agree(reason: str) -> str:
    """Collective: '' if no rank has a reason, else the first rank's ("rank R: reason"), on every rank."""
    reasons: list = [None] * dist.get_world_size()
    dist.all_gather_object(reasons, reason)
    return next((f"rank {r}: {x}" for r, x in enumerate(reasons) if x), "")


def _probe_peers(world: int) -> tuple[str, dict[int, int]]:
    """Collective: do all ranks share this /dev/shm and pid namespace? ('' or the reason, {rank: pid})."""
    probe = f"/dev/shm/attrdist-probe-{uuid.uuid4().hex}"
    with open(probe, "w"):
        pass
    try:
        seen: list = [None] * world
        dist.all_gather_object(seen, (probe, os.getpid()))
        missing = [r for r, (path, _) in enumerate(seen) if not os.path.exists(path)]
        dead = [r for r, (_, pid) in enumerate(seen) if not _alive(pid)]
        dist.barrier()
    finally:
        os.unlink(probe)
    if missing:
        return f"ranks {missing} use another /dev/shm", {}
    if dead:
        return f"ranks {dead} run in another pid namespace", {}
    return "", {r: pid for r, (_, pid) in enumerate(seen)}


def _alive(pid: int) -> bool:
    """The process exists and has not exited (an exited child its parent has not reaped yet is a zombie)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state not in ("Z", "X")


def _build_checked():
    """(kernel or None, '' or the reason it cannot be used here)."""
    try:
        kernel = build()
    except ModuleNotFoundError as e:  # the DeepSpeed extra is not installed
        return None, f"DeepSpeed is not installed ({e}; make setup-deepspeed: requirements/deepspeed.txt)"
    except Exception as e:  # no compiler, no ninja, a failed build: gloo still works
        return None, f"DeepSpeed's shm kernel did not build ({type(e).__name__}: {str(e).splitlines()[0][:200]})"
    if kernel.vector_kernel_level() < 1:
        return None, "this CPU lacks AVX2 (the kernel's fp32 path)"
    return kernel, ""


def setup(mode: str, *, device: str, deepspeed: str, timeout_s: float,
          layout: nodes.Layout | None = None) -> tuple[str, str]:
    """Collective over the default process group when there is one (every rank calls it with the same
    arguments, after the group is formed). Returns (choice, note): choice "shm" if DDP's gradients will go
    through the shared-memory kernel, else the process group's backend ("-" without one); note: what the
    gradient all-reduce is and, when it is not shared memory on CPU DDP, why (for train.log).
    `layout`: the run's node layout (nodes.gather() when not given)."""
    if not (dist.is_available() and dist.is_initialized()):
        return "-", ""
    backend = str(dist.get_backend())
    world, rank = dist.get_world_size(), dist.get_rank()
    if mode == "off" or world < 2 or device != "cpu" or deepspeed:  # the same on every rank: no collective
        if mode == "on" and world > 1:
            raise AttrdistError(f"run.shm_allreduce=on: the shared-memory all-reduce is for DDP on CPUs "
                                f"({'DeepSpeed' if deepspeed else device} run); set run.shm_allreduce=auto or off")
        if world < 2:
            return backend, ""
        why = "DeepSpeed's own" if deepspeed else "run.shm_allreduce=off" if device == "cpu" else ""
        return backend, f"{backend} ({why})" if why else backend
    lay = layout or nodes.gather()
    # each step is agreed on by all ranks before the next, so no rank waits in a collective the others skip
    reason = _agree(_why_not(world, lay))
    if not reason and _state:
        reason = _agree("" if _state["world"] == world else "the kernel was set up for another group here")
    elif not reason:
        reason, pids = _probe_peers(world)
        reason = _agree(reason)
        if not reason:
            kernel, why = _build_checked()
            reason = _agree(why)
        if not reason:
            os.environ["LOCAL_SIZE"] = str(world)  # the kernel maps shared memory only if LOCAL_SIZE == world
            kernel.initialize(world, rank)  # creates this rank's segment and maps every peer's
            dist.barrier()  # every rank has mapped every segment: the names can go
            with contextlib.suppress(FileNotFoundError):
                os.unlink(_segment_path(rank))
            _state.update(world=world, pids={r: p for r, p in pids.items() if r != rank})
    if not reason:
        _state["timeout_s"] = timeout_s
        return "shm", f"shared memory (DeepSpeed's kernel as DDP's hook), the {world} ranks on {lay.hosts[0]}"
    if mode == "on":
        raise AttrdistError(f"run.shm_allreduce=on: cannot use the shared-memory all-reduce ({reason}); "
                            f"set run.shm_allreduce=auto (falls back to {backend}) or off")
    return backend, f"{backend} (shared memory not used: {reason})"


class _Watchdog:
    """While a reduction is in flight: peers alive, within the timeout; else the error, and exit status 2."""

    def __init__(self, pids: dict[int, int], timeout_s: float):
        self.pids, self.timeout_s = pids, timeout_s
        self.since: float | None = None
        threading.Thread(target=self._run, name="attrdist-shm-watchdog", daemon=True).start()

    def _run(self) -> None:
        while True:
            time.sleep(1.0)
            since = self.since
            if since is None:
                continue
            gone = [r for r, pid in self.pids.items() if not _alive(pid)]
            waited = time.monotonic() - since
            if gone:
                msg = (f"rank(s) {gone} exited while this rank waited {waited:.0f} s in the shared-memory gradient "
                       f"all-reduce (their log says why); resume with --resume once it is fixed")
            elif waited > self.timeout_s:
                msg = (f"a collective timed out after run.dist_timeout_s={self.timeout_s:g} s: another rank is stuck "
                       f"or died (its log says why); resume with --resume once it is fixed (the shared-memory "
                       f"gradient all-reduce: the other ranks did not arrive)")
            else:
                continue
            # the main thread is inside the kernel and cannot raise: say it as user_errors() would, and exit
            log.error(msg)
            print(f"attrdist: error: {msg}", file=sys.stderr, flush=True)
            logging.shutdown()
            os._exit(AttrdistError.exit_code)


def register(model) -> None:
    """Make `model` (DistributedDataParallel, built with gradient_as_bucket_view=True) reduce its gradient
    buckets with the kernel. setup() must have returned "shm"."""
    world = _state["world"]
    watchdog = _Watchdog(_state["pids"], _state["timeout_s"])
    reduce_ = torch.ops.deepspeed.inference_all_reduce_

    def hook(_, bucket):
        buf = bucket.buffer().div_(world)  # divided first, as DDP's own hook does: the same bits as gloo
        if buf.dtype == torch.float32 and buf.is_contiguous():
            watchdog.since = time.monotonic()
            try:
                reduce_(buf)  # in place; the GIL is released while it runs, so the watchdog can act
            finally:
                watchdog.since = None
        else:
            dist.all_reduce(buf)
        fut = torch.futures.Future()
        fut.set_result(buf)
        return fut

    model.register_comm_hook(None, hook)


if __name__ == "__main__":  # `make setup` pre-builds the kernel so the first 2-rank run does not wait for it
    t = time.time()
    try:
        build()
        print(f"attrdist: DeepSpeed's shared-memory all-reduce kernel is built ({time.time() - t:.0f} s) in "
              f"{extensions_dir()}")
    except Exception as e:
        print(f"attrdist: DeepSpeed's shared-memory all-reduce kernel did not build ({type(e).__name__}: "
              f"{str(e).splitlines()[0][:300]}); CPU DDP runs will use gloo", file=sys.stderr)
