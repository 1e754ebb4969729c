"""Train-step benchmarks: trainer overhead, the default fast path, and 2-rank scaling (issue items 2, 3, 4; 8 on GPU).

    .venv/bin/python -m bench.train_step                       # all three, CPU (~6-8 min on 2 idle cores)
    .venv/bin/python -m bench.train_step --only overhead       # item 2
    .venv/bin/python -m bench.train_step --only fastpath       # item 3 (+ --recipe cocottributes: all-trainable ResNet-50)
    .venv/bin/python -m bench.train_step --only scaling        # item 4 (launches real processes)
    .venv/bin/python -m bench.train_step --rounds 5            # more rounds (default 3)
    .venv/bin/python -m bench.train_step --quick               # smoke run: tiny steps, 1 round, ResNet-50 at 96 px
    .venv/bin/python -m bench.train_step --device cuda         # item 8: the same on a GPU (skipped without CUDA)

Data: a small demo dataset (128 train images, procedural scenes) generated and packed by the real COCO packer
into a temporary directory. Every run trains on K <= 4 distinct batches decoded, augmented and collated ONCE
by attrdist's own SampleDataset + collate (the exact batches of the trainer's batch plan for epoch 0), held in
memory and cycled: no decode, no DataLoader, no worker in any timed region. attrdist and the bare loop of one
comparison use the same batch objects.

What runs, and exactly what is timed
------------------------------------
attrdist (all items): the real `attrdist.train.trainer.Trainer`, built from a real `Config` (the recipe's, with the
overrides listed per item), subclassed here (`BenchTrainer`) in four places that are all OUTSIDE the timed
region: `loader` yields the in-memory batches; `evaluate` returns a stub (no eval pass), `save` writes
no checkpoint, `finish` skips the final report, and `plot_curves` is a no-op in this process. The loop sizes
(n_train, batches/epoch, steps/epoch, total steps) are set so that run.max_steps = warmup + timed steps all
fall in epoch 0 (the real shards have only 4 batches). `train()` runs unchanged. Timed region = the
trainer's own per-step records in metrics.jsonl: "time" is stamped at the end of each optimizer step (after
its loss/flags all-reduce and .item()); seconds = time[last step] - time[last warm-up step]. So the region
holds, for each timed step, everything train() does per step: fetching the batch, lr schedule + setting it,
torch.manual_seed (dropout key), accelerate's accumulate context, forward_loss (.to(device), channels_last
copy of the input, autocast forward, task loss), acc.backward, acc.clip_grad_norm_, optimizer.step,
zero_grad, the flags tensor + .item() + all-reduce (N ranks), metrics.jsonl + TensorBoard record of the
previous step, and the log line every run.log_every steps. Model build, accelerate setup, warm-up steps and
everything after the last step are outside.

bare (items 2, 3): a plain PyTorch loop in this process. Same model construction (torch.manual_seed(run.seed);
attrdist.models.build_model(cfg.model) -> .to(channels_last)), same optimizer (attrdist's build_optimizer:
same param groups, AdamW/Adam/SGD), same loss (the task's loss, attrdist.tasks -> attrdist.core.losses), same
gradient clipping (torch.nn.utils.clip_grad_norm_ when optim.clip_grad_norm > 0), same threads, same batches.
Timed region = the timed steps only: per step, x = batch image .to(device) -> .contiguous(channels_last),
`torch.autocast(bf16)` forward, loss, backward, clip, optimizer.step, zero_grad(set_to_none); clocks read
after the warm-up steps and after the last step (torch.cuda.synchronize at both ends on CUDA). The warm-up
steps re-seed torch's RNG exactly as the trainer does, so step 1's loss must equal attrdist's step-1 loss
(printed: evidence that both do the same work on the same batches).

Targets use the timed regions above (mean throughput over the timed steps, median over rounds of the
per-round ratio). Each target's note also gives the per-step medians (attrdist's logged img_per_s, the bare
loop's own per-step clock on CPU): robust to a multi-second stall from a noisy neighbour, which on these
shared 2-core machines can wreck a short window.

Items
-----
2 overhead   attrdist vs bare, 1 process, batch 32 @ 64 px, precision as the recipe resolves it (bf16 autocast
             on CPUs with AVX512_BF16), channels_last, for (a) ResNet-18@64: the coconut demo config with
             model.name=classifier model.backbone=resnet18 (timm ResNet-18 + linear head, multi-label BCE on the
             demo labels), (b) the coconut demo model (cross_modal: ResNet-18 trunk to stage 3, 8-head attribute
             attention, BCE + contrastive). 3 warm-up + 30 timed steps per run. Target: attrdist >= 0.97x bare.
3 fastpath   recipes/<recipe>.py full() (default coconut: cross_modal ResNet-50, frozen_stages=3, 224 px) with
             ONLY data.batch_size=32 (recipe: 8), model.pretrained='' (offline) and the demo shards overridden:
             precision, channels_last and threads are the recipe's defaults (the resolved values are reported).
             Against the best bare configuration: the same model, channels_last + bf16 autocast. 2 warm-up + 6
             timed steps. Target: >= 0.9x. Also: model FLOPs counted with torch.utils.flop_counter.FlopCounterMode
             over one real training step (forward + loss + backward, so frozen stages count as they run; the
             optimizer's elementwise work is not counted; '3x forward' is shown beside it), achieved FLOP/s =
             counted FLOPs/img x img/s, against the bf16 matmul ceiling measured in the same run (2048^2, same
             threads, median of 5; 8192^2 on CUDA).
4 scaling    attrdist through the real launcher, ResNet-18@64 (as in 2a), global batch 32, 3 warm-up + 20 timed
             steps: `python -m launch local bench/train_step.py --nproc 2 --device cpu --worker=SPEC` (2 gloo
             DDP ranks with the default run.shm_allreduce=auto, i.e. shared memory here, run.threads=1, 16 images
             per rank) vs `... --nproc 1 ...` (1 process, run.threads=2 =
             the same 2 cores), alternating. Target: DDP >= 0.85x single process (issue: a bare loop measured 0.89).
             Then `--nproc 2 --deepspeed zero2` in the same rotation: its throughput vs DDP is the stated
             DeepSpeed overhead (no target). Process start-up is outside the timed region (metrics.jsonl of
             rank 0, as above). Reference in the same rotation, so the target can be read against this machine:
             the bare loop (as in 2, with the per-rank loss mean of plain DDP) in fresh processes,
             `python bench/train_step.py --bare-worker=SPEC` (1 process, 2 threads) and `python -m
             torch.distributed.run --nproc_per_node 2 bench/train_step.py --bare-worker=SPEC` (gloo, torch's
             DistributedDataParallel, OMP_NUM_THREADS=1 and 1 thread per rank); timed on rank 0 from a barrier
             after the warm-up steps to the end of the last step. Also reported: attrdist DDP / bare DDP.
8 (GPU)      --device cuda: items 2 and 3 on the GPU (run.device=cuda; bare syncs the device); item 4 needs 2
             GPUs. Without CUDA: a message, and nothing runs.

Writes bench/results/train_step.csv (train_step-quick.csv with --quick; train_step-cuda.csv on GPU), prints the
target table and the img/s table.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import alternate, parser, ratio_stats, save, summarize, target_row  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
VOCAB = ROOT / "recipes" / "coconut_demo_vocab.json"
MAX_BATCHES = 4  # distinct in-memory batches, cycled


# ----------------------------------------------------------------------------------------- data + configs


def make_shards(tmp: Path) -> Path:
    """A small demo dataset (COCO formats) packed by the real COCO packer: 128 train, 16 val, 16 test."""
    from attrdist.pack.coco import SplitSource, pack_coco_captions
    from attrdist.demo.scenes import DemoSpec, ensure_demo
    from attrdist.pack.vocab import load_vocabulary

    root = ensure_demo(tmp / "demo", DemoSpec(seed=0, n_train=128, n_val=16, n_test=16), progress=False)
    out, ann = tmp / "shards", root / "annotations"
    splits = [SplitSource(s, root / "images", ann / f"captions_{s}.json", ann / f"instances_{s}.json")
              for s in ("train", "val", "test")]
    pack_coco_captions(out, splits, load_vocabulary(VOCAB), dataset="bench-demo", vocab_path=VOCAB, progress=False)
    return out


def load_recipe(name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"_bench_recipe_{name}", ROOT / "recipes" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def with_data(cfg, shards: Path, device: str, **data):
    from attrdist.core.config import validate

    # data.order=permutation: the in-memory batches are the BatchPlan's (collect_batches), and the BenchTrainer's
    # stretched epoch (more batches than the 128 demo samples hold) needs the plan that does not read the shards
    data = {"order": "permutation", **data}
    cfg = replace(cfg, data=replace(cfg.data, shards=str(shards), num_workers=0, **data),
                  model=replace(cfg.model, pretrained=""), run=replace(cfg.run, device=device))
    validate(cfg)
    return cfg


def coconut_demo(shards: Path, device: str):
    return with_data(load_recipe("coconut").demo(), shards, device)


def resnet18_64(shards: Path, device: str):
    """ResNet-18@64: the coconut demo config with a timm ResNet-18 classifier (multi-label BCE head)."""
    cfg = load_recipe("coconut").demo()
    cfg = replace(cfg, model=replace(cfg.model, name="classifier", backbone="resnet18", frozen_stages=0, head_dims=()))
    return with_data(cfg, shards, device)


def recipe_full(name: str, shards: Path, device: str, batch: int, image_size: int | None = None):
    """The recipe's full() profile: only batch, image size (--quick), data and offline weights overridden."""
    cfg = load_recipe(name).full()
    extra = {"image_size": image_size, "eval_resize": 1.0} if image_size else {}
    return with_data(cfg, shards, device, batch_size=batch, **extra)


