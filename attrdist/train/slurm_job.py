"""One task of a recipe inside a SLURM job: torch.distributed's environment from SLURM's, the run,
and preemption / time limits (every rank checkpoints, the job is requeued a bounded number of
times, and the requeued job resumes exactly).

Both ways into a job end here, one process per task (one task per GPU, or CPU ranks with gloo):

    python -m launch slurm recipes/coconut.py --nodes 2 --gpus-per-node 8 ...    # submitit: RecipeJob
    sbatch slurm/train.sbatch recipes/coconut.py data.shards=...                 # srun python -m launch task

What a task does:
1. Routes SIGUSR2 (SLURM's `--signal=USR2@T` before the time limit, and preemption under
   `preempt_send_user_signal`) and SIGTERM to the stop request at once (`attrdist.train.interrupt`).
2. Sets RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT from
   SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID, the first host of SLURM_JOB_NODELIST (submitit's
   parser) and the job id: what torchrun would set, so no MASTER_ADDR is ever edited by hand. The
   trainer's runtime line says `launcher=slurm(job ..., nodes x tasks, master ...)`.
3. Runs the recipe in this process on the `run.run_dir` fixed at submission; a requeued attempt
   (SLURM_RESTART_COUNT > 0) adds `run.resume=auto`.
4. Stopped by a signal: the trainer has saved the same step on every rank. Rank 0 records why
   (time limit or preemption, from the job's time left) in `<run_dir>/restarts.jsonl` and in
   `train.log`, and runs `scontrol requeue` unless the job has already been restarted
   `max_requeues` times (SLURM_RESTART_COUNT). The requeued job runs the same command and resumes.
"""

from __future__ import annotations

import json
import os
import runpy
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from attrdist.train import interrupt
from attrdist.errors import AttrdistError

SIGNAL_DELAY_S = 90  # default `--signal=USR2@90`: seconds between the warning and the time limit


class RecipeFailed(RuntimeError):
    """The recipe stopped with an error; its message is what the user needs (one line if it was theirs)."""


def say(msg: str) -> None:
    """A line in the task's log (submitit's / sbatch's .err file)."""
    print(f"attrdist.train.slurm_job: {msg}", file=sys.stderr, flush=True)


def job_environment():
    from submitit.slurm.slurm import SlurmJobEnvironment

    if "SLURM_JOB_ID" not in os.environ:
        raise AttrdistError("not inside a SLURM job (no SLURM_JOB_ID): submit with `python -m launch slurm "
                            "recipes/X.py ...` or `sbatch slurm/train.sbatch recipes/X.py ...`; on one machine use "
                            "`python -m launch local`")
    return SlurmJobEnvironment()


def restart_count() -> int:
    return int(os.environ.get("SLURM_RESTART_COUNT") or 0)


def master_port(job_id: str, restarts: int) -> int:
    """The same on every task of one attempt; another one for the next attempt and the next job."""
    digits = "".join(c for c in str(job_id) if c.isdigit()) or "0"
    return 20000 + (int(digits) * 17 + restarts * 1009) % 20000


def distributed_env(env=None) -> dict[str, str]:
    """torchrun's variables for this task, from SLURM's."""
    env = env or job_environment()
    ntasks, nodes = env.num_tasks, env.num_nodes
    if ntasks % nodes:
        raise AttrdistError(f"SLURM job {env.job_id}: {ntasks} tasks on {nodes} nodes is uneven; ask for "
                            f"--ntasks-per-node (one task per GPU) so every node runs the same number of ranks")
    per_node = ntasks // nodes
    master = env.hostnames[0]
    restarts = restart_count()
    port = master_port(env.raw_job_id, restarts)
    out = {"RANK": str(env.global_rank), "WORLD_SIZE": str(ntasks), "LOCAL_RANK": str(env.local_rank),
           "LOCAL_WORLD_SIZE": str(per_node), "NODE_RANK": str(env.node), "GROUP_RANK": str(env.node),
           "MASTER_ADDR": master, "MASTER_PORT": str(port), "ATTRDIST_EXPECT_WORLD_SIZE": str(ntasks),
           "ATTRDIST_LAUNCHER": (f"slurm(job {env.job_id}, {nodes} node{'s' * (nodes > 1)} x {per_node} "
                                 f"task{'s' * (per_node > 1)}, node {env.node}, master {master}:{port}, "
                                 f"restart {restarts})")}
    cpus = os.environ.get("SLURM_CPUS_PER_TASK")
    if cpus and "OMP_NUM_THREADS" not in os.environ:
        out["OMP_NUM_THREADS"] = cpus
    return out


