"""Faults injected for real into training (real processes, real files, a real full disk): SIGKILL at random
steps, a disk that fills up while a checkpoint is written, damaged checkpoints, NaN/Inf losses, and two
runs pointed at one run directory. attrdist must lose no work, never hang, never run foreign code, and
say in one line which file or step failed and what to do.

The training is the coconut demo recipe on the small test shards: 96 training images, global batch 16,
so 6 optimizer steps per epoch and 12 in a run, with a checkpoint after every step (run.ckpt_every_steps=1).
Frozen BatchNorm statistics, no dropout and a constant schedule make the weights a pure function of the
steps (as in test_slurm.py): a killed-and-resumed run must end with exactly (torch.equal) the weights of
the uninterrupted `reference` run.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from attrdist.train import checkpoint
from attrdist.errors import AttrdistError
from tests.conftest import ROOT, assert_tensors_equal, run_env, run_recipe, train_steps
from tests.test_distributed import launch
from tests.test_slurm import assert_same_weights
from tests.test_train import demo_args

pytestmark = pytest.mark.reliability

STEPS = 12
CFG = ["model.dropout=0", "model.freeze_bn_stats=true", "schedule.name=constant", "schedule.warmup_epochs=0",
       "run.ckpt_every_steps=1", "run.curves_every=100"]
CKPT_FILES = {"model.safetensors", "state.pt", "meta.json"}


def args(shards: Path, run_dir: Path, *extra: str) -> list[str]:
    return demo_args(shards, run_dir, *CFG, *extra)


def error_line(p: subprocess.CompletedProcess) -> str:
    """The one line a failed run printed for the user (and no traceback)."""
    assert p.returncode == 2, f"exit {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    assert "Traceback" not in p.stderr, p.stderr[-3000:]
    errors = [x for x in p.stderr.splitlines() if x.startswith("attrdist: error: ")]
    assert len(errors) >= 1, p.stderr[-3000:]
    return errors[-1]


def hidden(ck: Path) -> list[str]:
    return sorted(p.name for p in ck.glob(".*")) if ck.is_dir() else []


def assert_only_complete_checkpoints(ck: Path) -> None:
    """Under a checkpoint's name there is only ever a complete, intact checkpoint, and every pointer
    names one."""
    for d in ck.glob("step-*"):
        assert {p.name for p in d.iterdir()} == CKPT_FILES, d
        checkpoint.verify(d)
    for ptr in ck.glob("*.json"):
        checkpoint.verify(checkpoint.resolve(ptr))


def tensors(ckpt_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint: the weights and the optimizer state (flattened)."""
    out = {f"model/{k}": v for k, v in load_file(str(ckpt_dir / "model.safetensors")).items()}
    opt = torch.load(ckpt_dir / "state.pt", weights_only=True)["optimizer"]["state"]
    out.update({f"optim/{i}/{k}": v for i, s in opt.items() for k, v in s.items() if isinstance(v, torch.Tensor)})
    return out


def assert_equal_tensors(a: Path, b: Path) -> None:
    assert_tensors_equal(tensors(a), tensors(b), f"{a.name} vs {b.name}: ")


@pytest.fixture(scope="module")
def reference(small_shards, tmp_path_factory) -> Path:
    """The uninterrupted run (12 steps, a checkpoint after each, the last two kept plus best)."""
    run_dir = tmp_path_factory.mktemp("reliability") / "reference"
    run_recipe(args(small_shards, run_dir))
    return run_dir


