"""Issue 21's GPU check on one card: the cuda tests, trainer vs bare loop, host sync, input feed, inference, compile.

    python -m bench.gpu                      # = make gpu-check: under 8 min on one H100 + 16 cores
    python -m bench.gpu --quick              # small sizes (without CUDA always): ~35 s on 2 idle cores
    python -m bench.gpu --budget-s 300       # start no section that would not end within 300 s of the start
    python -m bench.gpu --sections train,input

Sections, in this order, each in this process unless said (times: estimates for one H100 with 16 cores, reasoned
from ResNet-50 training at ~3,000 img/s bf16; --budget-s, default 480 s, skips a section whose estimate no longer
fits, with a "SKIPPED (budget)" line):
  data       (~15 s) N = 1,024 COCO-like 640x480 JPEGs (bench.pack.make_dataset: cut from the COCO photos in
             ../shared/data/coco/images or $ATTRDIST_BENCH_COCO, else rendered scenes) packed by the coconut
             recipe's packer (shards/coco.py --mode captions, copy-through) with recipes/coconut_vocab.json; 16 more
             as the val split. Made once, for (b), (c) and (e).
  (a) tests  (~120 s, a hard timeout of what the budget leaves) `python -m pytest -m cuda tests` in a subprocess
             (sys.executable, PYTHONPATH passed on): passed / failed / errors / skipped counts from its JUnit XML,
             the failing tests named. Target: 0 failed, 0 errors, at least one passed.
  (b) train  (~80 s) ResNet-50@224 (the coconut full profile's backbone: its data, augmentation, AdamW and
             clipping, with model.name=classifier, all stages trained, linear head), batch 256, bf16 autocast,
             channels_last, on 2 distinct batches decoded and augmented once by attrdist's own SampleDataset and
             held ON THE DEVICE (float, channels_last), cycled: no input path in the timed region (that is (c)).
             Alternating, 3 rounds: the real Trainer (bench.train_step.BenchTrainer) with run.host_sync=step and
             with run.host_sync=lagged (the CUDA default of auto), and the bare loop (bench.train_step.bare_loop:
             same model, optimizer, loss, clipping, seeds; no host read per step). 5 warm-up + 40 timed steps.
             Timed region of the Trainer: torch.cuda.synchronize() then a clock read when the loop asks for the
             first timed batch, and again when it asks for the batch after the last timed one (the loader is
             the only thing wrapped; so each timed step holds exactly one host read of the flags in either mode);
             the bare loop syncs at both ends. Targets: trainer (lagged) / bare >= 0.95x images/s (issue), and
             lagged within ~1 % of bare (>= 0.99x); stated: step / lagged (what a sync every step costs), images/s
             against DALI's ResNet-50 anchor (~2,500 img/s per A100 with AMP), achieved FLOP/s against the card's
             bf16 8192^2 matmul. Step-1 losses of trainer and bare must agree (the same work on the same batches).
             Estimate: a run is 46 steps x 256 images at ~3,000 img/s (~4 s) plus ~3 s to build the Trainer or
             the model; 9 runs, the batches decoded once (~3 s), FLOPs counted on the CPU (~2 s).
  (c) input  (~40 s) can the cores feed the card? The shard loader at 224 px with the coconut full profile's
             augmentation, workers = all cores, batch 128, exactly as the trainer builds it: task.dataset (train,
             pixel stage on the device) + task.collate + attrdist.data.loader.make_loader (pinned), every batch
             through attrdist.data.samples.batch_images onto the device (channels_last), synchronised at the end.
             One loader over 8 consecutive epochs (fresh augmentation keys each epoch; 64 batches, 4 per worker):
             steady images/s from the end of the first wave of batches (one per worker) to the end of the pass,
             the time to the first batch and the rate with start-up beside it. Variants, alternating, 2 rounds:
             data.decode=workers (libjpeg-turbo in the workers), data.decode=device (nvJPEG + crop/flip on the
             device) with all cores, and with a quarter of them. batch_images' time per batch is reported on the
             device's timeline (CUDA events around the call: kernels, and any wait for the host, such as nvJPEG's
             Huffman decoding on the CPU) and in the calling process: under data.decode=device that is time the
             training step pays on the device, and host time taken from the loop that feeds it. Target:
             loader images/s >= the trainer's images/s of (b) (input never limits the step), per variant.
  (d) inference (~70 s) bench.inference.measure on the device: Trainer.measure_inference, the evaluation pass
             and `attrdist predict`'s predict_images against a bare loop, for the coconut demo model (4 eval
             batches of 64) and the 284-attribute ResNet-50@224 (6 eval batches of 16), 3 rounds. Target >= 0.9x.
  (e) compile (~120 s; last, as the most expensive and optional) run.compile=true in the Trainer (host_sync
             lagged) against the bare loop with torch.compile(model), 1 round, 3 warm-up steps (the compile is in
             the first) + 40 timed. Targets: trainer / bare (both compiled) >= 0.95x; stated: compiled / eager
             trainer images/s (eager from (b)) and the warm-up seconds (compile time).

Without CUDA (or with --quick) every section runs its CPU-side part at small sizes: the tests subprocess (the
cuda tests skip themselves), trainer vs bare on the CPU device (ResNet-50@64, batch 8, 1 + 3 steps), the loader
(the pixel stage then runs in the workers, as the trainer builds it for a CPU), inference for the demo model
only. Each GPU-only measurement prints a "SKIPPED (no CUDA): ..." line and gets a row saying so; no target is
judged ("n/a"). That is what tests/test_bench_gpu.py runs.

Before the branches of issue 21 that implement run.compile, run.host_sync and data.decode are merged, those
keys exist but change nothing: the variants then all train / decode the default way.

On a lent GPU machine (no network; attrdist not installed; python 3.12 with torch, torchvision, accelerate, timm,
pytest): `bash bench/gpu_wheels.sh` here first fills .whl/ (gitignored, ~9 MB: the wheels of what the image
lacks, DeepSpeed's sdist, the COCO photos), which travels with the working tree (the device tool's
carry=[".whl"]); then, from the repository root there:

    S=/tmp/site; python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \\
        --target $S .whl/*.whl && \\
    DS_BUILD_OPS=0 python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir \\
        --target $S .whl/deepspeed-*.tar.gz && \\
    PYTHONPATH=$S:$PWD ATTRDIST_BENCH_COCO=$PWD/.whl/coco python3 -m bench.gpu; cp bench/results/gpu-*.csv $OUT/

Writes bench/results/gpu-<card>.csv (e.g. gpu-nvidia-h100-80gb-hbm3.csv; gpu-cpu-quick.csv without CUDA): every
row with the card, driver, CUDA, cuDNN, torch and torchvision versions and the cores; the targets table last.
Exit status 1 if a section failed (its error is in the table), else 0.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ET
from dataclasses import dataclass, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import alternate, parser, ratio_stats, save, summarize, target_row  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
VOCAB = ROOT / "recipes" / "coconut_vocab.json"
SECTIONS = ("tests", "train", "input", "inference", "compile")
DALI_A100_IMG_S = 2500  # NVIDIA DALI / DeepLearningExamples ResNet-50 training, AMP, per A100


@dataclass(frozen=True)
class Sizes:
    """What one run measures; `estimate` holds each section's expected seconds (for the budget)."""

    images: int  # train-split JPEGs packed (data)
    batch: int  # training batch (b, e)
    image_size: int  # training image size (b, e); the loader (c) always runs at 224
    warmup: int
    steps: int
    rounds: int
    batches: int  # distinct in-memory batches, cycled (b, e)
    in_batch: int  # loader batch (c)
    in_epochs: int  # epochs per loader pass (c)
    in_rounds: int
    inf_rounds: int
    demo_k: int  # eval batches of the demo model (d)
    full_k: int  # eval batches of the 284-attribute model (d); 0 = left out
    compile_warmup: int
    estimate: dict


