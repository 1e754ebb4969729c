"""run.host_sync and run.compile in the trainer (attrdist/train/agreement.py, attrdist/train/trainer.py).

run.host_sync=lagged skips a non-finite step on the device (torch's fused optimizers read `found_inf` there, the
BatchNorm statistics are put back with torch.where) and the host reads each step's all-ranks agreement one step
later. It must train EXACTLY as run.host_sync=step: these CPU runs (real recipe runs on the test shards, NaN
losses injected through ATTRDIST_FAULT_NAN_STEPS) compare the weights and optimizer state bit for bit and the
metrics.jsonl records value for value; a stop signal, a fault limit and a 2-rank run too. On a CPU both modes
cost the same (its operations are synchronous); what lagged saves on a GPU is measured by bench/gpu.py.
"""

from __future__ import annotations

import copy
import json
import signal
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from attrdist.core.config import OptimConfig, RunConfig
from attrdist.errors import AttrdistError
from attrdist.train import agreement, checkpoint
from attrdist.train.trainer import build_optimizer
from tests.conftest import FAST, ROOT, assert_one_line_error, assert_tensors_equal, run_env, run_recipe, train_steps
from tests.test_distributed import launch
from tests.test_reliability_train import error_line, tensors
from tests.test_slurm import wait_for

# 96 training images, global batch 8: 12 optimizer steps per epoch, 24 in the run; no periodic checkpoint, so the
# lagged mode's reads really trail the steps (a checkpoint reads the pending step first)
CFG = [*FAST, "data.batch_size=8", "run.curves_every=100"]
NAN = {"ATTRDIST_FAULT_NAN_STEPS": "2,3"}
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def args(shards: Path, run_dir: Path, *extra: str) -> list[str]:
    return ["--profile", "demo", f"data.shards={shards}", f"run.run_dir={run_dir}", *CFG, *extra]


