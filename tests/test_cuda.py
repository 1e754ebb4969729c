"""Every CUDA path of attrdist, run once on a GPU: each recipe's demo profile in bf16 and in fp16 (GradScaler), an
injected NaN step skipped and counted as on a CPU (fp16; bf16 under run.host_sync=lagged and step),
`attrdist predict --device cuda` against the CPU, DeepSpeed ZeRO-2 and ZeRO-3 (and ZeRO-2 with run.offload=cpu) on
one GPU, a checkpoint written on the GPU resumed on the CPU and the other way round, model.sync_bn with one process,
and what the first step's input really was (a pinned host batch, channels_last tensors: attrdist.train.input_check).

Marker `cuda`: where torch sees no CUDA device these skip before any data is built (tests/conftest.py); `make
gpu-check` / `python -m bench.gpu` run them on a GPU machine, in ~3 minutes on one H100. Every run is a few steps
on the small test shards, and the runs that need no other run are all started when the first test asks for them,
ATTRDIST_CUDA_TESTS_PARALLEL at a time (default half the cores, at most 8; the longest first: ZeRO-Offload JIT-builds
DeepSpeed's CPU Adam); each test then waits for its own runs only.

Each check is a helper taking the device and precision, so that its assertions are known to hold on a CPU run of
the same kind (fp32 or bf16 there; fp16 and DeepSpeed on a GPU cannot run on a CPU). The tests call them with
device="cuda".
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.conftest import ROOT, run_env

pytestmark = pytest.mark.cuda

PARALLEL = int(os.environ.get("ATTRDIST_CUDA_TESTS_PARALLEL") or max(1, min(8, (os.cpu_count() or 2) // 2)))
STEPS = 3  # optimizer steps of a recipe run
NAN_STEPS = [3, 4]  # ATTRDIST_FAULT_NAN_STEPS of the NaN runs, of NAN_RUN_STEPS
NAN_RUN_STEPS = 5
MP = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}  # run.precision -> the runtime line's mixed_precision
# every recipe's demo profile made small: one epoch cut to STEPS steps, one loader worker (the pin-memory thread),
# the shards of each recipe's kind from tests/conftest.py
SMALL = ["run.threads=1", "run.epochs=1", "run.eval_every=1", "run.log_every=1", f"run.max_steps={STEPS}",
         "data.num_workers=1"]
RECIPES = {
    "coconut": ["data.batch_size=16", "model.dim=64", "model.contrastive_dim=32", "model.sync_bn=true"],
    "coco_attributes": ["data.batch_size=16", "model.text_pretrained="],
    "cocottributes": ["data.batch_size=16", "data.image_size=32"],
    "dior_remoteclip": ["data.batch_size=8", "model.pretrained="],
    "characters": ["data.batch_size=8", "data.image_size=32"],
}
# `attrdist predict` runs in the run's precision where the device has it: bf16 on both devices here, each within
# bf16's rounding of the fp32 probabilities. Measured on a CPU, bf16 against fp32 on the 3-step coconut demo
# checkpoint these tests make: at most 0.0005 over 16 images x 21 attributes; so the two devices within 0.001 of
# each other, and 10x that for other kernels (cuDNN's convolution algorithms, bf16 accumulation order)
PREDICT_TOL = 0.01


# ------------------------------------------------------------------------------------------- runs in the background
class Background:
    """Subprocesses started in the order given, `parallel` at a time, each in its run directory under `root`;
    `result(key)` waits for one and fails with the tail of its output unless it exited 0."""

    def __init__(self, root: Path, parallel: int = PARALLEL):
        self.root, self.pool, self.jobs = root, ThreadPoolExecutor(parallel), {}

    def dir(self, key: str) -> Path:
        return self.root / key

    def start(self, key: str, cmd: list[str], env: dict | None = None, timeout: float = 300) -> None:
        self.jobs[key] = self.pool.submit(run_command, cmd, env or run_env(), timeout)

    def result(self, key: str) -> subprocess.CompletedProcess:
        job: Future = self.jobs[key]
        p = job.result()
        assert p.returncode == 0, f"{key}: exit {p.returncode}\n{p.stdout[-6000:]}\n{p.stderr[-6000:]}"
        return p

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


def run_command(cmd: list[str], env: dict, timeout: float) -> subprocess.CompletedProcess:
    """`cmd` in the checkout, in a session of its own; its wall time in `.seconds`. A run past `timeout` is killed
    with all its processes (`launch local` starts the recipe as a child of its own) and comes back as exit -9."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        err += f"\ntimed out after {timeout:.0f} s"
    p = subprocess.CompletedProcess(cmd, proc.returncode, out, err)
    p.seconds = time.perf_counter() - t0
    return p