GPU = Sizes(images=1024, batch=256, image_size=224, warmup=5, steps=40, rounds=3, batches=2, in_batch=128, in_epochs=8,
            in_rounds=2, inf_rounds=3, demo_k=4, full_k=6, compile_warmup=3,
            estimate={"data": 15, "tests": 120, "train": 80, "input": 40, "inference": 70, "compile": 120})
SMALL = Sizes(images=64, batch=8, image_size=64, warmup=1, steps=3, rounds=1, batches=2, in_batch=16, in_epochs=2,
              in_rounds=1, inf_rounds=1, demo_k=1, full_k=0, compile_warmup=1,
              estimate={"data": 5, "tests": 25, "train": 20, "input": 8, "inference": 25, "compile": 120})


# ----------------------------------------------------------------------------------------- machine facts


def driver_version() -> str:
    """The NVIDIA driver's version: nvidia-smi, else NVML (nvidia-ml-py), else ""."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30).stdout.strip().splitlines()
        if out:
            return out[0].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        import pynvml

        pynvml.nvmlInit()
        v = pynvml.nvmlSystemGetDriverVersion()
        return v.decode() if isinstance(v, bytes) else str(v)
    except Exception:  # no NVML library, no driver: the row says ""
        return ""


def device_facts() -> dict:
    """The card and the stack under it, for every CSV row."""
    import torch
    import torchvision

    from attrdist.train.runtime import available_cores

    f = {"gpu": "none", "torch": torch.__version__, "torchvision": torchvision.__version__,
         "torch_cuda": torch.version.cuda or "", "cores": available_cores()}
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        f.update(gpu=p.name, gpu_memory_gib=round(p.total_memory / 2 ** 30, 1), capability=f"{p.major}.{p.minor}",
                 cudnn=torch.backends.cudnn.version() or "", driver=driver_version())
    return f


def slug(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3'."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "unknown"


def child_env() -> dict:
    """os.environ with the repository root on PYTHONPATH: subprocesses import attrdist, bench and tests from this
    checkout where attrdist is not installed (a lent machine), keeping what PYTHONPATH already had (/tmp/site)."""
    parts = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if str(ROOT) not in parts:
        parts.append(str(ROOT))
    return {**os.environ, "PYTHONPATH": os.pathsep.join(parts), "PYTHONUNBUFFERED": "1",
            "TOKENIZERS_PARALLELISM": "false"}


def sync(device) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def free_device_memory() -> None:
    """Drop the last run's model, optimizer and compiled graphs before the next one (9+ runs in one process)."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------- data


