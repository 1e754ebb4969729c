"""A rank that stops answering never hangs the job: its peers give up after run.dist_timeout_s with a
one-line reason and the launcher tears the job down (real 2-rank gloo run; the straggler is SIGSTOPped
mid-training, like a node that froze)."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import psutil
import pytest

from tests.conftest import ROOT, run_env

pytestmark = pytest.mark.distributed


def test_a_frozen_rank_fails_the_job_within_the_timeout(small_shards, tmp_path):
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "launch", "local", "recipes/coconut.py", "--nproc", "2", f"data.shards={small_shards}",
           f"run.run_dir={run_dir}", "data.batch_size=8", "data.num_workers=0", "run.epochs=20", "run.log_every=1",
           "model.dim=64", "model.contrastive_dim=32", "run.precision=fp32", "run.threads=1", "run.dist_timeout_s=10"]
    log = tmp_path / "out.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=run_env(), stdout=out, stderr=subprocess.STDOUT)
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + 180
    while time.time() < deadline and not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 2):
        time.sleep(0.1)
    ranks = [c for c in psutil.Process(proc.pid).children(recursive=True)
             if "coconut.py" in " ".join(c.cmdline()) and "accelerate" not in " ".join(c.cmdline())]
    assert len(ranks) == 2
    ranks[-1].send_signal(signal.SIGSTOP)
    t0 = time.time()
    try:
        rc = proc.wait(timeout=150)
    finally:
        for r in ranks:
            if r.is_running():
                r.kill()
    waited = time.time() - t0
    text = log.read_text()
    print(f"job ended {waited:.0f} s after rank 1 froze (timeout 10 s + teardown)")
    assert rc != 0 and waited < 150
    assert "attrdist: error: a collective timed out after run.dist_timeout_s=10 s" in text