def recipe_cmd(recipe: str, shards: Path, run_dir: Path, device: str, precision: str, *extra: str) -> list[str]:
    return [sys.executable, str(ROOT / "recipes" / f"{recipe}.py"), "--profile", "demo", f"data.shards={shards}",
            f"run.run_dir={run_dir}", f"run.device={device}", f"run.precision={precision}", *SMALL, *RECIPES[recipe],
            *extra]


def deepspeed_cmd(stage: str, shards: Path, run_dir: Path, device: str, *extra: str) -> list[str]:
    """The coconut demo as its bf16 recipe run, through `python -m launch local --nproc 1 --deepspeed STAGE`."""
    recipe = recipe_cmd("coconut", shards, run_dir, device, "bf16", "data.num_workers=0", *extra)
    return [sys.executable, "-m", "launch", "local", recipe[1], "--nproc", "1", "--deepspeed", stage, *recipe[2:]]


def start_all(bg: Background, shards: dict[str, Path], device: str, precisions=("bf16", "fp16"),
              deepspeed: bool = True) -> None:
    """Every run that needs no other, the longest first. On a CPU (to check the helpers) pass precisions it has;
    ZeRO-Offload is for GPUs only."""
    coconut = shards["coconut"]
    if deepspeed and device == "cuda":  # first: DeepSpeed's CPU Adam is JIT-built with ninja on first use (65 s here)
        bg.start("zero2-offload", deepspeed_cmd("zero2", coconut, bg.dir("zero2-offload"), device, "run.offload=cpu"),
                 timeout=480)
    if deepspeed:
        for stage in ("zero3", "zero2"):
            bg.start(stage, deepspeed_cmd(stage, coconut, bg.dir(stage), device))
    # checkpoints across devices: 2 steps here, 2 more on the other device (test_checkpoint_resumes_across_devices)
    for first, precision in {device: precisions[0], "cpu": "fp32"}.items():
        bg.start(f"from-{first}", recipe_cmd("coconut", coconut, bg.dir(f"from-{first}"), first, precision,
                                             "run.max_steps=2", "data.num_workers=0"))
    for recipe in RECIPES:
        for precision in precisions:
            key = f"{recipe}-{precision}"
            bg.start(key, recipe_cmd(recipe, shards[recipe], bg.dir(key), device, precision))
    nan = run_env(ATTRDIST_FAULT_NAN_STEPS=",".join(map(str, NAN_STEPS)))
    small = ("data.num_workers=0", f"run.max_steps={NAN_RUN_STEPS}")
    bg.start("nan-ref", recipe_cmd("coconut", coconut, bg.dir("nan-ref"), "cpu", "fp32", *small), env=nan)
    nan_runs = [("nan-fp16", "fp16", "auto")] if "fp16" in precisions else []
    for key, precision, sync in nan_runs + [("nan-bf16-lagged", "bf16", "lagged"), ("nan-bf16-step", "bf16", "step")]:
        bg.start(key, recipe_cmd("coconut", coconut, bg.dir(key), device, precision, *small, f"run.host_sync={sync}"),
                 env=nan)


# ------------------------------------------------------------------------------------------- what a run left
def records(run_dir: Path, kind: str = "train") -> list[dict]:
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return sorted((r for r in recs if r["type"] == kind), key=lambda r: r["step"])


def log_lines(run_dir: Path, needle: str) -> list[str]:
    """The train.log lines holding `needle`, from it on (a resumed run appends to the log)."""
    return [x[x.index(needle):] for x in (run_dir / "train.log").read_text().splitlines() if needle in x]


