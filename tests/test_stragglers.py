"""A rank that stops answering or dies never hangs the job (real 2-rank gloo runs). Frozen (SIGSTOP, like a
node that froze): its peers give up after run.dist_timeout_s with a one-line reason and the launcher
tears the job down. Killed (SIGKILL): the launcher ends the job at once and names the rank."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import psutil
import pytest

from tests.conftest import ROOT, run_env, train_steps

pytestmark = pytest.mark.distributed


def signal_a_rank(run_dir, log, sig, *, after_lines: int, extra: list[str], timeout: float):
    """Start a 2-rank demo run, wait for `after_lines` metrics records, send `sig` to rank 1, wait for the
    launcher to exit. Returns (exit status, seconds from the signal to the exit, the ranks)."""
    cmd = [sys.executable, "-m", "launch", "local", "recipes/coconut.py", "--nproc", "2", *extra,
           f"run.run_dir={run_dir}", "data.batch_size=8", "data.num_workers=0", "run.log_every=1", "model.dim=64",
           "model.contrastive_dim=32", "run.precision=fp32", "run.threads=1", "model.pretrained=none"]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=run_env(), stdout=out, stderr=subprocess.STDOUT)
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + 180
    while time.time() < deadline and not (metrics.is_file() and len(metrics.read_text().splitlines()) >= after_lines):
        assert proc.poll() is None, f"the run ended before training (exit {proc.returncode}):\n{log.read_text()[-3000:]}"
        time.sleep(0.1)
    ranks = [c for c in psutil.Process(proc.pid).children(recursive=True)
             if "coconut.py" in " ".join(c.cmdline()) and "accelerate" not in " ".join(c.cmdline())]
    assert len(ranks) == 2, log.read_text()[-3000:]
    ranks[-1].send_signal(sig)
    t0 = time.time()
    try:
        rc = proc.wait(timeout=timeout)
    finally:
        for r in ranks:
            if r.is_running():
                r.kill()
    return rc, time.time() - t0, ranks


@pytest.mark.reliability
def test_a_frozen_rank_fails_the_job_within_the_timeout(small_shards, tmp_path):
    log = tmp_path / "out.log"
    rc, waited, _ = signal_a_rank(tmp_path / "run", log, signal.SIGSTOP, after_lines=2, timeout=150,
                                  extra=[f"data.shards={small_shards}", "run.epochs=20", "run.dist_timeout_s=10"])
    text = log.read_text()
    print(f"job ended {waited:.0f} s after rank 1 froze (timeout 10 s + teardown)")
    assert rc != 0 and waited < 150
    assert "attrdist: error: a collective timed out after run.dist_timeout_s=10 s" in text


@pytest.mark.reliability
def test_a_killed_rank_ends_the_job_naming_the_rank(small_shards, tmp_path):
    """A rank that dies outright (SIGKILL: the OOM killer, a node gone): the launcher ends the other rank
    at once and says which rank died, how, and how to continue (the last checkpoint, --resume)."""
    run_dir, log = tmp_path / "run", tmp_path / "out.log"
    rc, waited, ranks = signal_a_rank(run_dir, log, signal.SIGKILL, after_lines=4, timeout=120,
                                      extra=[f"data.shards={small_shards}", "run.epochs=3", "--profile", "demo",
                                             "run.ckpt_every_steps=2"])
    text = log.read_text()
    print(f"job ended {waited:.1f} s after rank 1 was killed")
    assert rc != 0 and waited < 60, text[-3000:]
    assert not any(r.is_running() for r in ranks)
    summary = text[text.rindex("launch: rank"):]
    assert "launch: rank 1 (pid " in summary and "failed first: it was killed by SIGKILL" in summary, text[-3000:]
    last = json.loads((run_dir / "checkpoints" / "last.json").read_text())
    assert f"The last checkpoint is {run_dir / 'checkpoints' / last['dir']} (step {last['step']})" in summary
    assert "Continue with: python -m launch local recipes/coconut.py --nproc 2 " in summary
    assert summary.rstrip().endswith("--resume"), summary
    # the printed command continues the run to its end
    again = summary[summary.index("Continue with: ") + len("Continue with: "):].split()
    assert again[:3] == ["python", "-m", "launch"]
    p = subprocess.run([sys.executable, *again[1:]], cwd=ROOT, env=run_env(), capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    assert max(train_steps(run_dir / "metrics.jsonl")) == 36