def records(run_dir: Path, upto: int | None = None) -> list[dict]:
    """metrics.jsonl without the wall-clock fields (rates, times); a step recorded twice (stopped, then resumed)
    keeps its later record; `upto`: train records up to that step only."""
    out, seen = [], {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        r = {k: v for k, v in json.loads(line).items() if k != "time" and not k.endswith("img_per_s")
             and not k.endswith("images_per_s")}
        if r["type"] == "train" and upto is not None and r["step"] > upto:
            continue
        key = (r["type"], r["step"])
        if key in seen:
            out[seen[key]] = r
        else:
            seen[key] = len(out)
            out.append(r)
    return out


def last(run_dir: Path) -> Path:
    return checkpoint.resolve(run_dir / "checkpoints", "last")


@pytest.fixture(scope="module")
def pair(small_shards, tmp_path_factory) -> dict[str, Path]:
    """The same run in both modes, steps 2 and 3 with a NaN loss: step by run.host_sync=auto (step on a CPU),
    lagged explicitly (the device-side skip then runs on the CPU)."""
    root = tmp_path_factory.mktemp("host-sync")
    out = {}
    for mode in ("auto", "lagged"):
        out[mode] = root / mode
        out[f"{mode}-log"] = run_recipe(args(small_shards, out[mode], f"run.host_sync={mode}"), env=run_env(**NAN)).stdout
    return out


def test_lagged_trains_bitwise_like_step_including_skipped_nonfinite_steps(pair):
    step, lagged = pair["auto"], pair["lagged"]
    assert "run.host_sync=auto -> step: on cpu every operation runs synchronously" in pair["auto-log"]
    assert " host_sync=step " in next(x for x in pair["auto-log"].splitlines() if "runtime: " in x)
    assert " host_sync=lagged " in next(x for x in pair["lagged-log"].splitlines() if "runtime: " in x)
    for mode in ("auto", "lagged"):  # the skip happened, in both
        assert "WARNING step 3: loss nan, gradient norm nan not finite: optimizer step skipped" in pair[f"{mode}-log"]
    a, b = records(step), records(lagged)
    assert [r["step"] for r in a if r["type"] == "train"] == list(range(1, 25))
    assert a == b  # train records (loss, parts, grad_norm, skipped, nonfinite_steps, lr) and evaluations
    assert [r.get("nonfinite_steps") for r in a if r["type"] == "train"][:4] == [None, 1, 2, None]
    assert_tensors_equal(tensors(last(step)), tensors(last(lagged)), "weights and optimizer state: ")
    assert json.loads((lagged / "report.json").read_text())["nonfinite_steps"] == 2


def test_a_stop_signal_in_lagged_mode_saves_one_consistent_checkpoint_and_resumes_bitwise(pair, small_shards, tmp_path):
    """SIGUSR2 while the lagged run trains: the stop is agreed one step after the signal is seen; every step
    taken is recorded and in the checkpoint, which resumes to exactly the uninterrupted run's weights."""
    rd = tmp_path / "stopped"
    cmd = [sys.executable, str(ROOT / "recipes" / "coconut.py"), *args(small_shards, rd, "run.host_sync=lagged")]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=run_env(**NAN), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    wait_for(lambda: len(train_steps(rd / "metrics.jsonl")) >= 4 or proc.poll() is not None, 120, "4 steps", 0.01)
    proc.send_signal(signal.SIGUSR2)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGUSR2, out[-3000:]
    stopped = max(train_steps(rd / "metrics.jsonl"))
    assert stopped < 24 and f"stopped by signal {int(signal.SIGUSR2)} after step {stopped} (checkpoint saved)" in out
    ck = rd / "checkpoints"
    assert last(rd).name == f"step-{stopped:08d}" and not list(ck.glob(".*"))
    checkpoint.verify(last(rd))
    assert checkpoint.load_train_state(last(rd))["loop"]["step"] == stopped
    got, ref = records(rd), records(pair["lagged"])
    assert got == ref[:len(got)] and got[-1]["step"] == stopped  # every step up to the saved one, as uninterrupted
    run_recipe(args(small_shards, rd, "run.host_sync=lagged") + ["--resume"], env=run_env(**NAN))
    assert records(rd) == records(pair["lagged"])
    assert_tensors_equal(tensors(last(rd)), tensors(last(pair["lagged"])), "resumed vs uninterrupted: ")


def test_the_nonfinite_limit_stops_both_modes_alike_with_sgd_and_no_clipping(small_shards, tmp_path):
    """SGD with momentum keeps no state before its first real step, so steps 1 (NaN) and 2 are decided on the
    host in the lagged mode too (a found_inf skip would leave uninitialised momentum behind); steps 3-5 are
    skipped on the device, and step 5, the third in a row, is more than optim.max_nonfinite=2: the same one-line
    error, the same checkpoint of step 4 (momentum included)."""
    extra = ["run.epochs=1", "optim.name=sgd", "optim.lr=0.05", "optim.clip_grad_norm=0", "optim.max_nonfinite=2",
             "run.ckpt_every_steps=2"]
    got = {}
    for mode in ("step", "lagged"):
        p = run_recipe(args(small_shards, tmp_path / mode, f"run.host_sync={mode}", *extra), check=False,
                       env=run_env(ATTRDIST_FAULT_NAN_STEPS="1,3,4,5"))
        got[mode] = error_line(p).replace(str(tmp_path / mode), "RUN")
        assert "WARNING step 1: loss nan or gradients not finite" in p.stdout
    assert got["step"] == got["lagged"]
    assert "step 5: the loss or gradients were NaN/Inf in 3 optimizer steps in a row, more than optim.max_nonfinite=2"\
        in got["step"] and "weights are those of step 2" in got["step"], got["step"]
    assert "resume from the last checkpoint RUN/checkpoints/step-00000004 with --resume" in got["step"], got["step"]
    # the lagged run had queued step 6 when it read step 5: that record is written on the way out, nothing else
    assert records(tmp_path / "step") == records(tmp_path / "lagged", upto=5)
    assert [r["step"] for r in records(tmp_path / "lagged")][-1] == 6
    assert_tensors_equal(tensors(last(tmp_path / "step")), tensors(last(tmp_path / "lagged")), "step 4 (momentum): ")


@pytest.mark.slow  # 30-40 s of 2-rank runs; make test keeps the 1-rank equalities (make test-slow)
@pytest.mark.distributed
def test_two_ranks_lagged_equal_step_mode_bitwise(small_shards, tmp_path, monkeypatch):
    """2 gloo ranks: every rank skips the NaN steps on the device from the same reduced flag; the weights and
    records equal the step mode's."""
    monkeypatch.setenv("ATTRDIST_FAULT_NAN_STEPS", "2,3")
    for mode in ("step", "lagged"):
        p = launch(2, args(small_shards, tmp_path / mode, f"run.host_sync={mode}", "run.epochs=1"))
        assert f"host_sync={mode} " in p.stdout
    assert records(tmp_path / "step") == records(tmp_path / "lagged")
    assert [r.get("skipped") for r in records(tmp_path / "lagged")][:4] == [None, True, True, None]
    assert_tensors_equal(tensors(last(tmp_path / "step")), tensors(last(tmp_path / "lagged")), "2 ranks: ")


def test_options_that_cannot_be_honoured_stop_with_one_line_before_the_run_starts(small_shards, tmp_path):
    p = run_recipe(args(small_shards, tmp_path / "run", "run.host_sync=lagged", "optim.fused=false"), check=False)
    assert_one_line_error(p, "run.host_sync=lagged cannot be honoured: optim.fused=false",
                          "drop optim.fused=false, or use run.host_sync=auto or step")
    p = run_recipe(args(small_shards, tmp_path / "run", "run.compile=true", "run.deepspeed=zero2"), check=False)
    assert_one_line_error(p, "run.compile=true with run.deepspeed=zero2", "drop one of them")
    assert not (tmp_path / "run").exists()


def test_resolve_names_what_rules_lagged_out():
    """The pure decision: auto is lagged on CUDA only; each obstacle is named (auto: step; lagged: an error)."""
    run, opt = RunConfig(), OptimConfig()
    assert agreement.resolve(run, opt, "cuda", "bf16")[0] == "lagged"
    assert agreement.resolve(run, opt, "cpu", "no")[0] == "step"
    assert agreement.resolve(replace(run, host_sync="lagged"), opt, "cpu", "no")[0] == "lagged"
    assert agreement.resolve(replace(run, host_sync="step"), opt, "cuda", "no")[0] == "step"
    cases = {"optim.fused=false": (run, replace(opt, fused=False), "no"),
             "run.deepspeed=zero2": (replace(run, deepspeed="zero2"), opt, "bf16"),
             "fp16: the loss scaler": (run, opt, "fp16"),
             "run.log_samples=true": (replace(run, log_samples=True), opt, "no"),
             "run.debug=true": (replace(run, debug=True), opt, "no")}
    for why, (r, o, mp) in cases.items():
        mode, note = agreement.resolve(r, o, "cuda", mp)
        assert mode == "step" and note.startswith(f"run.host_sync=auto -> step: {why}"), note
        with pytest.raises(AttrdistError, match=f"^run.host_sync=lagged cannot be honoured: {why}"):
            agreement.resolve(replace(r, host_sync="lagged"), o, "cuda", mp)
    with pytest.raises(AttrdistError, match="the mps device"):
        agreement.resolve(replace(run, host_sync="lagged"), opt, "mps", "no")


@pytest.mark.parametrize("dev", ["cpu", pytest.param("cuda", marks=cuda)])
@pytest.mark.parametrize("name", ["adamw", "adam", "sgd"])
def test_a_found_inf_skip_leaves_weights_optimizer_state_and_statistics_as_they_were(name, dev):
    """The device-side skip, on torch's fused optimizers as build_optimizer makes them: with skip=True, params,
    every state tensor (exp_avg, exp_avg_sq, momentum, and the `step` count) and the BatchNorm buffers stay bit
    for bit; with skip=False the step equals a plain optimizer.step(). Before the first step the state is not
    ready (`state_ready`), after it it is."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2)).to(dev)
    opt = build_optimizer(replace(OptimConfig(), name=name, weight_decay=0.1), model)
    assert all(g["fused"] for g in opt.param_groups)

    def backward():
        model(torch.randn(8, 5, device=dev)).square().mean().backward()

    def snapshot(m=model, o=opt):  # weights, buffers and every optimizer state tensor, copied
        s = {f"p/{k}": v.clone() for k, v in m.state_dict().items()}
        s.update({f"s/{i}/{k}": v.clone() for i, st in enumerate(o.state.values()) for k, v in st.items()})
        return s

    backward()
    assert not agreement.state_ready(opt)
    opt.step()
    opt.zero_grad()
    assert agreement.state_ready(opt)
    buffers = list(model.buffers())
    saved = [b.clone() for b in buffers]
    before = snapshot()
    backward()  # the forward moved the running statistics, the gradients are there
    assert not torch.equal(buffers[0], saved[0])
    agreement.step_unless(torch.tensor(True, device=dev), opt, buffers, saved)
    assert_tensors_equal(snapshot(), before, f"{name} skip: ")
    assert not hasattr(opt, "found_inf")
    twin, twin_opt = copy.deepcopy((model, opt))
    for a, b in zip(model.parameters(), twin.parameters()):
        b.grad = a.grad.clone()  # deepcopy leaves gradients behind
    agreement.step_unless(torch.tensor(False, device=dev), opt, buffers, saved)
    twin_opt.step()
    assert_tensors_equal(snapshot(), snapshot(twin, twin_opt), f"{name} step: ")
    assert not torch.equal(model.state_dict()["0.weight"], before["p/0.weight"])


@pytest.mark.slow
def test_compile_trains_keeps_checkpoint_keys_and_predicts(small_shards, small_demo, tmp_path):
    """run.compile=true on CPU (inductor, g++): the run trains and evaluates, the checkpoint has the plain
    model's keys (compiled in place), `attrdist predict` loads it. The losses are close to an eager run's, not
    equal: inductor fuses and reorders float arithmetic (measured here: at most 1.3e-6 relative over these 12
    steps, so 1e-4 leaves room for other CPUs' kernels; dropout is off, inductor draws its masks differently).
    ~2.5 min here: the first step compiles for 70-95 s on this 2-core machine."""
    runs = {}
    for name, extra in (("eager", []), ("compiled", ["run.compile=true"])):
        runs[name] = tmp_path / name
        p = run_recipe(args(small_shards, runs[name], "run.epochs=1", "model.dropout=0", *extra), timeout=600)
    assert "run.compile: CrossModalAttributes compiled in place" in p.stdout
    assert "run.compile: the first step of this launch took" in p.stdout
    a, b = load_file(str(last(runs["eager"]) / "model.safetensors")), load_file(str(last(runs["compiled"]) / "model.safetensors"))
    assert a.keys() == b.keys()
    la = [r["loss"] for r in records(runs["eager"]) if r["type"] == "train"]
    lb = [r["loss"] for r in records(runs["compiled"]) if r["type"] == "train"]
    assert len(la) == len(lb) == 12
    assert max(abs(x - y) / abs(x) for x, y in zip(la, lb)) < 1e-4, (la, lb)
    img = str(next((small_demo / "images" / "val").glob("*.jpg")))
    p = subprocess.run([sys.executable, "-m", "attrdist.cli", "predict", str(runs["compiled"]), img], cwd=ROOT,
                       env=run_env(), capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and img in p.stdout, p.stdout + p.stderr


@cuda
def test_the_lagged_step_queues_without_a_host_sync_on_cuda():
    """The lagged mode's per-step path on CUDA (clip, flags with host numbers, the skip decision, fused AdamW
    reading found_inf, the BatchNorm restore, the copy of the sums to the host) under
    torch.cuda.set_sync_debug_mode("error"): any synchronising call raises. Then the values arrive, and the NaN
    step has left weights and statistics bit for bit."""
    dev = torch.device("cuda")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2)).to(dev)
    opt = build_optimizer(OptimConfig(), model)
    params, buffers = list(model.parameters()), list(model.buffers())
    saved = [b.clone() for b in buffers]
    x = torch.randn(8, 5, device=dev)
    model(x).square().mean().backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    assert agreement.state_ready(opt)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        torch._foreach_copy_(saved, buffers)
        loss = model(x).square().mean() * float("nan")
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
        flags = agreement.flags(loss, {"part": loss.detach()}, norm, [3.0, 0.0])
        agreement.step_unless(flags[-3] > 0, opt, buffers, saved)
        opt.zero_grad(set_to_none=True)
        read = agreement.DeviceRead(torch.cat([flags, norm.float().reshape(1)]))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    values = read.get()
    assert len(values) == 6 and values[2:5] == [1.0, 3.0, 0.0], values  # [loss, part, non-finite, corrupt, stop, norm]
    assert_tensors_equal(model.state_dict(), before, "NaN step on CUDA: ")


# Runs the recipe in this interpreter with torch.cuda.set_sync_debug_mode("warn"), and writes, per optimizer step,
# the places that synchronised with the GPU since the previous step's hand-over (Trainer.agree): lagged's are the
# previous step's read and this step's micro-batches and optimizer step.
SYNC_COUNTER = r"""
import json, os, runpy, sys, warnings
sys.path.insert(0, os.getcwd())
import torch
import attrdist.train.trainer as T
seen, per_step = [], {}
def show(message, category, filename, lineno, file=None, line=None):
    if "synchroniz" in str(message):
        seen.append(f"{os.path.relpath(filename)}:{lineno}")
warnings.showwarning = show
warnings.simplefilter("always")
agree = T.Trainer.agree
def counted(self, step, handlers):
    per_step[step.rec["step"]] = list(seen)
    seen.clear()
    agree(self, step, handlers)
T.Trainer.agree = counted
torch.cuda.set_sync_debug_mode("warn")
out = sys.argv.pop(1)
try:
    runpy.run_path("recipes/coconut.py", run_name="__main__")
finally:
    open(out, "w").write(json.dumps(per_step))
"""


@cuda
def test_on_cuda_lagged_steps_never_wait_for_the_gpu_and_train_like_step_mode(small_shards, tmp_path):
    """A real run on the GPU in both modes, steps 2 and 3 NaN: the step mode synchronises every step (the counter
    works), the lagged mode in no step after the first (whose optimizer state is created on the host's word);
    both skip the same steps and train alike. data.pixel_stage=workers: the device pixel stage
    (attrdist.core.transforms.photometric) copies its constants to the GPU with blocking copies, 3 syncs a batch,
    outside this mode's reach."""
    got, recs = {}, {}
    for mode in ("step", "lagged"):
        rd, out = tmp_path / mode, tmp_path / f"{mode}-syncs.json"
        p = subprocess.run([sys.executable, "-c", SYNC_COUNTER, str(out),
                            *args(small_shards, rd, f"run.host_sync={mode}", "run.device=cuda", "run.epochs=1",
                                  "data.pixel_stage=workers")],
                           cwd=ROOT, env=run_env(**NAN), capture_output=True,
                           text=True, timeout=600)
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
        assert f" host_sync={mode} " in p.stdout
        got[mode] = {int(k): v for k, v in json.loads(out.read_text()).items()}
        recs[mode] = [r for r in records(rd) if r["type"] == "train"]
    print("syncs per step, step mode:", {k: len(v) for k, v in got["step"].items()})
    print("syncs per step, lagged:", {k: v for k, v in got["lagged"].items() if v})
    assert sorted(got["lagged"]) == list(range(1, 13))
    assert all(got["step"][s] for s in range(2, 13)), got["step"]
    assert not any(got["lagged"][s] for s in range(2, 13)), {s: v for s, v in got["lagged"].items() if v}
    a, b = recs["step"], recs["lagged"]
    assert [(r["step"], r.get("skipped"), r.get("nonfinite_steps")) for r in a] == \
        [(r["step"], r.get("skipped"), r.get("nonfinite_steps")) for r in b]
    for x, y in zip(a, b):  # cuDNN's atomics may sum in another order from run to run: close, not bitwise
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-4, nan_ok=True), (x, y)
    print("records bitwise equal:", a == b)
