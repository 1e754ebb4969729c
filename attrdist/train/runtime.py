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
        if device == "cuda":  # native bf16 only (compute capability >= 8.0): torch's default answer counts
            # emulation too, True on a V100 or T4, which have no bf16 tensor cores
            return "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "no"
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
    allreduce_note: str = ""  # what the gradient all-reduce is and why (train.log)
    node_rank: int = 0  # this rank's node (attrdist.train.nodes)
    nodes: int = 1
    layout: str = ""  # nodes.Layout.describe(): hosts and ranks of a multi-rank run (train.log)
    launcher_notes: tuple[str, ...] = ()  # how accelerate's own settings were honoured (launcher_settings)
    precision_pref: str = "auto"  # run.precision after the launcher's explicit setting (an explicit one is no 'auto')
    host_sync: str = "step"  # run.host_sync resolved (attrdist.train.agreement): "step" or "lagged"

    def describe(self) -> str:
        return (f"world_size={self.world_size} rank={self.rank} local_rank={self.local_rank} nodes={self.nodes} "
                f"node_rank={self.node_rank} device={self.device} "
                f"distributed={self.distributed_type} engine={self.engine} backend={self.backend} "
                f"mixed_precision={self.mixed_precision} threads={self.threads} malloc={self.malloc} allreduce={self.allreduce} "
                f"host_sync={self.host_sync} launcher={self.launcher}")


def _launcher_argv() -> list[str]:
    """The command line of an `accelerate launch` parent process, if that is what started us (Linux: /proc);
    [] otherwise (another launcher, or no /proc)."""
    try:
        argv = open(f"/proc/{os.getppid()}/cmdline", "rb").read().decode(errors="replace").split("\0")
    except OSError:
        return []
    head = " ".join(argv[:3])
    if not ("accelerate.commands.launch" in head or ("accelerate" in head and "launch" in argv[:4])):
        return []
    return argv


def _argv_value(argv: list[str], name: str) -> str | None:
    """The value of `--name X` / `--name=X` (underscores or dashes) in a launcher's argv, else None."""
    spellings = (f"--{name}", f"--{name.replace('_', '-')}")
    for i, a in enumerate(argv):
        if a in spellings and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith(tuple(s + "=" for s in spellings)):
            return a.split("=", 1)[1]
    return None


def _launcher_num_processes() -> int:
    """--num_processes of an `accelerate launch` parent process, if that is what started us.

    Catches `accelerate launch --cpu --num_processes 2`, which starts ONE process and sets no
    variable saying 2 were asked for.
    """
    n = _argv_value(_launcher_argv(), "num_processes")
    return int(n) if n and n.isdigit() else 0


_PRECISION_OF = {"no": "fp32", "bf16": "bf16", "fp16": "fp16"}  # accelerate's mixed_precision -> run.precision


def _accelerate_config(argv: list[str]) -> tuple[str, dict]:
    """(path, contents) of the accelerate config file the launcher read: its --config_file, else accelerate's
    default file (`accelerate config` writes it) when it exists; ("", {}) when there is none."""
    path = _argv_value(argv, "config_file")
    if not path:
        from accelerate.commands.config.config_args import default_config_file

        path = default_config_file if os.path.isfile(default_config_file) else ""
    if not path:
        return "", {}
    try:
        text = open(path).read()
        if path.endswith(".json"):
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except (OSError, ValueError, ImportError) as e:
        raise AttrdistError(f"{path}: the accelerate config file cannot be read ({e}); fix or remove it "
                            f"(`accelerate config` rewrites it)") from None
    return path, data if isinstance(data, dict) else {}


@dataclass(frozen=True)
class LauncherSettings:
    """What attrdist resolved from accelerate's own settings (`accelerate launch` flags, `accelerate config`'s
    file, ACCELERATE_* variables) against the run's config: the device and precision preferences handed to
    choose_device / resolve_precision, the threads, and one log line per decision."""

    device: str
    precision: str
    threads: int
    notes: tuple[str, ...] = ()


