"""Start a recipe on this machine with N processes, choosing the invocation that really gives N.

    python -m launch local recipes/coconut.py --nproc 2                       # DDP (gloo on CPU, NCCL on GPUs)
    python -m launch local recipes/coconut.py --nproc 2 --deepspeed zero2     # DeepSpeed ZeRO-2 (torchrun)

On CPU, `accelerate launch --cpu --num_processes 2` silently runs ONE process, and `--multi_gpu`
without CPU mode runs N independent single processes. What works (measured):
`ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes N --num_machines 1`.
The launched processes get ATTRDIST_EXPECT_WORLD_SIZE=N and fail loudly if they see another size.
"""

from __future__ import annotations

import collections
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def has_cuda() -> int:
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except ImportError:
        return 0


def build_command(script: str, nproc: int, overrides: list[str], *, device: str = "auto",
                  mixed_precision: str | None = None, deepspeed: str = "") -> tuple[list[str], dict[str, str]]:
    """(argv, extra environment) for `nproc` processes of `script` on this machine."""
    env = {"ATTRDIST_EXPECT_WORLD_SIZE": str(nproc)}
    gpus = has_cuda() if device in ("auto", "cuda") else 0
    if gpus and nproc > gpus:
        raise SystemExit(f"launch: asked for {nproc} processes but this machine has {gpus} GPUs")
    if deepspeed:
        # torchrun: accelerate's own DeepSpeed launcher wants a hostfile/pdsh; ACCELERATE_USE_CPU must stay
        # unset (it silently turns DeepSpeed into DDP); the first run JIT-builds a comm op: cache it.
        overrides = [*overrides, f"run.deepspeed={deepspeed}"]
        from attrdist.train.shm_allreduce import extensions_dir

        env["TORCH_EXTENSIONS_DIR"] = extensions_dir()
        if device == "cpu":
            overrides.append("run.device=cpu")
        if not gpus:
            env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
        if nproc == 1:
            return [sys.executable, script, *overrides], env
        return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(nproc),
                "--master_port", str(free_port()), script, *overrides], env
    if nproc == 1:
        return [sys.executable, script, *overrides], env
    accelerate = [sys.executable, "-m", "accelerate.commands.launch"]
    base = ["--num_machines", "1", "--num_processes", str(nproc), "--main_process_port", str(free_port())]
    if mixed_precision:
        base += ["--mixed_precision", mixed_precision]
    if gpus:
        return [*accelerate, "--multi_gpu", *base, script, *overrides], env
    env["ACCELERATE_USE_CPU"] = "1"
    # 1 thread per rank by default on CPU: ranks share the cores
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    return [*accelerate, "--multi_gpu", *base, script, *overrides], env


def run(script: str, nproc: int, overrides: list[str], dry_run: bool = False, **kw) -> int:
    cmd, env = build_command(script, nproc, overrides, **kw)
    shown = " ".join(f"{k}={v}" for k, v in env.items()) + " " + " ".join(cmd)
    print(f"launch: {shown}", flush=True)
    if dry_run:
        return 0
    if shutil.which(cmd[0]) is None and not os.path.exists(cmd[0]):
        raise SystemExit(f"launch: {cmd[0]} not found")
    if nproc == 1:
        return subprocess.call(cmd, env={**os.environ, **env})
    # several ranks: pass stderr through, keeping its tail to say which rank failed first
    proc = subprocess.Popen(cmd, env={**os.environ, **env}, stderr=subprocess.PIPE, text=True, errors="replace",
                            bufsize=1)
    tail: collections.deque[str] = collections.deque(maxlen=400)

    def forward() -> None:
        for line in proc.stderr:
            sys.stderr.write(line)
            tail.append(line)

    t = threading.Thread(target=forward, daemon=True)
    t.start()
    while True:
        try:
            rc = proc.wait()
            break
        except KeyboardInterrupt:  # the ranks got the ^C too: wait for them to stop
            continue
    t.join(timeout=5)
    if rc:
        sys.stderr.write(failure_summary("".join(tail), script, nproc, overrides) + "\n")
    return rc


def failure_summary(stderr_tail: str, script: str, nproc: int, overrides: list[str]) -> str:
    """One paragraph after a failed multi-rank run: which rank failed first and how (from torch elastic's
    "Root Cause" report), where the last checkpoint is, and the command that continues the run."""
    m = re.search(r"Root Cause.*?rank\s*:\s*(\d+).*?exitcode\s*:\s*(-?\d+)\s*\(pid:\s*(\d+)\)", stderr_tail, re.S)
    if m:
        rank, code, pid = int(m.group(1)), int(m.group(2)), m.group(3)
        if code < 0:
            name = signal.Signals(-code).name if -code in signal.valid_signals() else f"signal {-code}"
            how = f"was killed by {name}" + (" (out of memory, or killed by someone/something else)"
                                             if name == "SIGKILL" else "")
        else:
            how = f"exited with status {code} (its error is in the log above, lines marked [rank{rank}])"
        head = f"launch: rank {rank} (pid {pid}) failed first: it {how}; the other ranks were stopped."
    else:
        head = "launch: the run failed (its error is in the log above)."
    run_dir = next((o.split("=", 1)[1] for o in reversed(overrides) if o.startswith("run.run_dir=")), "")
    resume = [o for o in overrides if o != "--resume"]
    again = f"python -m launch local {script} --nproc {nproc} {' '.join(resume)} --resume".replace("  ", " ")
    if run_dir:
        ptr = Path(run_dir) / "checkpoints" / "last.json"
        try:
            last = json.loads(ptr.read_text())
            where = f" The last checkpoint is {Path(run_dir) / 'checkpoints' / last['dir']} (step {last['step']})."
        except (OSError, ValueError, KeyError):
            where = f" No checkpoint was written yet in {run_dir}."
        return f"{head}{where} Continue with: {again}"
    return f"{head} Continue from its last checkpoint with: {again} run.run_dir=<the run dir named in the log above>"