# ------------------------------------------------------------------------------------------- SIGKILL
def kill_and_resume(shards: Path, reference: Path, run_dir: Path, kill_step: int, delay: float) -> dict:
    """Start the run, SIGKILL it `delay` seconds after step `kill_step` was logged (the checkpoint of that
    step is being written then, or about to be), check what is visible, resume, compare with `reference`."""
    cmd = [sys.executable, str(ROOT / "recipes" / "coconut.py"), *args(shards, run_dir)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=run_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while proc.poll() is None and time.time() < deadline:
            if max(train_steps(run_dir / "metrics.jsonl"), default=0) >= kill_step:
                time.sleep(delay)
                break
            time.sleep(0.01)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, f"the run ended by itself (exit {proc.returncode}) before the kill"
    ck = run_dir / "checkpoints"
    left = hidden(ck)  # a write or a delete the kill interrupted: never under a checkpoint's name
    assert_only_complete_checkpoints(ck)
    last = checkpoint.pointer_target(ck, "last")
    p = run_recipe(args(shards, run_dir) + ["--resume"])
    assert hidden(ck) == [], hidden(ck)
    assert_same_weights(reference, run_dir)
    resumed = [x for x in p.stdout.splitlines() if "resumed from" in x]
    return {"kill_step": kill_step, "delay_s": round(delay, 3), "last_checkpoint": last.name if last else None,
            "left_half_written": left, "resumed": bool(resumed)}


@pytest.mark.parametrize("trials, seed", [pytest.param(3, 20261124, id="3-trials"),
                                          pytest.param(10, 8, id="10-trials", marks=pytest.mark.slow)])
def test_sigkill_at_random_steps_then_resume_gives_the_uninterrupted_weights(trials, seed, reference, small_shards,
                                                                              tmp_path):
    """Each trial SIGKILLs a fresh run at a step drawn from a seeded RNG, a random fraction of a step after
    it was logged (so some kills land inside a checkpoint write), then resumes: the final weights equal
    the uninterrupted run's bit for bit, and no partial file is ever visible under a checkpoint's name."""
    rng = random.Random(seed)
    draws = [(rng.randint(1, STEPS - 1), rng.uniform(0.0, 0.3)) for _ in range(trials)]
    print(f"\nseed {seed}: (kill step, delay s) = {[(k, round(d, 3)) for k, d in draws]}")
    done = []
    for i, (k, delay) in enumerate(draws):
        try:
            done.append(kill_and_resume(small_shards, reference, tmp_path / f"trial-{i}", k, delay))
        except BaseException as e:
            raise AssertionError(f"trial {i} of seed {seed} (kill after step {k} + {delay:.3f} s) failed: {e}") from e
    (tmp_path / "trials.json").write_text(json.dumps(done, indent=1))
    for t in done:
        print(f"  killed after step {t['kill_step']} + {t['delay_s']} s: last checkpoint {t['last_checkpoint']}, "
              f"half-written leftovers {t['left_half_written'] or 'none'}; resumed, same weights")
    print(f"{trials} trials, {len(done)} survived; {sum(bool(t['left_half_written']) for t in done)} killed mid-write")
    assert len(done) == trials


# ------------------------------------------------------------------------------------------- full disk
def test_disk_full_while_writing_a_checkpoint_stops_clearly_and_the_previous_one_resumes(reference, small_shards,
                                                                                        tmp_path):
    """A tmpfs big enough for two checkpoints and half a model file: the third checkpoint fills it. The run
    stops with one line naming the checkpoint, 'no space left' and what to do; nothing half-written stays;
    the previous checkpoint is intact, and once the disk has room a --resume ends with the reference's weights."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    ref = checkpoint.resolve(reference, "last")
    ckpt_bytes = sum(p.stat().st_size for p in ref.iterdir())
    size_kib = (2 * ckpt_bytes + (ref / "model.safetensors").stat().st_size // 2) // 1024 + 2048  # + logs
    disk = tmp_path / "small-disk"
    disk.mkdir()
    m = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kib}k", "tmpfs", str(disk)], capture_output=True,
                       text=True)
    if m.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {m.stderr.strip()}")
    try:
        run_dir = disk / "run"
        p = run_recipe(args(small_shards, run_dir), check=False)
        line = error_line(p)
        ck = run_dir / "checkpoints"
        assert f"{ck}/step-00000003: no space left on device" in line, line
        assert f"the previous checkpoint {ck}/step-00000002 is intact" in line, line
        assert "free space" in line and "run.run_dir" in line and "--resume" in line, line
        assert hidden(ck) == [] and not (ck / "step-00000003").exists()
        found = checkpoint.find_resumable(ck)
        assert found is not None and found[0].name == "step-00000002"
        assert checkpoint.pointer_target(ck, "last").name == "step-00000002"
        subprocess.run(["mount", "-o", "remount,size=512m", str(disk)], check=True)
        p = run_recipe(args(small_shards, run_dir) + ["--resume"])
        assert f"resumed from {ck}/step-00000002" in p.stdout
        assert_same_weights(reference, run_dir)
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)


# ------------------------------------------------------------------------------------------- damaged checkpoints
def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # in the tensor data: the file still parses, only the checksum tells
    path.write_bytes(bytes(data))


def truncate(path: Path) -> None:
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)


DAMAGE = {
    "flipped-byte-in-model": ("step-00000012/model.safetensors", flip_byte, "sha256 differs"),
    "truncated-state": ("step-00000012/state.pt", truncate, "meta.json recorded"),
    "missing-last-json": ("last.json", lambda p: p.unlink(), "last.json: missing"),
    "garbled-last-json": ("last.json", lambda p: p.write_text('{"dir": "step-000'), "unreadable checkpoint pointer"),
}


# two cases in `make test` (a damaged file, a damaged pointer), all four under `slow`
@pytest.mark.parametrize("case", [c if c in ("flipped-byte-in-model", "garbled-last-json") else
                                  pytest.param(c, marks=pytest.mark.slow) for c in DAMAGE])
def test_resume_falls_back_from_a_damaged_checkpoint_with_a_warning(case, reference, small_shards, tmp_path):
    """The latest checkpoint (or its pointer) damaged on disk: --resume warns naming the damaged file and
    the checkpoint it uses instead, trains the lost steps again and ends with the reference's weights."""
    target, damage, why = DAMAGE[case]
    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    ck = run_dir / "checkpoints"
    damage(ck / target)
    p = run_recipe(args(small_shards, run_dir) + ["--resume"])
    warning = [x for x in p.stdout.splitlines() if "WARNING damaged checkpoint data:" in x]
    assert len(warning) == 1, p.stdout[-3000:]
    used = "step-00000011" if target.startswith("step-") else "step-00000012"
    assert f"{ck / target}" in warning[0] and why in warning[0], warning[0]
    assert f"resuming from {ck / used} (step {used[-2:]})" in warning[0], warning[0]
    assert f"resumed from {ck / used}" in p.stdout
    if target.startswith("step-"):  # the damaged one is kept aside for inspection, the step is written again
        assert [d.name[:len("damaged-step-00000012")] for d in ck.glob("damaged-*")] == ["damaged-step-00000012"]
        checkpoint.verify(ck / "step-00000012")
    assert_same_weights(reference, run_dir)


def test_no_intact_checkpoint_stops_the_resume_instead_of_starting_over(reference, small_shards, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    ck = run_dir / "checkpoints"
    damaged = sorted(ck.glob("step-*"))
    for d in damaged:
        flip_byte(d / "model.safetensors")
    before = (run_dir / "metrics.jsonl").read_text()
    p = run_recipe(args(small_shards, run_dir) + ["--resume"], check=False)
    line = error_line(p)
    assert f"{ck}: no intact checkpoint to resume from" in line, line
    assert all(f"{d}/model.safetensors: sha256 differs" in line for d in damaged), line
    assert "restore the checkpoints from a copy, or start over without --resume in another run.run_dir" in line
    assert "starting fresh" not in p.stdout and (run_dir / "metrics.jsonl").read_text() == before  # nothing trained


def test_damaged_checkpoints_stop_predict_and_init_from_naming_the_file(reference, small_shards, small_demo, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    best = checkpoint.resolve(run_dir, "best")
    flip_byte(best / "model.safetensors")
    img = str(next((small_demo / "images" / "val").glob("*.jpg")))
    p = subprocess.run([sys.executable, "-m", "attrdist.cli", "predict", str(run_dir), img], cwd=ROOT, env=run_env(),
                       capture_output=True, text=True, timeout=120)
    line = error_line(p)
    assert f"{best}/model.safetensors: sha256 differs" in line and "use another one" in line, line
    p = run_recipe(args(small_shards, tmp_path / "init", f"run.init_from={run_dir}"), check=False)
    line = error_line(p)
    assert f"{best}/model.safetensors: sha256 differs" in line and "use another one" in line, line
    (run_dir / "checkpoints" / "best.json").write_text("garbage")  # a pointer that is not JSON
    with pytest.raises(AttrdistError, match=r"best.json: unreadable checkpoint pointer .*pass a checkpoints/step-"):
        checkpoint.resolve(run_dir, "best")


class _RunsCode:
    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_state_file_that_would_run_code_is_refused(reference, tmp_path):
    """A checkpoint from the internet whose state.pt unpickles to a shell command (its meta.json rewritten
    to match): loading refuses it, names the file, and the command never runs."""
    ckpt = tmp_path / "step-00000001"
    shutil.copytree(checkpoint.resolve(reference, "last"), ckpt)
    payload = _RunsCode()
    payload.marker = tmp_path / "pwned"
    (ckpt / "state.pt").write_bytes(pickle.dumps({"loop": payload}, protocol=2))
    with pytest.raises(AttrdistError, match=r"state.pt: not loadable as tensors and plain data .* never unpickles code"):
        checkpoint.load_train_state(ckpt)
    assert not payload.marker.exists()


# ------------------------------------------------------------------------------------------- NaN / Inf
def test_a_diverged_run_skips_nonfinite_steps_then_stops_naming_step_and_checkpoint(small_shards, tmp_path):
    """optim.lr=1e30: the first step throws the weights to ~1e30, every later forward overflows to NaN. Each
    such step is skipped (weights, BatchNorm statistics and optimizer state bit-identical to step 1's: the
    statistics are live here, and the overflowing forward had made them NaN), logged with its number, and
    the 4th in a row (optim.max_nonfinite=3) stops the run naming the step and the last checkpoint."""
    run_dir = tmp_path / "run"
    p = run_recipe(args(small_shards, run_dir, "optim.lr=1e30", "optim.max_nonfinite=3", "run.keep_checkpoints=20",
                        "model.freeze_bn_stats=false"), check=False)
    line = error_line(p)
    ck = run_dir / "checkpoints"
    assert "step 5: the loss or gradients were NaN/Inf in 4 optimizer steps in a row, more than optim.max_nonfinite=3" \
        in line, line
    assert "the weights are those of step 1" in line and "lower optim.lr" in line, line
    assert f"resume from the last checkpoint {ck}/step-00000004 with --resume" in line, line
    for s in (2, 3, 4, 5):
        assert f"WARNING step {s}: loss nan, gradient norm nan not finite: optimizer step skipped" in p.stdout
    recs = {r["step"]: r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}
    assert [recs[s].get("nonfinite_steps") for s in range(1, 6)] == [None, 1, 2, 3, 4]
    for s in (2, 3, 4):
        assert_equal_tensors(ck / "step-00000001", ck / f"step-{s:08d}")


def test_nan_steps_are_skipped_counted_and_the_run_carries_on(small_shards, tmp_path):
    """Steps 3 and 4 with a NaN loss (the ATTRDIST_FAULT_NAN_STEPS test hook): both skipped, the run goes
    on training and counts them in metrics.jsonl and report.json."""
    run_dir = tmp_path / "run"
    p = run_recipe(args(small_shards, run_dir, "run.epochs=1", "run.keep_checkpoints=20"),
                   env=run_env(ATTRDIST_FAULT_NAN_STEPS="3,4"))
    assert "WARNING step 3: loss nan" in p.stdout and "(2 in a row, 2 in this run;" in p.stdout
    ck = run_dir / "checkpoints"
    assert_equal_tensors(ck / "step-00000002", ck / "step-00000004")
    a, b = load_file(str(ck / "step-00000004/model.safetensors")), load_file(str(ck / "step-00000005/model.safetensors"))
    assert any(not torch.equal(a[k], b[k]) for k in a)  # step 5 trained again
    assert json.loads((run_dir / "report.json").read_text())["nonfinite_steps"] == 2
    assert "skipped for a NaN/Inf loss or gradient: 2" in (run_dir / "report.md").read_text()


@pytest.mark.distributed
def test_two_ranks_skip_the_same_nonfinite_steps_and_stop_together(small_shards, tmp_path):
    """The same divergence under DDP with 2 gloo ranks: both skip steps 2 and 3 and stop at step 4 (the
    flag travels in the step's all-reduce); the skipped steps leave the weights as they were."""
    run_dir = tmp_path / "run"
    p = launch(2, args(small_shards, run_dir, "data.batch_size=8", "run.epochs=1", "optim.lr=1e30",
                       "optim.max_nonfinite=2", "run.keep_checkpoints=20"), check=False)
    assert p.returncode != 0
    # as in test_distributed: usually both ranks print it (torch elastic may stop the second first); no traceback
    # of ours (the launcher's ChildFailedError report from torch elastic follows on stderr)
    errors = [x for x in p.stderr.splitlines() if x.startswith("attrdist: error: ")]
    assert 1 <= len(errors) <= 2 and len(set(errors)) == 1, p.stderr[-3000:]
    assert "step 4: the loss or gradients were NaN/Inf in 3 optimizer steps in a row, more than optim.max_nonfinite=2" \
        in errors[0], errors[0]
    assert f"lower optim.lr (or check the data), then resume from the last checkpoint {run_dir}/checkpoints/" \
           f"step-00000003 with --resume" in errors[0], errors[0]
    assert f'File "{ROOT / "attrdist"}' not in p.stderr and f'File "{ROOT / "recipes"}' not in p.stderr
    for s in (2, 3, 4):
        assert f"[rank0] WARNING step {s}: loss nan" in p.stdout
    ck = run_dir / "checkpoints"
    for s in (2, 3):
        assert_equal_tensors(ck / "step-00000001", ck / f"step-{s:08d}")


@pytest.mark.slow
@pytest.mark.distributed
def test_deepspeed_skips_nonfinite_steps_like_ddp(small_shards, tmp_path):
    """DeepSpeed's engine takes its step inside backward and skips a step whose gradients are not finite
    ("OVERFLOW! Skipping step"); attrdist reads that, counts and stops exactly as under DDP."""
    from tests.test_deepspeed import launch as ds_launch

    run_dir = tmp_path / "run"
    p = ds_launch(small_shards, run_dir, 2, "zero2", "run.ckpt_every_steps=1", "optim.lr=1e30", "optim.max_nonfinite=2",
                  "run.keep_checkpoints=20", check=False)
    assert p.returncode != 0
    assert "step 4: the loss or gradients were NaN/Inf in 3 optimizer steps in a row" in p.stderr, p.stderr[-3000:]
    assert f'File "{ROOT / "attrdist"}' not in p.stderr and f'File "{ROOT / "recipes"}' not in p.stderr
    for s in (2, 3, 4):
        assert f"[rank0] WARNING step {s}: loss nan" in p.stdout
    ck = run_dir / "checkpoints"
    a = load_file(str(ck / "step-00000001" / "model.safetensors"))
    for s in (2, 3):
        b = load_file(str(ck / f"step-{s:08d}" / "model.safetensors"))
        assert all(torch.equal(a[k], b[k]) for k in a), s


# ------------------------------------------------------------------------------------------- one writer
def test_a_second_run_on_a_live_run_dir_is_refused_naming_the_holder_then_resume_after_sigkill(small_shards,
                                                                                               tmp_path):
    run_dir = tmp_path / "run"
    cmd = [sys.executable, str(ROOT / "recipes" / "coconut.py"), *args(small_shards, run_dir, "run.epochs=50")]
    first = subprocess.Popen(cmd, cwd=ROOT, env=run_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not (run_dir / "checkpoints" / "last.json").is_file():
            time.sleep(0.05)
        p = run_recipe(args(small_shards, run_dir) + ["--resume"], check=False)
        line = error_line(p)
        assert f"{run_dir}: another run is writing to this directory right now: pid {first.pid} on this host " \
               f"({socket.gethostname()}), started 20" in line, line
        assert f"`kill {first.pid}` stops it" in line and "or choose another run.run_dir" in line, line
    finally:
        first.kill()
        first.wait()
    p = run_recipe(args(small_shards, run_dir, "run.epochs=1", "run.max_steps=1") + ["--resume"])
    assert "resumed from" in p.stdout  # the kernel dropped the dead run's lock
    assert json.loads((run_dir / ".run.lock.json").read_text())["pid"] != first.pid


def test_a_lock_held_from_another_host_says_the_run_may_be_alive_there(tmp_path):
    from attrdist.train.rundir import _lock_run_dir

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / ".run.lock.json").write_text(json.dumps({"pid": 4242, "host": "node-b17", "started": "2026-11-24"}))
    holder = subprocess.Popen([sys.executable, "-c", "import time; from filelock import FileLock; "
                               f"lock = FileLock({str(run_dir / '.run.lock')!r}); lock.acquire(); "
                               "print('held', flush=True); time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        msg = _lock_run_dir(run_dir)
    finally:
        holder.kill()
        holder.wait()
    assert msg and "pid 4242 on host node-b17, another node" in msg and "the run may be alive there" in msg, msg
    assert _lock_run_dir(run_dir) is None  # the holder died: the lock is free again
    assert json.loads((run_dir / ".run.lock.json").read_text())["pid"] == os.getpid()