def launcher_settings(run_cfg, optim_cfg) -> LauncherSettings:
    """Honour what the user told accelerate, or stop with one line naming both settings and how to agree.

    accelerate's launcher hands its settings to the process as environment variables, which an Accelerator
    built with explicit arguments (as attrdist builds it) silently ignores. Here, per setting:
    - mixed precision (ACCELERATE_MIXED_PRECISION): the launcher always sets it, to 'no' when the user
      chose nothing, so a 'no' is explicit only when the launcher's argv (/proc/<parent>/cmdline) holds
      --mixed_precision or its config file holds mixed_precision; any other value is explicit. Explicit:
      run.precision=auto follows it; another run.precision must agree with it, else the run stops.
      Not visible (no /proc, or a launcher in between) and 'no': taken as the launcher's default.
    - ACCELERATE_GRADIENT_ACCUMULATION_STEPS (launcher --gradient_accumulation_steps, DeepSpeed config): the
      Accelerator would take it over optim.grad_accum, out of step with the loop: it must equal optim.grad_accum.
    - ACCELERATE_USE_CPU (launcher --cpu): run.device=auto follows it; cuda/mps stops the run.
    - launcher --num_cpu_threads_per_process N: run.threads=0 follows it; another run.threads stops the run.
    - ACCELERATE_USE_FSDP: attrdist has no FSDP path: stops the run.
    - ACCELERATE_DYNAMO_BACKEND: attrdist passes no dynamo_backend, so accelerate already honours it (logged).
    """
    env, argv, notes = os.environ, _launcher_argv(), []
    truthy = ("1", "true", "yes")
    device, precision, threads = run_cfg.device, run_cfg.precision, run_cfg.threads
    if env.get("ACCELERATE_USE_FSDP", "").lower() in truthy:
        raise AttrdistError("ACCELERATE_USE_FSDP is set (accelerate launch --use_fsdp or `accelerate config`): attrdist "
                            "trains with DDP or DeepSpeed only; turn FSDP off and use run.deepspeed=zero3 to shard")
    env_mp = env.get("ACCELERATE_MIXED_PRECISION")
    if env_mp is not None:
        env_mp = env_mp.lower()
        source = None
        flag = _argv_value(argv, "mixed_precision") if argv else None
        path, conf = _accelerate_config(argv) if argv else ("", {})
        if flag:
            source = f"accelerate launch --mixed_precision {flag}"
        elif conf.get("mixed_precision"):
            source = f"mixed_precision: {conf['mixed_precision']} in {path} (accelerate config)"
        elif env_mp != "no":
            source = f"ACCELERATE_MIXED_PRECISION={env_mp}"
        if source is None:
            notes.append(f"ACCELERATE_MIXED_PRECISION=no is accelerate launch's default (no --mixed_precision, no "
                         f"config file value{'' if argv else '; launcher command line not visible'}): "
                         f"run.precision={run_cfg.precision} decides")
        else:
            wanted = _PRECISION_OF.get(env_mp)
            if wanted is None:
                raise AttrdistError(f"{source}: attrdist trains in fp32, bf16 or fp16 only (run.precision); launch "
                                    f"with --mixed_precision no|bf16|fp16")
            if run_cfg.precision == "auto":
                precision = wanted
                notes.append(f"precision from the launcher: {source} -> run.precision={wanted} (run.precision=auto "
                             f"follows an explicit launcher setting)")
            elif run_cfg.precision != wanted:
                raise AttrdistError(f"run.precision={run_cfg.precision} conflicts with {source}: make them agree (pass "
                                    f"run.precision={wanted}, or change the launcher's mixed precision; run.precision="
                                    f"auto follows the launcher)")
    ga = env.get("ACCELERATE_GRADIENT_ACCUMULATION_STEPS")
    if ga is not None and ga.strip() != str(optim_cfg.grad_accum):
        raise AttrdistError(f"ACCELERATE_GRADIENT_ACCUMULATION_STEPS={ga} (accelerate launch --gradient_accumulation_"
                            f"steps or its DeepSpeed config) conflicts with optim.grad_accum={optim_cfg.grad_accum}, "
                            f"which attrdist's loop follows: pass optim.grad_accum={ga}, or drop the launcher's setting")
    if env.get("ACCELERATE_USE_CPU", "").lower() in truthy and not run_cfg.deepspeed:
        if run_cfg.device == "auto":
            device = "cpu"
            notes.append("device from the launcher: ACCELERATE_USE_CPU is set (accelerate launch --cpu) -> cpu")
        elif run_cfg.device != "cpu":
            raise AttrdistError(f"run.device={run_cfg.device} conflicts with ACCELERATE_USE_CPU (accelerate launch --cpu): "
                                f"drop --cpu, or pass run.device=cpu (run.device=auto follows the launcher)")
    nt = _argv_value(argv, "num_cpu_threads_per_process") if argv else None
    if nt and nt.isdigit() and int(nt) > 0:
        if not run_cfg.threads:
            threads = int(nt)
            notes.append(f"threads from the launcher: accelerate launch --num_cpu_threads_per_process {nt}")
        elif run_cfg.threads != int(nt):
            raise AttrdistError(f"run.threads={run_cfg.threads} conflicts with accelerate launch --num_cpu_threads_per_"
                                f"process {nt}: make them agree (run.threads=0 follows the launcher)")
    dyn = env.get("ACCELERATE_DYNAMO_BACKEND", "NO").upper()
    if dyn != "NO":
        notes.append(f"ACCELERATE_DYNAMO_BACKEND={dyn}: accelerate compiles the model with it (attrdist leaves it be)")
    return LauncherSettings(device=device, precision=precision, threads=threads, notes=tuple(notes))


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