def make_data(tmp: Path, n: int) -> Path:
    """n train + 16 val COCO-like JPEGs, packed (copy-through) by the coconut packer with its vocabulary."""
    from attrdist.pack.coco import SplitSource, pack_coco_captions
    from attrdist.pack.pipeline import default_workers
    from attrdist.pack.vocab import load_vocabulary

    from bench.pack import COCO, make_dataset

    t0 = time.perf_counter()
    train, val = make_dataset(tmp / "train", n, seed=0), make_dataset(tmp / "val", 16, seed=1)
    out = tmp / "shards"
    pack_coco_captions(out, [SplitSource("train", train / "images", train / "captions.json"),
                             SplitSource("val", val / "images", val / "captions.json")],
                       load_vocabulary(VOCAB), dataset="bench-gpu", vocab_path=VOCAB, workers=default_workers(),
                       progress=False, on_leak="warn")
    src = f"cut from the COCO photos in {COCO}" if COCO.is_dir() else "rendered scenes (no COCO photos found)"
    print(f"data: {n} + 16 JPEGs of 640x480 ({src}), packed in {time.perf_counter() - t0:.1f} s", flush=True)
    return out


# ----------------------------------------------------------------------------------------- (a) the cuda tests


def junit_counts(path: Path) -> dict:
    """passed/failed/errors/skipped and the failing tests' ids from pytest's JUnit XML."""
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    c = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    bad = [f"{tc.get('classname', '')}::{tc.get('name', '')}" for s in suites for tc in s.iter("testcase")
           if tc.find("failure") is not None or tc.find("error") is not None]
    return {"passed": c["tests"] - c["failures"] - c["errors"] - c["skipped"], "failed": c["failures"],
            "errors": c["errors"], "skipped": c["skipped"], "failing": bad}


def run_tests(tmp: Path, timeout: float, on_gpu: bool) -> tuple[list[dict], list[dict]]:
    junit = tmp / "cuda-tests.xml"
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "cuda",
           "--continue-on-collection-errors", f"--junitxml={junit}", "tests"]
    print(f"$ {' '.join(cmd[2:])}  (timeout {timeout:.0f} s)", flush=True)
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=timeout)
        rc, out = p.returncode, p.stdout + p.stderr
    except subprocess.TimeoutExpired as e:
        partial = e.stdout or b""
        rc, out = "timeout", partial.decode(errors="replace") if isinstance(partial, bytes) else partial
    took = time.perf_counter() - t0
    tail = "\n".join(out.strip().splitlines()[-25:])
    print(tail, flush=True)
    counts = junit_counts(junit) if junit.is_file() else {"passed": 0, "failed": 0, "errors": 0, "skipped": 0,
                                                          "failing": []}
    if rc == "timeout":
        state = f"timed out after {timeout:.0f} s"
    elif "Unknown marker" in out and "cuda" in out:
        state = "no `cuda` marker registered (the cuda tests are not on this branch)"
    elif rc == 5:
        state = "no test carries the `cuda` marker"
    elif rc in (0, 1):
        state = "ran"
    else:
        state = f"pytest exited {rc}"
    row = {"section": "tests", "what": "pytest -m cuda", "seconds": round(took, 1), "exit": rc, "state": state,
           **{f"tests_{k}": counts[k] for k in ("passed", "failed", "errors", "skipped")},
           "failing": "; ".join(counts["failing"])[:2000]}
    failing = f"; failing: {row['failing']}" if counts["failing"] else ""
    print(f"cuda tests: {state}: {counts['passed']} passed, {counts['failed']} failed, {counts['errors']} errors, "
          f"{counts['skipped']} skipped in {took:.0f} s{failing}", flush=True)
    bad = counts["failed"] + counts["errors"]
    if rc == "timeout":
        verdict = "FAIL (timeout)"
    elif not on_gpu:
        verdict = f"n/a (no CUDA: {counts['skipped']} skipped)"
    elif state != "ran":
        verdict = f"NOT RUN: {state}"
    else:
        verdict = "PASS" if bad == 0 and counts["passed"] > 0 else "FAIL"
    target = {"section": "tests", "benchmark": "gpu", "what": "pytest -m cuda: failed + errors (with >= 1 passed)",
              "target": "<= 0", "median": bad, "spread": f"{counts['passed']} passed, {counts['skipped']} skipped",
              "verdict": verdict, "note": f"{state}; {took:.0f} s"}
    return [row], [target]


# ----------------------------------------------------------------------------------------- (b), (e) train step


def r50_config(shards: Path, device: str, s: Sizes, **run):
    """The coconut full profile with a ResNet-50 classifier (every stage trained, linear head), bf16, batch s.batch."""
    from bench.train_step import load_recipe, with_data

    cfg = load_recipe("coconut").full()
    cfg = replace(cfg, model=replace(cfg.model, name="classifier", backbone="resnet50", frozen_stages=0, head_dims=()),
                  run=replace(cfg.run, precision="bf16", threads=0 if device == "cuda" else 1, **run))
    extra = {} if s.image_size == 224 else {"image_size": s.image_size, "eval_resize": 1.0}
    return with_data(cfg, shards, device, batch_size=s.batch, **extra)


def device_batches(cfg, k: int) -> tuple[list[dict], list[dict], list[str]]:
    """(batches on the run's device, the same on the CPU, attribute names): k batches of the trainer's epoch-0
    plan, decoded and augmented once by SampleDataset (bench.train_step.collect_batches), float, channels_last."""
    import torch

    from attrdist.data.reader import ShardReader, load_manifest
    from attrdist.data.samples import SampleDataset
    from attrdist.train.runtime import choose_device

    from bench.train_step import collect_batches, label_fields

    manifest = load_manifest(cfg.data.shards)
    reader = ShardReader(manifest, cfg.data.train_split)
    ds = SampleDataset(reader, len(manifest.attributes), label_fields(cfg), cfg.data, cfg.run.seed, train=True)
    cpu = collect_batches(ds, len(reader), cfg, k=k)
    dev = torch.device(choose_device(cfg.run.device))
    on_dev = [{key: (v.to(dev).contiguous(memory_format=torch.channels_last) if key == "image" else v.to(dev))
               if isinstance(v, torch.Tensor) else v for key, v in b.items()} for b in cpu]
    sync(dev)
    return on_dev, cpu, list(manifest.attributes)