# ------------------------------------------------------------------ why a job stopped, and its restarts
def parse_duration(text: str) -> float | None:
    """SLURM's [D-]HH:MM:SS, MM:SS or MM as seconds; None for UNLIMITED / NOT_SET / INVALID."""
    text = text.strip()
    if not text or not text[0].isdigit():
        return None
    days, _, rest = text.rpartition("-")
    parts = [float(p) for p in rest.split(":")]
    if len(parts) == 1:  # minutes
        parts = [0.0, parts[0], 0.0]
    while len(parts) < 3:
        parts.insert(0, 0.0)
    h, m, s = parts
    return (float(days) if days else 0.0) * 86400 + h * 3600 + m * 60 + s


def time_left_s(job_id: str) -> float | None:
    try:
        out = subprocess.run(["squeue", "-h", "-j", str(job_id), "-o", "%L"], capture_output=True, text=True,
                             timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    return parse_duration(out.splitlines()[0]) if out.strip() else None


def stop_reason(signum: int, left: float | None, signal_delay_s: float) -> str:
    """`time limit` when the job is within its warning window of the limit, else `preemption`."""
    import signal

    name = signal.Signals(signum).name if signum else "a signal"
    if left is not None and left <= signal_delay_s + 45:  # SLURM checks limits only every ~30 s
        return f"time limit ({name} with {left:.0f} s left)"
    where = f"{left:.0f} s before the time limit" if left is not None else "no time limit"
    return f"preemption ({name}, {where})"


def restarts_file(run_dir: Path) -> Path:
    return Path(run_dir) / "restarts.jsonl"


def read_restarts(run_dir: Path) -> list[dict]:
    f = restarts_file(run_dir)
    if not f.is_file():
        return []
    return [json.loads(line) for line in f.read_text().splitlines() if line.strip()]


def record(run_dir: Path, rec: dict, log_line: str) -> None:
    """Append to restarts.jsonl and to the run's train.log (rank 0 only)."""
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    with open(restarts_file(run_dir), "a") as f:
        f.write(json.dumps(rec) + "\n")
    with open(Path(run_dir) / "train.log", "a") as f:
        f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} WARNING {log_line}\n")
    say(log_line)


def note_restart(env, run_dir: Path, restarts: int, max_requeues: int) -> None:
    """At the start of a requeued attempt: say why it was restarted (the previous attempt wrote it), or
    that SLURM requeued it by itself (node failure, a preemption that killed it, `scontrol requeue`)."""
    if not restarts:
        return
    known = [r for r in read_restarts(run_dir) if r.get("job") == env.job_id and r.get("restart") == restarts]
    if known:
        r = known[-1]
        line = (f"job {env.job_id} restart {restarts} (of at most {max_requeues}): {r['reason']} after step "
                f"{r['step']}; resuming from its checkpoint in {run_dir}")
        with open(Path(run_dir) / "train.log", "a") as f:
            f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} WARNING {line}\n")
        say(line)
        return
    record(run_dir, {"job": env.job_id, "restart": restarts, "reason": "requeued by SLURM, not by attrdist",
                     "step": None, "time": time.time()},
           f"job {env.job_id} restart {restarts}: requeued by SLURM itself (node failure, a preemption that ended "
           f"the job before it could checkpoint, or `scontrol requeue`); resuming from the last checkpoint in {run_dir}")


# ------------------------------------------------------------------ the task
def _arg(args: list[str], key: str) -> str | None:
    hits = [a.split("=", 1)[1] for a in args if a.startswith(key + "=")]
    return hits[-1] if hits else None


def _run_recipe(script: str, args: list[str]) -> None:
    argv = sys.argv
    sys.argv = [script, *args]
    try:
        runpy.run_path(script, run_name="__main__")
    finally:
        sys.argv = argv


def _agree(obj, src: int = 0):
    """rank `src`'s object on every rank (no-op without a process group)."""
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            box = [obj]
            dist.broadcast_object_list(box, src=src)
            return box[0]
    except Exception as e:  # a rank gone: the decision stays local, SLURM ends the step anyway
        say(f"could not reach the other ranks after the checkpoint ({e}); deciding alone")
    return obj