def make_accelerator(run_cfg, optim_cfg, global_batch: int, log_with=None, project_dir=None):
    """Create the Accelerator for this process and verify what it got. Returns (accelerator, RuntimeInfo).
    `global_batch`: data.batch_size (samples per micro-step over all ranks; DeepSpeed's config needs it);
    `log_with`, `project_dir`: accelerate's trackers (attrdist.train.tracking) and the run directory."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs

    from attrdist.train import nodes, shm_allreduce

    launch = launcher_settings(run_cfg, optim_cfg)  # accelerate's own settings: honoured, or the run stops
    os.environ["TORCH_EXTENSIONS_DIR"] = shm_allreduce.extensions_dir()  # this CPU's builds (DeepSpeed's ops too)
    device = choose_device(launch.device)
    mp = resolve_precision(launch.precision, device)
    env_world = int(os.environ.get("WORLD_SIZE", "1"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", env_world)))
    slurm_cpus = int(os.environ.get("SLURM_CPUS_PER_TASK") or 0)  # SLURM's share when it set one
    threads = launch.threads or slurm_cpus or max(1, available_cores() // max(1, local_world))
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
                          kwargs_handlers=handlers, step_scheduler_with_optimizer=False, log_with=log_with,
                          project_dir=project_dir)
    else:
        acc = Accelerator(cpu=(device == "cpu"), mixed_precision=mp, gradient_accumulation_steps=optim_cfg.grad_accum,
                          kwargs_handlers=handlers, step_scheduler_with_optimizer=False, log_with=log_with,
                          project_dir=project_dir)
    # accelerate's PartialState, forming a CPU group while OMP_NUM_THREADS is unset (a SLURM task without
    # --cpus-per-task), calls torch.set_num_threads(physical cores / local ranks) over ours: found on the 2-node
    # test cluster, where 1 task per node got 2 threads while the runtime line said threads=1 (and its
    # floats differed from 1 node x 2 tasks). Ours again, so the line is true.
    torch.set_num_threads(threads)
    state = acc.state
    backend = getattr(state, "backend", None)
    launcher = os.environ.get("ATTRDIST_LAUNCHER") or (  # attrdist.train.slurm_job: job, nodes x tasks, master
        "torchrun/accelerate" if "TORCHELASTIC_RUN_ID" in os.environ else
        "slurm" if "SLURM_JOB_ID" in os.environ else "python")
    info = RuntimeInfo(device=device, distributed_type=str(state.distributed_type).split(".")[-1], backend=backend,
                       world_size=acc.num_processes, rank=acc.process_index, local_rank=acc.local_process_index,
                       mixed_precision=mp if run_cfg.deepspeed else str(acc.mixed_precision), threads=threads,
                       launcher=launcher, engine=f"deepspeed-{run_cfg.deepspeed}" if run_cfg.deepspeed else "ddp",
                       malloc=malloc, launcher_notes=launch.notes, precision_pref=launch.precision)
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
    layout = nodes.gather()
    allreduce, note = shm_allreduce.setup(run_cfg.shm_allreduce, device=device, deepspeed=run_cfg.deepspeed,
                                          timeout_s=run_cfg.dist_timeout_s, layout=layout)
    return acc, dataclasses.replace(info, allreduce=allreduce, allreduce_note=note, node_rank=layout.node,
                                    nodes=layout.nodes, layout=layout.describe() if layout.world > 1 else "")


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