def check_input_line(run_dir: Path, device: str, launches: int = 1) -> str:
    """The first step's input check (one line per launch; the last one checked): a pinned host batch exactly on
    CUDA, the model input channels_last as configured (a detector's is a list of images: n/a), the conv weights
    channels_last as configured (except under DeepSpeed, which keeps them flat), the device; and no warning."""
    cfg = json.loads((run_dir / "config.json").read_text())
    lines = log_lines(run_dir, "input checked: ")
    assert len(lines) == launches, lines
    line, cl = lines[-1], cfg["model"]["channels_last"]
    detector = cfg["data"]["task"] == "detection"
    where = "cuda:0" if device == "cuda" else "cpu"
    assert line.startswith(f"input checked: host batch pinned={device == 'cuda'}, model input channels_last="
                           + ("n/a (a list of " if detector else f"{cl}, ")), line
    assert line.endswith(f", on {where}"), line
    if cl and not detector and not cfg["run"]["deepspeed"]:
        assert ", conv weights channels_last=True (" in line, line
    assert not log_lines(run_dir, "input check: "), log_lines(run_dir, "input check: ")
    return line


def check_trained(run_dir: Path, device: str, precision: str, steps: int = STEPS) -> None:
    """A finished short run on `device` in `precision`: the runtime it got, every step logged with a finite loss,
    evaluated and reported, the first step's input as configured, and the fp16 loss scale (GradScaler) saved in
    the checkpoint exactly when fp16 ran."""
    from attrdist.train import checkpoint

    (runtime,) = log_lines(run_dir, "runtime: ")
    assert f" device={device} " in runtime and f" mixed_precision={MP[precision]} " in runtime, runtime
    train = records(run_dir)
    assert [r["step"] for r in train] == list(range(1, steps + 1)), [r["step"] for r in train]
    assert all(math.isfinite(r["loss"]) and not r.get("skipped") for r in train), train
    rep = json.loads((run_dir / "report.json").read_text())
    assert "val" in rep["results"] and rep["timings"]["inference"]["images_per_s"] > 0
    assert f" device={device} " in rep["runtime"] + " "
    check_input_line(run_dir, device)
    state = checkpoint.load_train_state(checkpoint.resolve(run_dir / "checkpoints", "last"))
    assert ("grad_scaler" in state) == (precision == "fp16"), sorted(state)
    if precision == "fp16":
        assert state["grad_scaler"]["scale"] > 0


def skips(run_dir: Path) -> list[tuple[int, bool, int | None]]:
    """(step, skipped, nonfinite_steps) of every training step: what metrics.jsonl says about non-finite steps."""
    return [(r["step"], bool(r.get("skipped")), r.get("nonfinite_steps")) for r in records(run_dir)]


def check_same_skips(ref_dir: Path, run_dir: Path, stdout: str) -> None:
    """The run skipped and counted the injected NaN steps exactly as the CPU fp32 reference did: the same steps
    marked skipped with the same running count, the same total in report.json, a warning per step. Under fp16
    the GradScaler also skips steps whose scaled gradients overflow while its scale calibrates: those are the
    scaler's (optim.max_nonfinite: 'fp16 loss-scale overflows are the scaler's and not counted') and appear
    as ordinary steps, so the records must still be exactly the reference's."""
    want = skips(ref_dir)
    assert [s for s, skipped, _ in want if skipped] == NAN_STEPS, want
    assert [n for _, skipped, n in want if skipped] == list(range(1, len(NAN_STEPS) + 1)), want
    assert skips(run_dir) == want
    for d in (ref_dir, run_dir):
        assert json.loads((d / "report.json").read_text())["nonfinite_steps"] == len(NAN_STEPS)
    for s in NAN_STEPS:
        assert f"WARNING step {s}: loss nan" in stdout
    assert all(math.isfinite(r["loss"]) for r in records(run_dir) if r["step"] not in NAN_STEPS)


