"""The process's runtime: device, precision, threads, accelerate, and what we actually got.

Traps this module exists for (measured, see the project's stack notes): `accelerate launch --cpu
--num_processes 2` silently runs ONE process; `--multi_gpu` without CPU mode on a CPU machine runs
2 independent single processes; fp16 autocast on CPU is a silent no-op. So every run states the
world size, backend, distributed type and precision it got, and fails when that is not what the
launcher (or run.world_size) asked for.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from dataclasses import dataclass
from datetime import timedelta

import torch

from attrdist.errors import AttrdistError
from attrdist.malloc import tune_malloc

log = logging.getLogger("attrdist")


def choose_device(pref: str = "auto", key: str = "run.device") -> str:
    """CUDA > MPS > CPU, or the requested one if available (`key`: how the user asked, for the error)."""
    has = {"cuda": torch.cuda.is_available(),
           "mps": getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available(),
           "cpu": True}
    if pref == "auto":
        return next(d for d in ("cuda", "mps", "cpu") if has[d])
    if not has[pref]:
        sep = "=" if key.startswith("run.") else " "
        raise AttrdistError(f"{key}{sep}{pref}: not available on this machine (use {key}{sep}auto)")
    return pref


def cpu_has_bf16() -> bool:
    """True if this CPU has native bf16 arithmetic (AVX512_BF16 or AMX); else bf16 is emulated/slow."""
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(pref: str, device: str) -> str:
    """accelerate's mixed_precision value: 'no', 'bf16' or 'fp16'. Refuses what would be a lie."""
    if pref == "fp16" and device != "cuda":
        raise AttrdistError(f"run.precision=fp16 is CUDA-only: on {device} fp16 autocast is a silent no-op "
                            f"(and fp16 CPU matmul is ~100x slower); use run.precision=bf16 or fp32")
    if pref == "bf16" and device == "cuda" and not torch.cuda.is_bf16_supported():
        raise AttrdistError("run.precision=bf16: this GPU has no bf16 support; use run.precision=fp16 or fp32")
    if pref == "auto":
        if device == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "no"
        if device == "cpu":
            return "bf16" if cpu_has_bf16() else "no"
        return "no"
    return {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[pref]


def _single_process_env(env_world: int) -> None:
    """DeepSpeed always forms a process group; `python recipes/X.py run.deepspeed=...` (no launcher) gets
    the environment of a 1-rank group on a free local port."""
    if env_world == 1 and "MASTER_ADDR" not in os.environ:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1",
                          LOCAL_WORLD_SIZE="1")


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


@dataclass(frozen=True)
class RuntimeInfo:
    device: str
    distributed_type: str
    backend: str | None
    world_size: int
    rank: int
    local_rank: int
    mixed_precision: str
    threads: int
    launcher: str
    engine: str = "ddp"  # or deepspeed-zero1/2/3
    malloc: str = "system"  # "keep": tune_malloc applied
    allreduce: str = "-"  # gradient all-reduce: "shm" (attrdist.train.shm_allreduce), else the group's backend

    def describe(self) -> str:
        return (f"world_size={self.world_size} rank={self.rank} local_rank={self.local_rank} device={self.device} "
                f"distributed={self.distributed_type} engine={self.engine} backend={self.backend} "
                f"mixed_precision={self.mixed_precision} threads={self.threads} malloc={self.malloc} allreduce={self.allreduce} "
                f"launcher={self.launcher}")


def _launcher_num_processes() -> int:
    """--num_processes of an `accelerate launch` parent process, if that is what started us.

    Catches `accelerate launch --cpu --num_processes 2`, which starts ONE process and sets no
    variable saying 2 were asked for.
    """
    try:
        argv = open(f"/proc/{os.getppid()}/cmdline", "rb").read().decode(errors="replace").split("\0")
    except OSError:
        return 0
    head = " ".join(argv[:3])
    if not ("accelerate.commands.launch" in head or ("accelerate" in head and "launch" in argv[:4])):
        return 0
    for i, a in enumerate(argv):
        if a in ("--num_processes", "--num-processes") and i + 1 < len(argv) and argv[i + 1].isdigit():
            return int(argv[i + 1])
        if a.startswith(("--num_processes=", "--num-processes=")) and a.split("=", 1)[1].isdigit():
            return int(a.split("=", 1)[1])
    return 0


def _expected_world_size(cfg_world_size: int) -> tuple[int, str]:
    if cfg_world_size:
        return cfg_world_size, "run.world_size"
    for var in ("ATTRDIST_EXPECT_WORLD_SIZE", "WORLD_SIZE"):
        if os.environ.get(var):
            return int(os.environ[var]), var
    n = _launcher_num_processes()
    return n, "accelerate launch --num_processes"


def _deepspeed_plugin(run_cfg, optim_cfg, global_batch: int, world: int, mp: str, device: str):
    """accelerate's DeepSpeedPlugin for run.deepspeed, checked against the traps in the module docstring."""
    from accelerate.utils import DeepSpeedPlugin

    from attrdist.train import zero

    if os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes"):
        raise AttrdistError("run.deepspeed is set but ACCELERATE_USE_CPU=1 is in the environment: accelerate would "
                            "silently train with DDP instead; unset it (python -m launch local ... --deepspeed zeroN "
                            "starts DeepSpeed correctly)")
    if global_batch % world:
        raise AttrdistError(f"data.batch_size={global_batch} is not divisible by the {world} processes")
    ds = zero.build(run_cfg, optim_cfg, global_batch=global_batch, world=world, precision=mp, device=device)
    log.info("DeepSpeed config: %s", json.dumps(ds, sort_keys=True))
    return DeepSpeedPlugin(hf_ds_config=ds)