class ClockedLoader:
    """The BenchTrainer's in-memory batches, with a synchronised clock read when the loop asks for batch i, for
    each i in `at`: torch.cuda.synchronize() (all earlier steps' work done), then time.perf_counter()."""

    def __init__(self, inner, at: tuple[int, ...], clocks: list, device):
        self.inner, self.at, self.clocks, self.device = inner, at, clocks, device

    def __len__(self) -> int:
        return len(self.inner)

    def __iter__(self):
        for i, b in enumerate(self.inner):
            if i in self.at:
                sync(self.device)
                self.clocks.append(time.perf_counter())
            yield b


def clocked_trainer_class():
    """bench.train_step's BenchTrainer (the real Trainer fed in-memory batches) whose training loader is a
    ClockedLoader: the timed region is bounded by device synchronisations outside the Trainer's own code, so
    it is the same region for run.host_sync=step and =lagged (whose step records are stamped before the
    device has finished)."""
    from bench.train_step import bench_trainer_class

    class ClockedTrainer(bench_trainer_class()):
        def __init__(self, cfg, recipe: str, batches: list[dict], clock_at: tuple[int, int]):
            super().__init__(cfg, recipe, batches=batches)
            self.clock_at, self.clocks = clock_at, []

        def loader(self, ds, plan):
            inner = super().loader(ds, plan)
            if ds is not self.train_ds:
                return inner
            return ClockedLoader(inner, self.clock_at, self.clocks, self.acc.device)

    return ClockedTrainer


_RUN_IDS = iter(range(10 ** 6))


def trainer_run(cfg, batches, warmup: int, steps: int, tmp: Path, tag: str, info: dict) -> float:
    """One Trainer run in this process: `warmup` steps, `steps` timed, one more (untimed: its request for a batch
    ends the clock). Returns the timed seconds; fills `info`."""
    import torch

    from bench.train_step import reset_accelerate, train_records

    run_dir = tmp / f"{tag}-{next(_RUN_IDS)}"
    cfg = replace(cfg, run=replace(cfg.run, run_dir=str(run_dir), max_steps=warmup + steps + 1))
    reset_accelerate()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    log_path = tmp / f"{run_dir.name}.log"
    try:
        with open(log_path, "w") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
            tr = clocked_trainer_class()(cfg, f"bench-gpu-{tag}", batches=batches, clock_at=(warmup, warmup + steps))
            t0 = time.perf_counter()
            tr.train()
    except Exception as e:
        raise RuntimeError(f"trainer run {tag} failed ({e}); its log {log_path}:\n"
                           f"{log_path.read_text()[-3000:]}") from e
    finally:
        logging.getLogger("attrdist").handlers.clear()  # its stdout handler wrote to the closed log file
    if len(tr.clocks) != 2:
        raise RuntimeError(f"trainer run {tag}: the loop asked for {len(tr.clocks)} of the 2 clocked batches")
    recs = train_records(run_dir)
    info.setdefault("first_loss", []).append(recs[0]["loss"])
    info.setdefault("trainer_img_s", []).append(statistics.median(r["img_per_s"] for r in recs[warmup:warmup + steps]))
    info.setdefault("warmup_s", []).append(tr.clocks[0] - t0)
    if torch.cuda.is_available():
        info.setdefault("peak_gib", []).append(torch.cuda.max_memory_allocated() / 2 ** 30)
    info.update(precision=tr.rt.mixed_precision, threads=tr.rt.threads, channels_last=cfg.model.channels_last,
                host_sync=cfg.run.host_sync, compile=cfg.run.compile)
    seconds = tr.clocks[1] - tr.clocks[0]
    del tr
    if cfg.run.compile:
        torch._dynamo.reset()  # the compiled graphs hold the model
    free_device_memory()
    return seconds


def bare_run(cfg, batches, names, warmup: int, steps: int, info: dict, compile_model: bool = False) -> float:
    import torch

    from bench.train_step import bare_loop

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    seconds = bare_loop(cfg, batches, names, warmup, steps, precision="bf16", threads=cfg.run.threads, info=info,
                        compile_model=compile_model)
    if torch.cuda.is_available():
        info.setdefault("peak_gib", []).append(torch.cuda.max_memory_allocated() / 2 ** 30)
    if compile_model:
        torch._dynamo.reset()  # the compiled graphs hold the model
    free_device_memory()
    return seconds


def step_row(section: str, what: str, times: list[float], images: int, info: dict, common: dict) -> dict:
    row = {"section": section, "what": what, **summarize(times, images), "images_per_round": images, **common}
    for k in ("precision", "threads", "channels_last", "host_sync", "compile"):
        if k in info:
            row[k] = info[k]
    if info.get("first_loss"):
        row["step1_loss"] = round(info["first_loss"][0], 6)
    if info.get("trainer_img_s"):
        row["trainer_logged_img_s"] = round(statistics.median(info["trainer_img_s"]), 1)
    if info.get("warmup_s"):
        row["warmup_s"] = round(statistics.median(info["warmup_s"]), 2)
    if info.get("peak_gib"):
        row["peak_gib"] = round(max(info["peak_gib"]), 2)
    return row