def predicted(run_dir: Path, images: list[str], device: str, out: Path) -> dict[str, dict[str, float]]:
    """`attrdist predict RUN_DIR IMAGES --device DEVICE`: every attribute's probability per image (--jsonl)."""
    p = subprocess.run([sys.executable, "-m", "attrdist.cli", "predict", str(run_dir), *images, "--top", "1000",
                        "--device", device, "--jsonl", str(out)], cwd=ROOT, env=run_env(), capture_output=True,
                       text=True, timeout=180)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert f" on {device}; preprocessing" in p.stdout, p.stdout[:500]
    return {row["path"]: dict(row["top"]) for row in map(json.loads, out.read_text().splitlines())}


def check_predictions_agree(a: dict, b: dict, tol: float = PREDICT_TOL, k: int = 5) -> float:
    """The same images, attributes and top attributes, the probabilities within `tol`. Where two attributes'
    probabilities on `a` lie within 2 tol of each other at the top-k boundary their order is a tie at this
    precision, and either may be in the top k. Returns the largest difference."""
    assert a.keys() == b.keys() and len(a) > 0
    worst = 0.0
    for path, pa in a.items():
        pb = b[path]
        assert pa.keys() == pb.keys()
        worst = max(worst, max(abs(pa[n] - pb[n]) for n in pa))
        kth = sorted(pa.values(), reverse=True)[k - 1]
        top_b = set(sorted(pb, key=pb.get, reverse=True)[:k])
        assert {n for n, v in pa.items() if v > kth + 2 * tol} <= top_b, (path, pa, pb)
        assert all(pa[n] >= kth - 2 * tol for n in top_b), (path, pa, pb)
    assert worst <= tol, f"largest probability difference {worst:.4f} > {tol}"
    return worst


def check_resumed(run_dir: Path, stdout: str, device: str, saved: int, steps: int) -> None:
    """A run resumed on `device` from its checkpoint of step `saved` and trained to `steps`: it says so, its
    metrics go on from that step, the optimizer state came with it (Adam's per-parameter step count goes on
    from `saved`: a fresh optimizer would end at steps - saved), and it finished with a report."""
    from attrdist.train import checkpoint

    ck = run_dir / "checkpoints"
    assert f"resumed from {ck / f'step-{saved:08d}'}: epoch 0, batch {saved} of the epoch, step {saved}, " in stdout
    assert f" device={device} " in log_lines(run_dir, "runtime: ")[-1]
    assert [r["step"] for r in records(run_dir)] == list(range(1, steps + 1))
    last = checkpoint.resolve(ck, "last")
    assert last.name == f"step-{steps:08d}"
    counts = {float(s["step"]) for s in checkpoint.load_train_state(last)["optimizer"]["state"].values()}
    assert counts == {float(steps)}, counts
    rep = json.loads((run_dir / "report.json").read_text())
    assert f" device={device} " in rep["runtime"] + " " and "val" in rep["results"]
    check_input_line(run_dir, device, launches=2)


def check_deepspeed(run_dir: Path, stdout: str, stage: str, device: str, ref_dir: Path | None = None) -> None:
    """A DeepSpeed run with one process on `device`: the engine it got, every step trained, one rank's
    partitions in its checkpoint, a report; its first loss that of the same run without DeepSpeed (`ref_dir`:
    the same weights on the same batch, in bf16, up to the rounding of other conv kernels: DeepSpeed keeps
    the weights in the default layout)."""
    (runtime,) = log_lines(run_dir, "runtime: ")
    assert f"engine=deepspeed-{stage} " in runtime and "distributed=DEEPSPEED " in runtime, runtime
    assert f" device={device} " in runtime and f" backend={'nccl' if device == 'cuda' else 'gloo'} " in runtime
    train = records(run_dir)
    assert [r["step"] for r in train] == list(range(1, STEPS + 1)) and all(math.isfinite(r["loss"]) for r in train)
    if ref_dir is not None:
        a, b = records(ref_dir)[0]["loss"], train[0]["loss"]
        assert abs(a - b) <= 1e-2 * abs(a), (a, b)
    ck = run_dir / "checkpoints" / json.loads((run_dir / "checkpoints" / "last.json").read_text())["dir"]
    meta = json.loads((ck / "meta.json").read_text())
    assert meta["engine"] == f"deepspeed-{stage}" and meta["world_size"] == 1
    assert len([f for f in meta["files"] if f.startswith("deepspeed/engine/") and "optim_states" in f]) == 1
    assert (ck / "model.safetensors").is_file() and "headline:" in stdout
    check_input_line(run_dir, device)