def _after_interrupt(env, stop: interrupt.Interrupted, run_dir: Path, max_requeues: int, signal_delay_s: float) -> None:
    """Every rank has saved step `stop.step`. Rank 0 requeues (bounded) and tells the others."""
    restarts = restart_count()
    decision = None
    if env.global_rank == 0:
        reason = stop_reason(stop.signum, time_left_s(env.job_id), signal_delay_s)
        if restarts >= max_requeues:
            decision = (f"job {env.job_id} stopped by {reason} after step {stop.step} (checkpoint saved) and NOT "
                        f"requeued: it has been restarted {restarts} times, the limit (max_requeues={max_requeues}); "
                        f"continue it with --resume run.run_dir={run_dir}")
            record(run_dir, {"job": env.job_id, "restart": None, "reason": reason, "step": stop.step,
                             "time": time.time(), "requeued": False}, decision)
        else:
            record(run_dir, {"job": env.job_id, "restart": restarts + 1, "reason": reason, "step": stop.step,
                             "time": time.time(), "requeued": True},
                   f"job {env.job_id} stopped by {reason} after step {stop.step} (checkpoint saved on every rank); "
                   f"requeueing it (restart {restarts + 1} of at most {max_requeues})")
            p = subprocess.run(["scontrol", "requeue", env.job_id], capture_output=True, text=True, timeout=60)
            if p.returncode:
                decision = (f"job {env.job_id}: `scontrol requeue` failed ({(p.stderr or p.stdout).strip()}); the "
                            f"checkpoint of step {stop.step} is saved: continue with --resume run.run_dir={run_dir}")
                say(decision)
    decision = _agree(decision)
    if decision:
        raise RecipeFailed(decision)
    from attrdist.train.runtime import exit_without_native_teardown

    exit_without_native_teardown()  # a clean requeue must not die in gloo's teardown at exit
    raise SystemExit(0)  # requeued: no result for submitit to pick up; SLURM starts the job again


def _failure(e: SystemExit, script: str) -> str:
    ctx = e.__context__
    if isinstance(ctx, AttrdistError):
        return f"attrdist: error: {ctx}"
    return f"{Path(script).name} exited with status {e.code} (its log says why: python -m launch tail JOBID)"


def summary(run_dir: Path) -> dict:
    """What a finished task returns: where the run is, its headline, its restarts."""
    run_dir = Path(run_dir)
    rep = run_dir / "report.json"
    out = {"run_dir": str(run_dir), "report": str(run_dir / "report.md") if rep.is_file() else None,
           "headline": None, "runtime": None, "restarts": read_restarts(run_dir)}
    if rep.is_file():
        d = json.loads(rep.read_text())
        out.update(headline=d.get("headline"), runtime=d.get("runtime"))
    return out


def run_task(script: str, args: list[str], *, max_requeues: int = 3, signal_delay_s: float | None = None) -> dict:
    """Run this SLURM task's rank of `script` with `args` (key=value overrides; run.run_dir required)."""
    previous = interrupt.install()  # first: a signal during start-up must not be lost
    try:
        env = job_environment()
        run_dir = _arg(args, "run.run_dir")
        if not run_dir:
            raise AttrdistError("a SLURM task needs run.run_dir=DIR (fixed at submission) so that a requeued job "
                                "resumes the same run; `python -m launch slurm` and slurm/train.sbatch set it")
        run_dir = Path(run_dir).resolve()
        args = [a if not a.startswith("run.run_dir=") else f"run.run_dir={run_dir}" for a in args]
        if restart_count() and "--resume" not in args and _arg(args, "run.resume") != "auto":
            args.append("run.resume=auto")  # a requeued attempt continues; the first one is a run like any other
        if signal_delay_s is None:
            signal_delay_s = float(os.environ.get("ATTRDIST_SIGNAL_DELAY_S") or SIGNAL_DELAY_S)
        os.environ.update(distributed_env(env))
        if env.global_rank == 0:
            say(f"{os.environ['ATTRDIST_LAUNCHER']}: {Path(script).name} {' '.join(args)}")
            note_restart(env, run_dir, restart_count(), max_requeues)
        try:
            _run_recipe(script, args)
        except interrupt.Interrupted as stop:
            _after_interrupt(env, stop, run_dir, max_requeues, signal_delay_s)
        except SystemExit as e:
            if e.code not in (0, None):
                raise RecipeFailed(_failure(e, script)) from None
        return summary(run_dir)
    finally:
        interrupt.finish(previous)  # from here on a late SIGUSR2 is ignored


@dataclass
class RecipeJob:
    """What `python -m launch slurm` submits: one call per task (submitit pickles it by reference,
    so it lives in the installed package)."""

    script: str
    args: list[str] = field(default_factory=list)
    max_requeues: int = 3
    signal_delay_s: float = SIGNAL_DELAY_S

    def __call__(self) -> dict:
        try:
            return run_task(self.script, self.args, max_requeues=self.max_requeues,
                            signal_delay_s=self.signal_delay_s)
        except AttrdistError as e:  # a bad submission: one line in submitit's result, not a traceback
            raise RecipeFailed(f"attrdist: error: {e}") from None

    def checkpoint(self, *args, **kwargs):
        """submitit's own USR2 path (only before run_task has installed ours): requeue as is; the job
        resumes from its last checkpoint."""
        from submitit.helpers import DelayedSubmission

        return DelayedSubmission(self)
