"""Progress with rate and ETA: plain lines without carriage returns when stderr is not a terminal (SLURM
logs, `launch tail`), a tqdm bar when it is (a real pseudo-terminal)."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios

from tests.conftest import FAST, ROOT, run_env, run_recipe


def progress_args(shards, run_dir, *extra) -> list[str]:
    return ["--profile", "demo", f"data.shards={shards}", f"run.run_dir={run_dir}", *FAST, "run.epochs=1",
            "data.eval_batch_size=8", "run.log_every=2", "run.log_with=none", *extra]


def test_a_logged_run_shows_eta_for_training_and_progress_for_evaluation(small_shards, tmp_path):
    p = run_recipe(progress_args(small_shards, tmp_path / "r", "run.progress_every_s=0"))
    out = p.stdout + p.stderr
    assert "\r" not in out  # nothing for `launch tail` to choke on
    train = re.findall(r"epoch 0 step (\d)/6 loss .* img/s \| [\d.]+ (?:step/s|s/step), ETA (\d:\d\d:\d\d)", p.stdout)
    assert [int(s) for s, _ in train] == [1, 2, 4, 6] and train[-1][1] == "0:00:00"
    n_val = len(re.findall(r"eval val: (\d)/(\d) batches", p.stdout))
    evals = re.findall(r"eval val: (\d)/(\d) batches, [\d.]+ (?:batch/s|s/batch), ETA \d:\d\d:\d\d", p.stdout)
    assert evals and evals[-1][0] == evals[-1][1] and int(evals[-1][1]) > 1 and n_val > 2
    assert re.search(r"eval test: \d/\d batches, .*ETA", p.stdout)
    assert "ETA" in (tmp_path / "r" / "train.log").read_text()

    # at most one line every run.progress_every_s seconds: a short pass shows only its start and its end
    p = run_recipe(progress_args(small_shards, tmp_path / "r2", "run.progress_every_s=1000", "run.max_steps=1"))
    lines = re.findall(r"eval val: (\d)/(\d) batches", p.stdout)
    assert lines and all(done in ("0", total) for done, total in lines), lines


def test_a_terminal_gets_a_progress_bar(small_shards, tmp_path):
    """stderr on a pseudo-terminal: tqdm's bar (carriage returns, step counts, rate) for training and evaluation."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))  # a 120-column terminal
    cmd = [sys.executable, str(ROOT / "recipes" / "coconut.py"),
           *progress_args(small_shards, tmp_path / "r", "run.max_steps=3")]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=run_env(COLUMNS="120"), stdout=subprocess.PIPE, stderr=slave,
                            stdin=subprocess.DEVNULL)
    os.close(slave)
    seen = b""
    while True:
        ready, _, _ = select.select([master], [], [], 1.0)
        if ready:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # the child closed its end
                break
            if not chunk:
                break
            seen += chunk
        elif proc.poll() is not None:
            break
    stdout, _ = proc.communicate(timeout=300)
    os.close(master)
    assert proc.returncode == 0, seen.decode(errors="replace")[-3000:]
    bar = seen.decode(errors="replace")
    assert "\r" in bar and re.search(r"train: .*3/3 .*step", bar), bar[-2000:]
    assert re.search(r"eval val: .*batch", bar), bar[-2000:]
    assert "eval val: 0/" not in stdout.decode()  # the bar replaces the plain lines