def zero2_partition(run_dir: Path) -> tuple[dict, set[str]]:
    """(the DeepSpeed config, the devices of the fp32 master partitions) in the last checkpoint's ZeRO-2
    optimizer partition of rank 0: tensors load onto the device they were saved from."""
    from attrdist.train import zero

    ck = run_dir / "checkpoints" / json.loads((run_dir / "checkpoints" / "last.json").read_text())["dir"]
    (f,) = [f for f in json.loads((ck / "meta.json").read_text())["files"] if f.endswith("optim_states.pt")]
    sd = zero.weights_only_load(ck / f)
    return sd["ds_config"], {t.device.type for t in sd["optimizer_state_dict"]["single_partition_of_fp32_groups"]}


# ------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def characters_shards(tmp_path_factory) -> Path:
    """Rendered letters (4 classes) through the real image-folder packer, as in tests/test_train.py."""
    from attrdist.demo.characters import CharactersSpec, ensure_characters
    from attrdist.pack.imagefolder import pack_imagefolder

    tmp = tmp_path_factory.mktemp("characters")
    root = ensure_characters(tmp / "letters", CharactersSpec(classes=4, sources_per_class=12, copies=1, size=48))
    pack_imagefolder(root, tmp / "shards", val=0.25, test=0.0, group_by="prefix", group_sep="_", group_parts=1,
                     dataset="letters", progress=False)
    return tmp / "shards"


@pytest.fixture(scope="module")
def runs(small_shards, cocottributes_shards, aerial_shards, characters_shards, tmp_path_factory):
    bg = Background(tmp_path_factory.mktemp("cuda-runs"))
    start_all(bg, {"coconut": small_shards, "coco_attributes": small_shards, "cocottributes": cocottributes_shards,
                   "dior_remoteclip": aerial_shards, "characters": characters_shards}, "cuda")
    yield bg
    bg.close()


def demo_images(small_demo: Path, n: int) -> list[str]:
    return [str(p) for p in sorted((small_demo / "images").rglob("*.jpg"))[:n]]


# ------------------------------------------------------------------------------------------- the tests
def test_auto_precision_is_bf16_exactly_where_the_gpu_has_it_natively():
    """run.precision=auto: bf16 on compute capability >= 8.0 (A100, H100), fp32 on a V100 or T4, where torch's
    torch.cuda.is_bf16_supported() also says True (emulated)."""
    import torch

    from attrdist.train.runtime import resolve_precision

    assert resolve_precision("auto", "cuda") == ("bf16" if torch.cuda.get_device_capability()[0] >= 8 else "no")


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.parametrize("recipe", list(RECIPES))
def test_recipe_demo_trains_on_cuda(runs, recipe, precision):
    """Each recipe's demo profile, 3 steps on the GPU in bf16 and in fp16 (accelerate's GradScaler, its scale saved
    with the checkpoint), evaluated and reported, its first step's input pinned and channels_last as configured."""
    runs.result(f"{recipe}-{precision}")
    check_trained(runs.dir(f"{recipe}-{precision}"), "cuda", precision)


@pytest.mark.parametrize("key", ["nan-fp16", "nan-bf16-lagged", "nan-bf16-step"])
def test_a_nan_step_is_skipped_and_counted_as_on_cpu(runs, key):
    """fp16 (GradScaler; run.host_sync=auto) and bf16 with the per-step agreement read right after the step
    (run.host_sync=step) and one step later (lagged): the same steps skipped and counted as the CPU fp32 run."""
    runs.result("nan-ref")
    check_same_skips(runs.dir("nan-ref"), runs.dir(key), runs.result(key).stdout)