def same_loss(a: dict, b: dict, tol: float = 2e-3) -> tuple[bool, str]:
    """Whether two runs' step-1 losses agree within `tol` (relative): the same model on the same batch. bf16 kernels
    may differ in their last bits between runs; inductor's fused bf16 kernels differ from eager ones by more
    (measured on the CPU: 0.7 % between a compiled and an eager ResNet-18's step-1 loss), hence a wider `tol`
    wherever one side may be compiled and the other not."""
    la, lb = a["first_loss"][0], b["first_loss"][0]
    ok = abs(la - lb) <= tol * max(1.0, abs(lb))
    return ok, f"step-1 loss {la:.5f} vs bare {lb:.5f}{'' if ok else ' (DIFFERENT: not the same work?)'}"


def run_train(shards: Path, device: str, s: Sizes, tmp: Path, out: dict) -> tuple[list[dict], list[dict]]:
    from bench.train_step import count_flops, matmul_ceiling
    from attrdist.train.runtime import available_cores

    cfg = r50_config(shards, device, s)
    batches, cpu_batches, names = device_batches(cfg, s.batches)
    images = s.steps * s.batch
    info = {k: {} for k in ("step", "lagged", "bare")}
    cfgs = {k: replace(cfg, run=replace(cfg.run, host_sync=k)) for k in ("step", "lagged")}
    t = alternate({
        "step": lambda: trainer_run(cfgs["step"], batches, s.warmup, s.steps, tmp, "step", info["step"]),
        "lagged": lambda: trainer_run(cfgs["lagged"], batches, s.warmup, s.steps, tmp, "lagged", info["lagged"]),
        "bare": lambda: bare_run(cfg, batches, names, s.warmup, s.steps, info["bare"]),
    }, s.rounds)
    label = f"ResNet-50@{cfg.data.image_size} b{s.batch} bf16 channels_last"
    common = {"model": label, "image_size": cfg.data.image_size, "batch": s.batch, "warmup_steps": s.warmup,
              "timed_steps": s.steps, "device": device}
    rows = [step_row("train", f"{label}: attrdist Trainer, run.host_sync=step", t["step"], images, info["step"],
                     common),
            step_row("train", f"{label}: attrdist Trainer, run.host_sync=lagged", t["lagged"], images, info["lagged"],
                     common),
            step_row("train", f"{label}: bare loop", t["bare"], images, info["bare"], common)]
    _, loss_note = same_loss(info["lagged"], info["bare"])
    ok_step, _ = same_loss(info["step"], info["bare"])
    if not ok_step:
        loss_note += f"; host_sync=step's step-1 loss {info['step']['first_loss'][0]:.5f} DIFFERS"
    lagged_img_s = images / statistics.median(t["lagged"])
    out["train_img_s"] = lagged_img_s
    out["step_s"] = statistics.median(t["lagged"]) / s.steps
    out["eager_img_s"] = lagged_img_s
    targets = [
        target_row("train", f"{label}: Trainer (run.host_sync=lagged, CUDA's default) / bare loop, images/s",
                   *ratio_stats(t["bare"], t["lagged"]), ">=", 0.95, note=loss_note),
        target_row("train", f"{label}: host sync: Trainer (lagged) within ~1 % of the bare loop",
                   *ratio_stats(t["bare"], t["lagged"]), ">=", 0.99),
    ]
    m, lo, hi = ratio_stats(t["lagged"], t["step"])
    targets.append({"section": "train", "what": f"{label}: Trainer run.host_sync=step / lagged, images/s (the cost "
                    "of reading the flags every step)", "target": "", "median": round(m, 3),
                    "spread": f"{lo:.3f}-{hi:.3f}",
                    "verdict": "stated", "note": f"step {images / statistics.median(t['step']):,.0f} vs lagged "
                    f"{lagged_img_s:,.0f} img/s"})
    threads = available_cores()
    flops = count_flops(cfg, cpu_batches[0], names)
    n = 8192 if device == "cuda" else 1024
    ceiling = matmul_ceiling(device, threads, n, "bf16")
    achieved = flops["train_gflop_per_img"] * lagged_img_s
    rows.append({"section": "train", "what": f"matmul {n}^2 bf16 GFLOP/s", "gflop_s": round(ceiling, 1),
                 "device": device})
    targets.append({"section": "train", "what": f"{label}: achieved train FLOP/s / bf16 matmul {n}^2", "target": "",
                    "median": round(achieved / ceiling, 3), "spread": "", "verdict": "stated",
                    "note": f"{achieved / 1e3:,.2f} of {ceiling / 1e3:,.2f} TFLOP/s; "
                            f"{flops['train_gflop_per_img']:.2f} GFLOP/img counted (forward + backward)"})
    targets.append({"section": "train", "what": f"{label}: Trainer images/s / DALI's ResNet-50 A100 AMP anchor "
                    f"({DALI_A100_IMG_S:,} img/s)", "target": "", "median": round(lagged_img_s / DALI_A100_IMG_S, 3),
                    "spread": "", "verdict": "stated", "note": f"{lagged_img_s:,.0f} img/s on {device}"})
    return rows, targets