def make_accelerator(run_cfg, optim_cfg, global_batch: int):
    """Create the Accelerator for this process and verify what it got. Returns (accelerator, RuntimeInfo).
    `global_batch`: data.batch_size (samples per micro-step over all ranks; DeepSpeed's config needs it)."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs

    from attrdist.train import shm_allreduce

    device = choose_device(run_cfg.device)
    mp = resolve_precision(run_cfg.precision, device)
    env_world = int(os.environ.get("WORLD_SIZE", "1"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", env_world)))
    slurm_cpus = int(os.environ.get("SLURM_CPUS_PER_TASK") or 0)  # SLURM's share when it set one
    threads = run_cfg.threads or slurm_cpus or max(1, available_cores() // max(1, local_world))
    torch.set_num_threads(threads)
    malloc = "keep" if tune_malloc(run_cfg.malloc) else "system"
    handlers = []
    if env_world > 1 or run_cfg.deepspeed:
        group = {"timeout": timedelta(seconds=run_cfg.dist_timeout_s)}
        if device == "cpu":
            group["backend"] = "gloo"  # DeepSpeed on CPU needs it even for 1 rank
        handlers.append(InitProcessGroupKwargs(**group))
    if env_world > 1 and device == "cpu" and not run_cfg.deepspeed and run_cfg.shm_allreduce != "off":
        # gradients as views of DDP's buckets: the shm hook reduces them in place, nothing is copied
        handlers.append(DistributedDataParallelKwargs(gradient_as_bucket_view=True))
    if run_cfg.deepspeed:
        _single_process_env(env_world)
        plugin = _deepspeed_plugin(run_cfg, optim_cfg, global_batch, env_world, mp, device)
        # precision lives in the DeepSpeed config (torch_autocast / fp16): accelerate must not add its own
        acc = Accelerator(deepspeed_plugin=plugin, mixed_precision="no", gradient_accumulation_steps=optim_cfg.grad_accum,
                          kwargs_handlers=handlers, step_scheduler_with_optimizer=False)
    else:
        acc = Accelerator(cpu=(device == "cpu"), mixed_precision=mp, gradient_accumulation_steps=optim_cfg.grad_accum,
                          kwargs_handlers=handlers, step_scheduler_with_optimizer=False)
    state = acc.state
    backend = getattr(state, "backend", None)
    launcher = os.environ.get("ATTRDIST_LAUNCHER") or (  # attrdist.train.slurm_job: job, nodes x tasks, master
        "torchrun/accelerate" if "TORCHELASTIC_RUN_ID" in os.environ else
        "slurm" if "SLURM_JOB_ID" in os.environ else "python")
    info = RuntimeInfo(device=device, distributed_type=str(state.distributed_type).split(".")[-1], backend=backend,
                       world_size=acc.num_processes, rank=acc.process_index, local_rank=acc.local_process_index,
                       mixed_precision=mp if run_cfg.deepspeed else str(acc.mixed_precision), threads=threads,
                       launcher=launcher, engine=f"deepspeed-{run_cfg.deepspeed}" if run_cfg.deepspeed else "ddp",
                       malloc=malloc)
    if not run_cfg.deepspeed and info.distributed_type == "DEEPSPEED":
        raise AttrdistError("accelerate's config turned DeepSpeed on but run.deepspeed is empty: set run.deepspeed=zero1|"
                            "zero2|zero3 (attrdist then builds the DeepSpeed config from the run's and checkpoints "
                            "every rank's partitions), or turn DeepSpeed off in `accelerate config`")
    if run_cfg.deepspeed and info.distributed_type != "DEEPSPEED":
        raise AttrdistError(f"run.deepspeed={run_cfg.deepspeed} but accelerate set up {info.distributed_type}; launch with "
                            f"`python -m launch local SCRIPT --nproc N --deepspeed {run_cfg.deepspeed}`")
    expected, source = _expected_world_size(run_cfg.world_size)
    if expected and expected != acc.num_processes:
        raise AttrdistError(f"asked for {expected} processes ({source}) but this process sees world size "
                            f"{acc.num_processes} ({info.distributed_type}); on CPU launch with "
                            f"`python -m launch local SCRIPT --nproc {expected}` (it sets the flags that really give {expected} ranks)")
    if run_cfg.world_size and env_world != acc.num_processes:
        raise AttrdistError(f"WORLD_SIZE={env_world} in the environment but accelerate formed {acc.num_processes} ranks")
    allreduce = shm_allreduce.setup(run_cfg.shm_allreduce, device=device, deepspeed=run_cfg.deepspeed,
                                    timeout_s=run_cfg.dist_timeout_s)
    return acc, dataclasses.replace(info, allreduce=allreduce)


def exit_without_native_teardown() -> None:
    """Make this process's coming normal exit skip the interpreter's native teardown (`os._exit` in an atexit
    handler, after logging and stdio are flushed). For a distributed run that finished: torch's DDP keeps the
    gloo process group and its threads alive after `destroy_process_group` (measured with torch 2.14.1:
    `pt_gloo_runloop` x2 and `gloo_tcp_loop` remain even once the DDP module is collected;
    tests/test_exit.py), and tearing them down at exit once aborted a SLURM task after its result was
    written ("terminate called without an active exception", SIGABRT), failing a job that had succeeded.
    Call it only when all the work is done and the exit status is 0. An exception that escapes afterwards
    (e.g. submitit failing to write the result) still exits 1 as usual: the handler steps aside for it."""
    import atexit
    import sys

    def _exit() -> None:
        if getattr(sys, "last_value", None) is not None:  # an uncaught exception is on its way out: exit 1
            return
        logging.shutdown()
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os._exit(0)

    atexit.register(_exit)