def test_predict_on_cuda_agrees_with_the_cpu(runs, small_demo, tmp_path):
    """`attrdist predict --device cuda` on the bf16 coconut run: the same top attributes as `--device cpu`, every
    probability within PREDICT_TOL (bf16 on both devices; see there)."""
    run_dir = runs.dir("coconut-bf16")
    runs.result("coconut-bf16")
    images = demo_images(small_demo, 16)
    gpu, cpu = (predicted(run_dir, images, d, tmp_path / f"{d}.jsonl") for d in ("cuda", "cpu"))
    print(f"predict cuda vs cpu (bf16 both): largest probability difference {check_predictions_agree(cpu, gpu):.4f}")


def test_sync_bn_with_one_gpu_converts_nothing(runs):
    """model.sync_bn=true on one GPU: one process already normalises over the whole global batch, so nothing is
    converted, and the run says so. NOT covered here: SyncBatchNorm itself (2+ ranks, NCCL), which needs two GPUs:
    NCCL refuses two ranks on one device."""
    for precision in ("bf16", "fp16"):
        run_dir = runs.dir(f"coconut-{precision}")
        runs.result(f"coconut-{precision}")
        assert json.loads((run_dir / "config.json").read_text())["model"]["sync_bn"] is True
        assert log_lines(run_dir, "model.sync_bn: ") == [
            "model.sync_bn: 1 process, BatchNorm already sees the whole global batch (nothing converted)"]


@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_deepspeed_on_one_gpu(runs, stage, small_demo, tmp_path):
    """ZeRO-2 / ZeRO-3 with one rank (NCCL): trains like the run without DeepSpeed, checkpoints its partition and
    the consolidated weights, which `attrdist predict` reads on the GPU (zero3: gathered from the partitions)."""
    p = runs.result(stage)
    runs.result("coconut-bf16")
    check_deepspeed(runs.dir(stage), p.stdout, stage, "cuda", ref_dir=runs.dir("coconut-bf16"))
    if stage == "zero3":
        got = predicted(runs.dir(stage), demo_images(small_demo, 2), "cuda", tmp_path / "z3.jsonl")
        assert len(got) == 2


def test_deepspeed_zero2_offloads_the_optimizer_to_cpu(runs):
    """run.offload=cpu: the optimizer state and fp32 master weights in CPU memory (its checkpoint partition says
    where they were), stepped by DeepSpeed's CPU Adam (JIT-built with ninja on first use: its time is in this
    run's, printed)."""
    p = runs.result("zero2-offload")
    run_dir = runs.dir("zero2-offload")
    print(f"zero2 + run.offload=cpu: {p.seconds:.0f} s, DeepSpeed's CPU Adam build included where not cached")
    check_deepspeed(run_dir, p.stdout, "zero2", "cuda", ref_dir=runs.dir("zero2"))
    assert "optimizer: DeepSpeedCPUAdam (adamw_mode=True) for run.offload" in p.stdout
    config, devices = zero2_partition(run_dir)
    assert config["zero_optimization"]["offload_optimizer"] == {"device": "cpu"} and devices == {"cpu"}
    config, devices = zero2_partition(runs.dir("zero2"))  # without offload the master weights are on the GPU
    assert "offload_optimizer" not in config["zero_optimization"] and devices == {"cuda"}


@pytest.mark.parametrize("first,then", [("cuda", "cpu"), ("cpu", "cuda")])
def test_checkpoint_resumes_across_devices(runs, small_shards, first, then):
    """2 steps on one device (bf16 on the GPU, fp32 on the CPU), then run.resume=auto to 4 steps on the other:
    weights and optimizer state cross over, the run goes on from step 2 and finishes with a report."""
    runs.result(f"from-{first}")
    run_dir = runs.dir(f"from-{first}")
    p = run_command(recipe_cmd("coconut", small_shards, run_dir, then, "bf16" if then == "cuda" else "fp32",
                               "run.max_steps=4", "data.num_workers=0", "run.resume=auto"), run_env(), 300)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
    check_resumed(run_dir, p.stdout, then, saved=2, steps=4)