def run_compile(shards: Path, device: str, s: Sizes, tmp: Path, out: dict) -> tuple[list[dict], list[dict]]:
    cfg = r50_config(shards, device, s, compile=True, host_sync="lagged")
    batches, _, names = device_batches(cfg, s.batches)
    images = s.steps * s.batch
    info = {"trainer": {}, "bare": {}}
    t = alternate({
        "trainer": lambda: trainer_run(cfg, batches, s.compile_warmup, s.steps, tmp, "compile", info["trainer"]),
        "bare": lambda: bare_run(cfg, batches, names, s.compile_warmup, s.steps, info["bare"], compile_model=True),
    }, 1)
    label = f"ResNet-50@{cfg.data.image_size} b{s.batch} bf16 channels_last, torch.compile"
    common = {"model": label, "image_size": cfg.data.image_size, "batch": s.batch, "warmup_steps": s.compile_warmup,
              "timed_steps": s.steps, "device": device}
    rows = [step_row("compile", f"{label}: attrdist Trainer, run.compile=true", t["trainer"], images, info["trainer"],
                     common),
            step_row("compile", f"{label}: bare loop, torch.compile(model)", t["bare"], images, info["bare"], common)]
    _, loss_note = same_loss(info["trainer"], info["bare"], tol=2e-2)
    compiled = images / t["trainer"][0]
    warm = (f"; warm-up (compile) {info['trainer']['warmup_s'][0]:.0f} s in the Trainer, "
            f"{info['bare']['warmup_s'][0]:.0f} s bare")
    targets = [target_row("compile", f"{label}: Trainer (run.compile=true) / bare loop (compiled), images/s",
                          *ratio_stats(t["bare"], t["trainer"]), ">=", 0.95, note=loss_note + warm)]
    if out.get("eager_img_s"):
        targets.append({"section": "compile", "what": "ResNet-50 Trainer: run.compile=true / eager (section train), "
                        "images/s", "target": "", "median": round(compiled / out["eager_img_s"], 3), "spread": "",
                        "verdict": "stated", "note": f"{compiled:,.0f} vs {out['eager_img_s']:,.0f} img/s"})
    return rows, targets


# ----------------------------------------------------------------------------------------- (c) input


class Epochs:
    """The batch plans of epochs 0..n-1 as one batch sampler: one loader (its workers start once) over several
    epochs, each with its own order and augmentation keys, so a pass measures the loader's steady rate."""

    def __init__(self, n: int, batch: int, seed: int, epochs: int):
        from attrdist.core.order import BatchPlan

        self.plans = [BatchPlan(n, batch, 1, 0, seed, e, shuffle=True, drop_last=True) for e in range(epochs)]

    def __len__(self) -> int:
        return sum(len(p) for p in self.plans)

    def __iter__(self):
        for p in self.plans:
            yield from p


def input_pass(task, reader, cfg, device, workers: int, epochs: int, info: dict) -> float:
    """One loader pass as the trainer builds it, every batch through batch_images on `device`; returns the steady
    seconds and fills `info` (images counted over the same span in info["steady_images"]).

    Steady rate: each worker collates whole batches and all start together, so batches arrive in waves of
    `workers` (batch i comes from worker i mod workers, in order). The span runs from the arrival of the first
    wave's last batch to the end of the pass (synchronised): whole waves only, worker start-up and the first
    wave's head start excluded. (From the first batch on, a pass of 2 waves would count twice the rate.)"""
    import torch

    from attrdist.data.loader import make_loader
    from attrdist.data.samples import batch_images, worker_image_dtype

    dev = torch.device(device)
    cuda = dev.type == "cuda"
    ds = task.dataset(reader, train=True, pixels_in_workers=not cuda,  # data.pixel_stage=auto, as the Trainer
                      image_dtype=worker_image_dtype(cfg.data.worker_dtype, "bf16"))
    B = cfg.data.batch_size
    plan = Epochs(len(reader), B, cfg.run.seed, epochs)
    if len(plan) < 2 * workers:
        raise RuntimeError(f"input: {len(plan)} batches for {workers} workers: a pass needs 2 waves or more")
    loader = make_loader(ds, plan, workers, pin_memory=cuda, malloc=cfg.run.malloc, collate_fn=task.collate)
    events, arrivals, counts, host = [], [], [], 0.0
    size = cfg.data.image_size
    sync(dev)
    t0 = time.perf_counter()
    for batch in loader:
        arrivals.append(time.perf_counter())
        if cuda:
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            e0.record()
        h0 = time.perf_counter()
        x = batch_images(batch, dev, torch.channels_last, cfg.data)
        host += time.perf_counter() - h0
        if cuda:
            e1.record()
            events.append((e0, e1))
        if tuple(x.shape) != (B, 3, size, size) or not x.is_floating_point() or x.device.type != dev.type:
            raise RuntimeError(f"batch_images gave {tuple(x.shape)} {x.dtype} on {x.device}, expected ({B}, 3, {size}, "
                               f"{size}) float on {dev}")
        counts.append(int(batch["valid"].sum()))  # a corrupt sample is a blank (fast) image: count only real ones
    sync(dev)
    end = time.perf_counter()
    if sum(counts) != len(plan) * B:
        raise RuntimeError(f"input: the loader delivered {sum(counts)} images, expected {len(plan) * B}")
    info.setdefault("first_s", []).append(arrivals[0] - t0)
    info.setdefault("total_s", []).append(end - t0)
    info["steady_images"] = sum(counts[workers:])
    info["images"] = sum(counts)
    info.setdefault("host_ms_per_batch", []).append(1e3 * host / len(counts))
    if events:
        info.setdefault("device_ms_per_batch", []).append(sum(a.elapsed_time(b) for a, b in events) / len(events))
    return end - arrivals[workers - 1]