def label_fields(cfg) -> list[str]:
    d = cfg.data
    return [d.labels, *[f for f in d.eval_labels if f != d.labels]]


def collect_batches(ds, n: int, cfg, world: int = 1, rank: int = 0, k: int = MAX_BATCHES) -> list[dict]:
    """The first k batches (this rank's slice) of the trainer's epoch-0 batch plan, decoded, collated and
    augmented once (both halves: the workers' uint8 geometry and the device's pixel-wise stage), so the
    trainer and the bare loop get the same float batches from memory."""
    from attrdist.core.order import BatchPlan
    from attrdist.data.samples import batch_images, collate

    B = cfg.data.batch_size
    k = max(1, min(k, n // B))
    plan = BatchPlan(n, B, world, rank, cfg.run.seed, 0, shuffle=True, drop_last=True)
    out = []
    for idx in itertools.islice(iter(plan), k):
        b = collate([ds[item] for item in idx])
        b["image"] = batch_images(b, "cpu")  # float: Trainer.images passes a finished batch through
        out.append({k: v for k, v in b.items() if k not in ("colour", "erase")})
    return out


def standalone_batches(cfg) -> tuple[list[dict], list[str]]:
    """(in-memory batches, attribute names) built exactly as the Trainer's train dataset builds them."""
    from attrdist.data.samples import SampleDataset
    from attrdist.data.reader import ShardReader, load_manifest

    manifest = load_manifest(cfg.data.shards)
    reader = ShardReader(manifest, cfg.data.train_split)
    ds = SampleDataset(reader, len(manifest.attributes), label_fields(cfg), cfg.data, cfg.run.seed, train=True)
    return collect_batches(ds, len(reader), cfg), list(manifest.attributes)


# ----------------------------------------------------------------------------------------- attrdist runs


class MemoryLoader:
    """len(plan) batches cycled from memory: what Trainer.loader returns for training in the benchmark."""

    def __init__(self, batches: list[dict], n: int):
        self.batches, self.n = batches, n

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        for i in range(self.n):
            yield self.batches[i % len(self.batches)]


def bench_trainer_class():
    import attrdist.train.trainer as trainer_mod

    trainer_mod.plot_curves = lambda *a, **k: None  # curves.png of a stub eval: not part of any timing

    class BenchTrainer(trainer_mod.Trainer):
        """The real Trainer; data from memory, and nothing after the last step but closing the tracker."""

        def __init__(self, cfg, recipe: str, batches: list[dict] | None = None):
            super().__init__(cfg, recipe)
            acc = self.acc
            self.mem_batches = batches if batches is not None else collect_batches(
                self.train_ds, self.data.n_train, cfg, acc.num_processes, acc.process_index)
            ga, steps = cfg.optim.grad_accum, cfg.run.max_steps
            # every step of the run in epoch 0 (the loop itself is unchanged)
            self.data = dataclasses.replace(self.data, batches_per_epoch=steps * ga,
                                            n_train=steps * ga * cfg.data.batch_size, steps_per_epoch=steps,
                                            total_steps=steps)

        def loader(self, ds, plan):
            if ds is self.train_ds:
                return MemoryLoader(self.mem_batches, len(plan))
            return super().loader(ds, plan)

        def evaluate(self, split, tune=False):
            return {self.monitor(): 0.0}, None

        def save(self, pointers=("last",), metric=None):
            pass

        def finish(self):
            self.tracker.close()
            self.acc.wait_for_everyone()
            self.acc.end_training()
            return self.run_dir

    return BenchTrainer


def reset_accelerate() -> None:
    """Forget accelerate's process-wide state so the next Trainer in this process starts clean."""
    try:
        from accelerate.state import AcceleratorState, GradientState

        AcceleratorState._reset_state(True)
        GradientState._reset_state()
    except Exception:  # older/newer accelerate: a fresh Accelerator with the same settings works anyway
        pass


def train_records(run_dir: Path) -> list[dict]:
    from attrdist.train.tracking import read_records

    return [r for r in read_records(run_dir / "metrics.jsonl") if r.get("type") == "train"]


def window(recs: list[dict], warmup: int, steps: int, imgs_per_step: int) -> dict:
    """Seconds of the timed steps from the trainer's own records (time at the end of each step)."""
    if len(recs) != warmup + steps:
        raise RuntimeError(f"expected {warmup + steps} train records, got {len(recs)}")
    seconds = recs[-1]["time"] - recs[warmup - 1]["time"]
    return {"seconds": seconds, "images": steps * imgs_per_step, "first_loss": recs[0]["loss"],
            "trainer_img_s_median": statistics.median(r["img_per_s"] for r in recs[warmup:])}


_RUN_IDS = itertools.count()


def attrdist_inprocess(cfg, batches, warmup: int, steps: int, tmp: Path, tag: str, info: dict) -> float:
    """One attrdist run in this process; returns the timed seconds; fills `info` (resolved runtime)."""
    run_dir = tmp / f"{tag}-{next(_RUN_IDS)}"
    cfg = replace(cfg, run=replace(cfg.run, run_dir=str(run_dir), max_steps=warmup + steps))
    Trainer = bench_trainer_class()
    reset_accelerate()
    with open(tmp / f"{run_dir.name}.log", "w") as f, contextlib.redirect_stdout(f):
        tr = Trainer(cfg, f"bench-{tag}", batches=batches)
        tr.train()
    logging.getLogger("attrdist").handlers.clear()  # its stdout handler wrote to the closed log file
    w = window(train_records(run_dir), warmup, steps, cfg.data.batch_size * cfg.optim.grad_accum)
    info.update(precision=tr.rt.mixed_precision, threads=tr.rt.threads, world=tr.rt.world_size,
                channels_last=cfg.model.channels_last, engine=tr.rt.engine)
    info.setdefault("first_loss", []).append(w["first_loss"])
    info.setdefault("trainer_img_s", []).append(w["trainer_img_s_median"])
    return float(w["seconds"])


# ----------------------------------------------------------------------------------------- bare loop


def bare_loop(cfg, batches, names, warmup: int, steps: int, *, precision: str, threads: int, info: dict,
              ddp: bool = False, compile_model: bool = False) -> float:
    """The plain PyTorch loop (see the module docstring); returns the timed seconds. `ddp`: wrapped in torch's
    DistributedDataParallel (the process group is already up; each rank passes its own slice of the batches).
    `compile_model`: torch.compile(model) (inductor, default mode) after the optimizer is built; the compile
    happens in the first warm-up step (info["warmup_s"]: the warm-up steps' seconds)."""
    import torch

    from attrdist.core import rng as rnglib
    from attrdist.models import build_model
    from attrdist.train.runtime import choose_device
    from attrdist.tasks import make_task
    from attrdist.train.trainer import build_optimizer

    dev = torch.device(choose_device(cfg.run.device))
    if ddp and dev.type == "cuda":
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(dev)
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(cfg.run.seed)
    model = build_model(cfg.model, len(names), names).to(dev)
    cl = cfg.model.channels_last
    if cl:
        model = model.to(memory_format=torch.channels_last)
    opt = build_optimizer(cfg.optim, model)
    params = [p for p in model.parameters() if p.requires_grad]
    if compile_model:
        model = torch.compile(model)
    if ddp:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None)
    task, f, clip = make_task(cfg), cfg.data.labels, cfg.optim.clip_grad_norm
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    amp = (lambda: torch.autocast(device_type=dev.type, dtype=dtype)) if dtype else contextlib.nullcontext
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    model.train()

    def step(b):
        x = b["image"].to(dev, non_blocking=True)
        if cl:
            x = x.contiguous(memory_format=torch.channels_last)
        with amp():
            out = model(x)
        loss, _ = task.loss(out, b[f"labels/{f}"].to(dev), b[f"mask/{f}"].to(dev), b["valid"].to(dev), cfg.optim)
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(params, clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    K = len(batches)
    rank = int(os.environ.get("RANK", "0")) if ddp else 0
    t_warm = time.perf_counter()
    for i in range(warmup):  # the trainer's dropout keys: step 1's loss must match attrdist's
        torch.manual_seed(rnglib.fold(cfg.run.seed, rnglib.DROPOUT, 0, i, rank))
        loss = step(batches[i % K])
        if i == 0:
            info.setdefault("first_loss", []).append(float(loss.item()))
    sync()
    info.setdefault("warmup_s", []).append(time.perf_counter() - t_warm)
    if ddp:
        torch.distributed.barrier()
    t0 = t_prev = time.perf_counter()
    per_step = []  # CPU only (a CUDA step is asynchronous): B / each step's seconds, the trainer's img_per_s
    for i in range(warmup, warmup + steps):
        step(batches[i % K])
        if dev.type == "cpu":
            now = time.perf_counter()
            per_step.append(len(batches[i % K]["image"]) / (now - t_prev))
            t_prev = now
    sync()
    seconds = time.perf_counter() - t0
    if per_step:
        info.setdefault("step_img_s", []).append(statistics.median(per_step))
        info["last_steps_img_s"] = [round(v, 1) for v in per_step]
    return seconds


# ----------------------------------------------------------------------------------------- FLOPs and ceiling


def matmul_ceiling(device: str, threads: int, n: int, dtype_name: str = "bf16", reps: int = 5) -> float:
    """GFLOP/s of an n x n x n matmul (median of `reps` after 2 warm-ups)."""
    import torch

    torch.set_num_threads(threads)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype_name]
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for _ in range(2):
        a @ b
    ts = []
    for _ in range(reps):
        sync()
        t0 = time.perf_counter()
        a @ b
        sync()
        ts.append(time.perf_counter() - t0)
    return 2 * n ** 3 / statistics.median(ts) / 1e9


def count_flops(cfg, batch: dict, names: list[str], n: int = 2) -> dict:
    """FLOPs per image of one training step (forward + loss + backward), counted on n real images (fp32, CPU)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from attrdist.models import build_model
    from attrdist.tasks import make_task

    torch.manual_seed(cfg.run.seed)
    model = build_model(cfg.model, len(names), names).train()
    task, f = make_task(cfg), cfg.data.labels
    sl = slice(0, n)
    with FlopCounterMode(display=False) as fwd:
        out = model(batch["image"][sl])
        loss, _ = task.loss(out, batch[f"labels/{f}"][sl], batch[f"mask/{f}"][sl], batch["valid"][sl], cfg.optim)
    with FlopCounterMode(display=False) as bwd:
        loss.backward()
    forward, backward = fwd.get_total_flops() / n, bwd.get_total_flops() / n
    return {"fwd_gflop_per_img": forward / 1e9, "train_gflop_per_img": (forward + backward) / 1e9,
            "3x_fwd_gflop_per_img": 3 * forward / 1e9}


# ----------------------------------------------------------------------------------------- launched workers


def worker(argv: list[str]) -> None:
    """One rank of a launched attrdist run: `bench/train_step.py --worker=SPEC.json [key=value ...]`."""
    from attrdist.core.config import Config, apply_overrides, from_dict

    spec_arg = next(a for a in argv if a.startswith("--worker="))
    spec = json.loads(Path(spec_arg.split("=", 1)[1]).read_text())
    cfg = apply_overrides(from_dict(Config, spec["config"]), [a for a in argv if "=" in a and not a.startswith("--")])
    tr = bench_trainer_class()(cfg, "bench-worker")
    tr.train()
    if tr.main:
        (Path(cfg.run.run_dir) / "bench_result.json").write_text(json.dumps(
            {"precision": tr.rt.mixed_precision, "threads": tr.rt.threads, "world": tr.rt.world_size,
             "engine": tr.rt.engine, "distributed": tr.rt.distributed_type, "backend": tr.rt.backend,
             "launcher": tr.rt.launcher, "allreduce": tr.rt.allreduce}))


def bare_worker(argv: list[str]) -> None:
    """One rank of the bare loop: `bench/train_step.py --bare-worker=SPEC.json` (plain python, or torchrun for
    DDP). gloo on CPU, NCCL on CUDA; rank r trains on slice r of the same global batches as attrdist's rank r."""
    import torch
    import torch.distributed as dist

    from attrdist.core.config import Config, from_dict
    from attrdist.data.samples import SampleDataset
    from attrdist.train.runtime import choose_device, resolve_precision
    from attrdist.data.reader import ShardReader, load_manifest

    spec = json.loads(Path(next(a for a in argv if a.startswith("--bare-worker=")).split("=", 1)[1]).read_text())
    cfg = from_dict(Config, spec["config"])
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    if world > 1:
        dist.init_process_group("nccl" if cfg.run.device == "cuda" else "gloo")
    manifest = load_manifest(cfg.data.shards)
    reader = ShardReader(manifest, cfg.data.train_split)
    ds = SampleDataset(reader, len(manifest.attributes), label_fields(cfg), cfg.data, cfg.run.seed, train=True)
    batches = collect_batches(ds, len(reader), cfg, world, rank)
    info: dict = {}
    seconds = bare_loop(cfg, batches, list(manifest.attributes), spec["warmup"], spec["steps"],
                        precision=resolve_precision(cfg.run.precision, choose_device(cfg.run.device)),
                        threads=cfg.run.threads, info=info, ddp=world > 1)
    if rank == 0:
        Path(spec["result"]).write_text(json.dumps({"seconds": seconds, "world": world, "threads": torch.get_num_threads(),
                                                    "first_loss": info["first_loss"][0],
                                                    "steps_img_s": info.get("last_steps_img_s", [])}))
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


def launched_bare(cfg, nproc: int, warmup: int, steps: int, tmp: Path, tag: str, device: str, info: dict) -> float:
    """The bare loop in nproc fresh processes (torchrun for 2: DDP); returns rank 0's timed seconds."""
    from attrdist.core.config import to_dict
    from attrdist.train.runtime import available_cores
    from launch.local import free_port

    name = f"{tag}-{next(_RUN_IDS)}"
    threads = 0 if device == "cuda" else (1 if nproc > 1 else available_cores())
    cfg = replace(cfg, run=replace(cfg.run, threads=threads))
    spec, result = tmp / f"{name}.json", tmp / f"{name}.result.json"
    spec.write_text(json.dumps({"config": to_dict(cfg), "warmup": warmup, "steps": steps, "result": str(result)}))
    script = [str(ROOT / "bench" / "train_step.py"), f"--bare-worker={spec}"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(nproc),
               "--master_port", str(free_port()), *script]
        if device == "cpu":
            env["OMP_NUM_THREADS"] = "1"
    else:
        cmd = [sys.executable, *script]
    log_path = tmp / f"{name}.log"
    with open(log_path, "w") as f:
        rc = subprocess.call(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=900)
    if rc != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {rc}:\n{log_path.read_text()[-4000:]}")
    res = json.loads(result.read_text())
    if res["world"] != nproc:
        raise RuntimeError(f"bare: asked for {nproc} processes, got {res['world']}")
    info.update(world=res["world"], threads=res["threads"], precision="bf16", channels_last=cfg.model.channels_last)
    if res["steps_img_s"]:  # rank 0's per-step rate (x world: the global batch)
        info.setdefault("step_img_s", []).append(statistics.median(res["steps_img_s"]) * nproc)
    return float(res["seconds"])


def launched(cfg, nproc: int, deepspeed: str, warmup: int, steps: int, tmp: Path, tag: str, device: str,
             info: dict) -> float:
    """An attrdist run through `python -m launch local`; returns the timed seconds (rank 0's records)."""
    from attrdist.core.config import to_dict
    from attrdist.train.runtime import available_cores

    run_dir = tmp / f"{tag}-{next(_RUN_IDS)}"
    threads = 1 if nproc > 1 else available_cores()
    if device == "cuda":
        threads = 0
    cfg = replace(cfg, run=replace(cfg.run, run_dir=str(run_dir), max_steps=warmup + steps, threads=threads))
    spec = tmp / f"{run_dir.name}.json"
    spec.write_text(json.dumps({"config": to_dict(cfg)}))
    cmd = [sys.executable, "-m", "launch", "local", "bench/train_step.py", "--nproc", str(nproc),
           "--device", device, *(["--deepspeed", deepspeed] if deepspeed else []), f"--worker={spec}"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("ATTRDIST_EXPECT_WORLD_SIZE", None)
    log_path = tmp / f"{run_dir.name}.log"
    with open(log_path, "w") as f:
        rc = subprocess.call(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=900)
    if rc != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {rc}:\n{log_path.read_text()[-4000:]}")
    res = json.loads((run_dir / "bench_result.json").read_text())
    if res["world"] != nproc:
        raise RuntimeError(f"asked for {nproc} processes, the run had {res['world']}")
    w = window(train_records(run_dir), warmup, steps, cfg.data.batch_size * cfg.optim.grad_accum)
    info.update(res)
    info.setdefault("trainer_img_s", []).append(w["trainer_img_s_median"])
    return float(w["seconds"])


# ----------------------------------------------------------------------------------------- the benchmarks


def img_row(bench: str, what: str, times: list[float], images: int, info: dict, **extra) -> dict:
    row = {"benchmark": bench, "what": what, **summarize(times, images), "images_per_round": images, **extra}
    for k in ("precision", "threads", "world", "channels_last", "engine"):
        if k in info:
            row[k] = info[k]
    return row


def bare_step(ib: dict) -> dict:
    return {"bare_step_img_s": round(statistics.median(ib["step_img_s"]), 1)} if ib.get("step_img_s") else {}


def step_medians(ia: dict, ib: dict) -> str:
    """Per-step medians (robust to a stall from a noisy neighbour): attrdist's logged img_per_s vs the bare loop's."""
    if not ia.get("trainer_img_s") or not ib.get("step_img_s"):
        return ""
    a, b = statistics.median(ia["trainer_img_s"]), statistics.median(ib["step_img_s"])
    return f"; median step: {a:.1f} vs bare {b:.1f} img/s ({a / b:.3f}x)"


def run_overhead(shards: Path, device: str, rounds: int, quick: bool, tmp: Path) -> tuple[list[dict], list[dict]]:
    from attrdist.train.runtime import available_cores, resolve_precision

    warmup, steps = (1, 4) if quick else (3, 30)
    rows, targets = [], []
    for label, make in (("ResNet-18@64", resnet18_64), ("coconut demo model", coconut_demo)):
        cfg = make(shards, device)
        batches, names = standalone_batches(cfg)
        images = steps * cfg.data.batch_size
        ia, ib = {}, {}
        precision = resolve_precision(cfg.run.precision, device)
        threads = cfg.run.threads or available_cores()  # what make_accelerator gives 1 process
        t = alternate({
            "attrdist": lambda: attrdist_inprocess(cfg, batches, warmup, steps, tmp, "overhead", ia),
            "bare": lambda: bare_loop(cfg, batches, names, warmup, steps, precision=precision, threads=threads,
                                      info=ib),
        }, rounds)
        ib.update(precision=precision, threads=threads, channels_last=cfg.model.channels_last)
        common = {"model": label, "image_size": cfg.data.image_size, "batch": cfg.data.batch_size,
                  "warmup_steps": warmup, "timed_steps": steps, "device": device}
        rows.append(img_row("overhead", f"{label}: attrdist Trainer", t["attrdist"], images, ia, **common,
                            step1_loss=ia["first_loss"][0],
                            trainer_logged_img_s=round(statistics.median(ia["trainer_img_s"]), 1)))
        rows.append(img_row("overhead", f"{label}: bare loop", t["bare"], images, ib, **common,
                            step1_loss=ib["first_loss"][0], **bare_step(ib)))
        same = abs(ia["first_loss"][0] - ib["first_loss"][0]) <= 1e-4 * max(1.0, abs(ib["first_loss"][0]))
        note = (f"step-1 loss {ia['first_loss'][0]:.5f} vs bare {ib['first_loss'][0]:.5f}"
                f"{'' if same else ' (DIFFERENT: not the same work?)'}; {ia.get('precision')}, "
                f"channels_last={cfg.model.channels_last}, {ia.get('threads')} threads{step_medians(ia, ib)}")
        targets.append(target_row("overhead", f"{label}: attrdist / bare throughput",
                                  *ratio_stats(t["bare"], t["attrdist"]), ">=", 0.97, note=note))
    return rows, targets


def run_fastpath(shards: Path, device: str, rounds: int, quick: bool, tmp: Path,
                 recipe: str) -> tuple[list[dict], list[dict]]:
    from attrdist.train.runtime import available_cores

    warmup, steps = (1, 2) if quick else (2, 6)
    batch, size = (8, 96) if quick else (32, None)
    cfg = recipe_full(recipe, shards, device, batch, size)
    batches, names = standalone_batches(cfg)
    images = steps * batch
    threads = cfg.run.threads or available_cores()  # what make_accelerator gives 1 process
    bare_cfg = replace(cfg, model=replace(cfg.model, channels_last=True))  # the best bare configuration
    ia, ib = {}, {}
    t = alternate({
        "attrdist": lambda: attrdist_inprocess(cfg, batches, warmup, steps, tmp, "fastpath", ia),
        "bare": lambda: bare_loop(bare_cfg, batches, names, warmup, steps, precision="bf16", threads=threads, info=ib),
    }, rounds)
    ib.update(precision="bf16", threads=threads, channels_last=True)
    flops = count_flops(cfg, batches[0], names)
    n = 8192 if device == "cuda" else 2048
    ceiling = matmul_ceiling(device, threads, n, "bf16")
    fp32 = matmul_ceiling(device, threads, n, "fp32")
    label = f"{recipe} full() {cfg.model.name}/{cfg.model.backbone}@{cfg.data.image_size}"
    common = {"model": label, "image_size": cfg.data.image_size, "batch": batch, "warmup_steps": warmup,
              "timed_steps": steps, "device": device}
    ra = img_row("fastpath", f"{label}: attrdist, recipe defaults", t["attrdist"], images, ia, **common,
                 step1_loss=ia["first_loss"][0], trainer_logged_img_s=round(statistics.median(ia["trainer_img_s"]), 1))
    rb = img_row("fastpath", f"{label}: bare channels_last+bf16", t["bare"], images, ib, **common,
                 step1_loss=ib["first_loss"][0], **bare_step(ib))
    for r in (ra, rb):
        r.update({k: round(v, 3) for k, v in flops.items()})
        r["achieved_gflop_s"] = round(flops["train_gflop_per_img"] * r["items_per_s"], 1)
        r["ceiling_bf16_matmul_gflop_s"] = round(ceiling, 1)
        r["fraction_of_ceiling"] = round(r["achieved_gflop_s"] / ceiling, 3)
    rows = [ra, rb, {"benchmark": "fastpath", "what": f"matmul {n}^2 bf16 GFLOP/s ({threads} threads)",
                     "gflop_s": round(ceiling, 1), "device": device},
            {"benchmark": "fastpath", "what": f"matmul {n}^2 fp32 GFLOP/s ({threads} threads)", "gflop_s": round(fp32, 1),
             "device": device}]
    defaults = f"recipe defaults resolved to {ia.get('precision')}, channels_last={cfg.model.channels_last}, " \
               f"{ia.get('threads')} threads{step_medians(ia, ib)}"
    targets = [target_row("fastpath", f"{label}: attrdist (recipe defaults) / bare channels_last+bf16",
                          *ratio_stats(t["bare"], t["attrdist"]), ">=", 0.9, note=defaults)]
    achieved = [flops["train_gflop_per_img"] * images / s for s in t["attrdist"]]
    fr = [a / ceiling for a in achieved]
    targets.append({"benchmark": "fastpath", "what": f"{label}: achieved train FLOP/s / bf16 matmul {n}^2 ceiling",
                    "target": "", "median": round(statistics.median(fr), 3), "spread": f"{min(fr):.3f}-{max(fr):.3f}",
                    "verdict": "reported",
                    "note": f"{statistics.median(achieved):.1f} of {ceiling:.1f} GFLOP/s; "
                            f"{flops['train_gflop_per_img']:.2f} GFLOP/img counted (fwd {flops['fwd_gflop_per_img']:.2f}, "
                            f"3x fwd {flops['3x_fwd_gflop_per_img']:.2f}); fp32 matmul {fp32:.1f} GFLOP/s"})
    return rows, targets


def run_scaling(shards: Path, device: str, rounds: int, quick: bool, tmp: Path) -> tuple[list[dict], list[dict]]:
    import torch

    if device == "cuda" and torch.cuda.device_count() < 2:
        print(f"scaling: skipped (needs 2 GPUs, this machine has {torch.cuda.device_count()})")
        return [], []
    warmup, steps = (1, 4) if quick else (3, 20)
    cfg = resnet18_64(shards, device)
    images = steps * cfg.data.batch_size
    info = {k: {} for k in ("one", "ddp", "zero2", "bare_one", "bare_ddp")}
    t = alternate({
        "one": lambda: launched(cfg, 1, "", warmup, steps, tmp, "one", device, info["one"]),
        "ddp": lambda: launched(cfg, 2, "", warmup, steps, tmp, "ddp", device, info["ddp"]),
        "zero2": lambda: launched(cfg, 2, "zero2", warmup, steps, tmp, "zero2", device, info["zero2"]),
        "bare_one": lambda: launched_bare(cfg, 1, warmup, steps, tmp, "bare-one", device, info["bare_one"]),
        "bare_ddp": lambda: launched_bare(cfg, 2, warmup, steps, tmp, "bare-ddp", device, info["bare_ddp"]),
    }, rounds)
    common = {"model": "ResNet-18@64", "image_size": cfg.data.image_size, "batch": cfg.data.batch_size,
              "warmup_steps": warmup, "timed_steps": steps, "device": device}
    if device == "cuda":
        names = {"one": "1 GPU", "ddp": "2-GPU DDP", "zero2": "2-GPU DeepSpeed ZeRO-2"}
    else:
        names = {"one": "1 process x 2 threads",
                 "ddp": f"2-process DDP ({info['ddp'].get('allreduce', '?')} all-reduce) x 1 thread",
                 "zero2": "2-process DeepSpeed ZeRO-2 x 1 thread"}
    names.update(bare_one=f"bare loop, {names['one']}",
                 bare_ddp="bare loop, 2-process DDP (gloo) x 1 thread" if device == "cpu" else f"bare loop, {names['ddp']}")
    rows = []
    for k in t:
        extra = ({"trainer_logged_img_s": round(statistics.median(info[k]["trainer_img_s"]), 1)}
                 if "trainer_img_s" in info[k] else bare_step(info[k]))
        who = "" if k.startswith("bare") else "attrdist, "
        rows.append(img_row("scaling", f"ResNet-18@64 {who}{names[k]}", t[k], images, info[k], **common, **extra))
    m, lo, hi = ratio_stats(t["ddp"], t["zero2"])
    bm, blo, bhi = ratio_stats(t["bare_one"], t["bare_ddp"])
    what = f"ResNet-18@64 attrdist: {names['ddp']} / {names['one']} throughput"
    note = f"same global batch 32; the bare loop, same rotation: {bm:.3f}x ({blo:.3f}-{bhi:.3f})"
    try:  # per-step medians (robust to a neighbour's stall): attrdist's logged img_per_s, the bare loops' clocks
        sm = {k: statistics.median(info[k]["trainer_img_s" if k in ("one", "ddp") else "step_img_s"])
              for k in ("one", "ddp", "bare_one", "bare_ddp")}
        note += (f"; median step: attrdist {sm['ddp'] / sm['one']:.3f}x ({sm['ddp']:.0f} / {sm['one']:.0f} img/s), "
                 f"bare {sm['bare_ddp'] / sm['bare_one']:.3f}x ({sm['bare_ddp']:.0f} / {sm['bare_one']:.0f} img/s)")
    except (KeyError, statistics.StatisticsError):  # CUDA: no per-step clock in the bare loop
        pass
    if device == "cpu":  # the target is for 2 ranks on the same 2 cores
        first = target_row("scaling", what, *ratio_stats(t["one"], t["ddp"]), ">=", 0.85,
                           note=note + "; the stack notes' bare loop measured 0.89")
    else:
        m1, lo1, hi1 = ratio_stats(t["one"], t["ddp"])
        first = {"benchmark": "scaling", "what": what, "target": "", "median": round(m1, 3),
                 "spread": f"{lo1:.3f}-{hi1:.3f}", "verdict": "reported", "note": note}
    targets = [first,
               {"benchmark": "scaling", "what": "ResNet-18@64 2 ranks: attrdist DDP / bare-loop DDP throughput",
                "target": "", "median": round(ratio_stats(t["bare_ddp"], t["ddp"])[0], 3),
                "spread": "{:.3f}-{:.3f}".format(*ratio_stats(t["bare_ddp"], t["ddp"])[1:]), "verdict": "reported",
                "note": "the trainer's own cost under DDP (per-step counts/flags collectives included)"},
               {"benchmark": "scaling", "what": "ResNet-18@64: DeepSpeed ZeRO-2 / DDP throughput (2 ranks, attrdist)",
                "target": "", "median": round(m, 3), "spread": f"{lo:.3f}-{hi:.3f}", "verdict": "reported",
                "note": f"ZeRO-2 overhead vs DDP: {100 * (1 / m - 1):+.1f} % time per step"}]
    return rows, targets


def main(argv: list[str] | None = None):
    argv = sys.argv[1:] if argv is None else argv
    from attrdist.malloc import tune_malloc

    # Every process here (this one, whose bare loop alternates with the trainer, and the fresh bare and
    # attrdist workers) gets the allocator the trainer's process gets (run.malloc=keep, set in
    # make_accelerator), so each ratio compares like with like; what the allocator itself buys is
    # bench/malloc.py's figure.
    tune_malloc("keep")
    if any(a.startswith("--worker=") for a in argv):
        return worker(argv)
    if any(a.startswith("--bare-worker=") for a in argv):
        return bare_worker(argv)
    ap = parser(__doc__, quick="smoke run: 1 round, few steps, ResNet-50 at 96 px batch 8")
    ap.add_argument("--only", choices=("overhead", "fastpath", "scaling"), help="one benchmark (default: all three)")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--recipe", default="coconut", choices=("coconut", "cocottributes", "coco_attributes"),
                    help="fastpath: whose full() profile (default coconut: cross_modal ResNet-50, 3 stages frozen)")
    args = ap.parse_args(argv)
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device on this machine; the GPU variant (item 8) is skipped")
        return []
    if args.quick:
        args.rounds = 1
    todo = [args.only] if args.only else ["overhead", "fastpath", "scaling"]
    rows, targets = [], []
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="attrdist-bench-step-") as tmp_s:
        tmp = Path(tmp_s)
        shards = make_shards(tmp)
        for name in todo:
            t1 = time.perf_counter()
            if name == "overhead":
                r, tg = run_overhead(shards, args.device, args.rounds, args.quick, tmp)
            elif name == "fastpath":
                r, tg = run_fastpath(shards, args.device, args.rounds, args.quick, tmp, args.recipe)
            else:
                r, tg = run_scaling(shards, args.device, args.rounds, args.quick, tmp)
            rows += r
            targets += tg
            print(f"{name}: {time.perf_counter() - t1:.0f} s", flush=True)
    print("\n| benchmark | what | img/s (median) | img/s min-max | rounds |\n| --- | --- | ---: | ---: | ---: |")
    for r in rows:
        if "median_s" in r:
            lo, hi = r["images_per_round"] / r["max_s"], r["images_per_round"] / r["min_s"]
            print(f"| {r['benchmark']} | {r['what']} | {r['items_per_s']:,.1f} | {lo:,.1f}-{hi:,.1f} | {r['rounds']} |")
        elif "gflop_s" in r:
            print(f"| {r['benchmark']} | {r['what']} | {r['gflop_s']:,.1f} GFLOP/s | | |")
    return save("train_step" + ("-cuda" if args.device == "cuda" else ""), rows, targets, quick=args.quick,
                note=f"(total {time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