def run_input(shards: Path, device: str, s: Sizes, on_gpu: bool, out: dict,
              skipped: list) -> tuple[list[dict], list[dict]]:
    from attrdist.data.reader import ShardReader, load_manifest
    from attrdist.tasks import make_task
    from attrdist.train.runtime import available_cores

    from bench.train_step import load_recipe

    full = load_recipe("coconut").full()
    cores = available_cores()
    base = replace(full, data=replace(full.data, shards=str(shards), batch_size=s.in_batch, num_workers=cores),
                   run=replace(full.run, device=device))
    manifest = load_manifest(base.data.shards)
    reader = ShardReader(manifest, base.data.train_split)
    variants = {"workers": ("workers", cores)}
    if on_gpu:
        variants.update({"device": ("device", cores), "device_quarter": ("device", max(1, cores // 4))})
    else:
        skip(skipped, "no CUDA", "input", "data.decode=device (nvJPEG decode + crop/flip on the device), with all "
             "cores and a quarter of them as workers")
    info = {k: {} for k in variants}
    fns = {}
    for k, (decode, workers) in variants.items():
        cfg = replace(base, data=replace(base.data, decode=decode))
        task = make_task(cfg, manifest)
        fns[k] = (lambda cfg=cfg, task=task, workers=workers, k=k:
                  input_pass(task, reader, cfg, device, workers, s.in_epochs, info[k]))
    t = alternate(fns, s.in_rounds)
    rows, targets = [], []
    train_img_s = out.get("train_img_s")
    for k, (decode, workers) in variants.items():
        i = info[k]
        rate = i["steady_images"] / statistics.median(t[k])
        row = {"section": "input", "what": f"shard loader -> batch_images on {device}, data.decode={decode}, "
               f"{workers} workers", **summarize(t[k], i["steady_images"]), "images_per_round": i["images"],
               "first_batch_s": round(statistics.median(i["first_s"]), 2),
               "with_startup_img_s": round(i["images"] / statistics.median(i["total_s"]), 1), "workers": workers,
               "batch": s.in_batch, "image_size": 224, "epochs": s.in_epochs, "device": device, "decode": decode}
        row["host_ms_per_batch"] = round(statistics.median(i["host_ms_per_batch"]), 2)
        if i.get("device_ms_per_batch"):
            ms = statistics.median(i["device_ms_per_batch"])
            row["device_ms_per_batch"] = round(ms, 2)
            if out.get("step_s"):
                row["device_ms_per_batch_vs_step"] = round(ms / 1e3 / (out["step_s"] * s.in_batch / s.batch), 3)
        rows.append(row)
        if train_img_s:
            lo = min(i["steady_images"] / x for x in t[k]) / train_img_s
            hi = max(i["steady_images"] / x for x in t[k]) / train_img_s
            note = f"{rate:,.0f} vs {train_img_s:,.0f} img/s (the Trainer's, section train)"
            if row.get("device_ms_per_batch"):
                note += (f"; batch_images per batch of {s.in_batch}: {row['device_ms_per_batch']:.1f} ms on the "
                         f"device's timeline, {row['host_ms_per_batch']:.1f} ms of the training process's time")
            targets.append(target_row("input", f"data.decode={decode}, {workers} workers: loader images/s / Trainer "
                                      "images/s", rate / train_img_s, lo, hi, ">=", 1.0, note=note))
    if not train_img_s:
        print("input: no training rate to compare with (section train did not run)", flush=True)
    return rows, targets


# ----------------------------------------------------------------------------------------- (d) inference


def run_inference(device: str, s: Sizes, tmp: Path) -> tuple[list[dict], list[dict]]:
    from bench.inference import measure, print_tables

    level = logging.getLogger("attrdist").level
    logging.getLogger("attrdist").setLevel(logging.WARNING)
    try:
        rows, targets, notes = measure(device, s.inf_rounds, s.demo_k, s.full_k, tmp)
    finally:
        logging.getLogger("attrdist").setLevel(level)
    if not s.full_k:
        print("inference: small sizes: the 284-attribute ResNet-50@224 model is left out", flush=True)
    print_tables(rows, notes)
    for r in [*rows, *targets]:
        r["section"] = "inference"
    free_device_memory()
    return rows, targets


# ----------------------------------------------------------------------------------------- driver


def skip(skipped: list, why: str, section: str, what: str) -> None:
    line = f"SKIPPED ({why}): {section}: {what}"
    print(line, flush=True)
    skipped.append({"section": section, "what": what, "skipped": why})


def main(argv: list[str] | None = None) -> list[dict]:
    ap = parser(__doc__, rounds=None, quick="small sizes on any device (without CUDA these are always used)")
    ap.add_argument("--budget-s", type=float, default=480.0,
                    help="start no section whose estimate would end it past this many seconds (default 480)")
    ap.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
    args = ap.parse_args(argv)
    todo = [x.strip() for x in args.sections.split(",") if x.strip()]
    if bad := [x for x in todo if x not in SECTIONS]:
        ap.error(f"--sections: unknown {', '.join(bad)}; choose from {', '.join(SECTIONS)}")
    t_start = time.perf_counter()
    os.environ["PYTHONPATH"] = child_env()["PYTHONPATH"]  # every subprocess (attrdist predict, pytest) finds attrdist
    import torch

    from attrdist.malloc import tune_malloc

    tune_malloc("keep")  # the Trainer's process allocator, for the bare loop in this process too (bench.train_step)
    on_gpu = torch.cuda.is_available()
    device = "cuda" if on_gpu else "cpu"
    small = args.quick or not on_gpu
    s = SMALL if small else GPU
    facts = device_facts()
    print(f"bench.gpu: {facts['gpu']} (driver {facts.get('driver', '-')}, torch's CUDA {facts['torch_cuda'] or '-'}), "
          f"torch {facts['torch']}, {facts['cores']} cores; {'small' if small else 'full'} sizes; "
          f"budget {args.budget_s:.0f} s",
          flush=True)
    if not on_gpu:
        print("no CUDA device: each section runs its CPU-side part at small sizes on the CPU; every GPU-only "
              "measurement is SKIPPED (no CUDA) below, and no target is judged", flush=True)
    rows, targets, skipped, failed = [], [], [], []
    out: dict = {}
    order = [x for x in SECTIONS if x in todo]
    with tempfile.TemporaryDirectory(prefix="attrdist-bench-gpu-") as tmp_s:
        tmp = Path(tmp_s)
        os.environ["ATTRDIST_CACHE"] = str(tmp / "cache")  # nothing touches the user's cache (as bench.inference)
        shards = None
        for i, name in enumerate(order):
            elapsed = time.perf_counter() - t_start
            need = s.estimate[name] + (s.estimate["data"] if name in ("train", "input", "compile") and shards is None
                                       else 0)
            if name == "compile" and not on_gpu:
                skip(skipped, "no CUDA", "compile", "run.compile=true vs torch.compile'd bare loop (inductor on "
                     "the CPU cores would compile ResNet-50 for minutes)")
                continue
            if elapsed + need > args.budget_s:
                skip(skipped, "budget", name, f"needs ~{need} s, {args.budget_s - elapsed:.0f} s of --budget-s "
                     f"{args.budget_s:.0f} left")
                continue
            if name == "tests" and not on_gpu:
                skip(skipped, "no CUDA", "tests", "the cuda tests on a device (pytest -m cuda runs: without CUDA they "
                     "skip themselves)")
            if name == "train" and not on_gpu:
                skip(skipped, "no CUDA", "train", "ResNet-50@224 batch 256 on a GPU, host_sync step vs lagged on a "
                     "device (runs instead: ResNet-50@64 batch 8 on the CPU, the same code)")
            if name == "inference" and not on_gpu:
                skip(skipped, "no CUDA", "inference", "inference on a GPU (runs instead: the demo model on the CPU)")
            print(f"\n=== {name} ({elapsed:.0f} s elapsed) ===", flush=True)
            t1 = time.perf_counter()
            try:
                if name in ("train", "input", "compile") and shards is None:
                    shards = make_data(tmp / "data", s.images)
                if name == "tests":
                    later = sum(s.estimate[x] for x in order[i + 1:] if x != "compile")
                    later += s.estimate["data"] if {"train", "input"} & set(order[i + 1:]) else 0
                    timeout = max(60.0, min(300.0, args.budget_s - elapsed - later))
                    r, tg = run_tests(tmp, timeout, on_gpu)
                elif name == "train":
                    r, tg = run_train(shards, device, s, tmp, out)
                elif name == "input":
                    r, tg = run_input(shards, device, s, on_gpu, out, skipped)
                elif name == "inference":
                    r, tg = run_inference(device, s, tmp / "inference")
                else:
                    r, tg = run_compile(shards, device, s, tmp, out)
            except (Exception, SystemExit) as e:  # bench.inference stops with SystemExit: the next section still runs
                traceback.print_exc()
                msg = " ".join(str(e).split())[:300]
                print(f"FAILED: {name}: {type(e).__name__}: {msg}", flush=True)
                failed.append(name)
                r, tg = [], [{"section": name, "what": f"section {name}", "target": "", "median": 0, "spread": "",
                              "verdict": "ERROR", "note": f"{type(e).__name__}: {msg}"}]
                free_device_memory()
            for x in tg:
                x.setdefault("benchmark", "gpu")
                x.setdefault("section", name)
                if not on_gpu and x["verdict"] in ("PASS", "FALLS SHORT"):
                    x["verdict"] = "n/a (no CUDA: code path only)"
                elif small and x["verdict"] in ("PASS", "FALLS SHORT"):
                    x["verdict"] = "n/a (--quick)"
            rows += r
            targets += tg
            print(f"=== {name}: {time.perf_counter() - t1:.0f} s ===", flush=True)
    took = time.perf_counter() - t_start
    rows = [{**r, "benchmark": r.get("benchmark", "gpu")} for r in [*rows, *skipped]]
    rows = [{**facts, **r} for r in rows]
    targets = [{**facts, **t} for t in targets]
    if skipped:
        print("\nskipped:\n" + "\n".join(f"  {x['section']}: {x['what']} ({x['skipped']})" for x in skipped))
    name = f"gpu-{slug(facts['gpu']) if on_gpu else 'cpu'}"
    failures = f"; FAILED: {', '.join(failed)}" if failed else ""
    return save(name, rows, targets, quick=small, note=f"(total {took:.0f} s{failures})")


if __name__ == "__main__":
    sys.exit(1 if any(t.get("verdict") == "ERROR" for t in main()) else 0)
