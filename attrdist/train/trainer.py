"""The imperative shell of a run: build it, drive the loop, evaluate, report. Every task, one loop.

    python recipes/coconut.py                      # 1 process: CUDA > MPS > CPU
    accelerate launch recipes/coconut.py           # whatever accelerate is configured for
    python -m launch local recipes/coconut.py --nproc 2   # N CPU ranks that really are N (gloo)

`Trainer.__init__` is a sequence of builders that return plain values: runtime, run directory, task
(attrdist/tasks/), data plan, model and optimizer. `Trainer.train` is the loop. Its state is a frozen
`LoopState` replaced by the pure transitions of attrdist.core.loop, and every "is it time to ..." is
a predicate there. What the loop calls is named: `micro_batch` (forward and backward of this rank's
slice of one global batch), `optimizer_step` (the all-ranks agreement, then step or skip), `agree`
(hands the step to the host's reader: at once, or one step later under run.host_sync=lagged, see
attrdist.train.agreement; `settle` reads what is pending), `after_step` (records, fault policies,
checkpoints), `end_of_epoch` (evaluation, best checkpoint, early stop). The evaluation pass is
attrdist.train.evaluation, the same for every task.

Everything random is keyed (attrdist.core.rng); a checkpoint holds the weights, the optimizer state
and the loop state (epoch, batch within the epoch, step, early-stopping counters), nothing else.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import math
import os
import shutil
import statistics
import time
from array import array
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from attrdist import __version__, atomic
from attrdist.core import loop
from attrdist.core import rng as rnglib
from attrdist.core.config import Config, to_dict, to_json
from attrdist.core.loop import LoopState, itstime
from attrdist.core.order import BatchPlan, StreamPlan, first_samples, stream_count
from attrdist.core.schedules import lr_factor
from attrdist.data.loader import make_loader
from attrdist.data.samples import CorruptTally, worker_image_dtype
from attrdist.data.reader import ShardReader, load_manifest
from attrdist.errors import AttrdistError
from attrdist.models import build_model, convert_sync_batchnorm, count_parameters, freeze_batchnorm_stats
from attrdist.models.preprocess import resolve as resolve_preprocess
from attrdist.tasks import make_task
from attrdist.tasks.base import StepEnv
from attrdist.train import agreement, checkpoint, interrupt, precision, report, shm_allreduce
from attrdist.train.evaluation import count_corrupt, evaluation_pass
from attrdist.train.input_check import InputCheck
from attrdist.train.progress import Progress, rate_eta
from attrdist.train.rundir import planned_run_dir, resolve_run_dir, setup_logging
from attrdist.train.runtime import available_cores, make_accelerator
from attrdist.train.tracking import Tracker, accelerate_log_with, check_trackers, plot_curves

log = logging.getLogger("attrdist")


@dataclass(frozen=True)
class DataPlan:
    """How much training data a run has and how it is cut into steps: the same on every rank."""

    train_reader: ShardReader
    n_train: int  # samples in the training order (after data.subset and run.overfit_batches)
    batches_per_epoch: int  # global batches of data.batch_size
    steps_per_epoch: int  # optimizer steps: batches_per_epoch // optim.grad_accum
    total_steps: int  # of the whole run (run.epochs, capped by run.max_steps)
    eval_batch: int  # the global evaluation batch, a multiple of the world size

    def train_plan(self, d, world: int, rank: int, seed: int, epoch: int, start: int, shuffle: bool = True):
        """This rank's batches of one training epoch from global batch `start` (data.order; unshuffled for
        run.overfit_batches: the same first samples every epoch)."""
        if d.order == "permutation" or not shuffle:
            return BatchPlan(self.n_train, d.batch_size, world, rank, seed, epoch, shuffle=shuffle, drop_last=True,
                             start=start)
        return StreamPlan(first_samples(self.train_reader.lengths, self.n_train), d.batch_size, world, rank, seed,
                          epoch, streams=d.streams, window=d.shuffle_window, start=start)

    def step_batches(self, grad_accum: int) -> int:
        """The global batches an epoch trains on: whole optimizer steps only."""
        return self.steps_per_epoch * grad_accum


def build_data(cfg: Config, manifest, world: int) -> DataPlan:
    """The training split's reader and the run's step arithmetic; one-line errors for what cannot work."""
    d, B = cfg.data, cfg.data.batch_size
    if B % world:
        raise AttrdistError(f"data.batch_size={B} is the GLOBAL batch and must be divisible by the {world} processes")
    eval_batch = d.eval_batch_size or 2 * B
    if eval_batch % world:
        eval_batch += world - eval_batch % world
    reader = ShardReader(manifest, d.train_split)
    n = len(reader)
    if d.subset:
        n = min(n, d.subset)
    if cfg.run.overfit_batches:
        n = min(n, cfg.run.overfit_batches * B)
    batches = n // B
    if batches < cfg.optim.grad_accum:
        raise AttrdistError(f"split {d.train_split!r} has {n} samples: fewer than one optimizer step of "
                            f"{B} x {cfg.optim.grad_accum}; lower data.batch_size")
    S = stream_count(d.streams, B)
    if d.order == "windowed" and S % world and not cfg.run.overfit_batches:
        raise AttrdistError(f"data.order=windowed: {world} processes do not divide the {S} canonical streams "
                            f"(gcd of data.streams={d.streams} and data.batch_size={B}); use a world size dividing {S}, "
                            f"or data.streams a multiple of {world} (changes the order), or data.order=permutation")
    if manifest.cache is not None:
        check_cache_room(cfg, manifest, world, S)
    steps = batches // cfg.optim.grad_accum
    total = steps * cfg.run.epochs
    if cfg.run.max_steps:
        total = min(total, cfg.run.max_steps)
    log.info("train split %r: %d samples, global batch %d (%d per rank x %d ranks), %d batches/epoch; "
             "the last %d samples of each epoch's order are dropped (incomplete global batch)",
             d.train_split, n, B, B // world, world, batches, n - batches * B)
    # a lazily indexed split (large, or remote): keep the index of every shard a process may read at once
    # (a window of each stream it owns, the next one too), or every shard for the full permutation
    at_once = 2 * max(1, S // world) * d.shuffle_window
    reader.max_indexed = len(reader.paths) if d.order == "permutation" else max(reader.max_indexed, at_once)
    if d.order == "windowed":  # and their descriptors (a window's samples come from all its shards in turn)
        reader.max_open = max(reader.max_open, at_once)
        log.info("order: windowed, %d canonical streams of %d samples per batch, windows of %d shards; the same "
                 "batches at any world size dividing %d; each rank reads a 1/%d share of the shards per epoch",
                 S, B // S, d.shuffle_window, S, world)
    return DataPlan(reader, n, batches, steps, total, eval_batch)


def check_cache_room(cfg: Config, manifest, world: int, streams: int) -> None:
    """A remote pack: data.cache_limit_gb must hold what this node's ranks read at once, or shards would be
    evicted while still in use and downloaded again and again. Windowed order: each rank keeps up to two
    windows (open + next, prefetched) of each of its streams; permutation: every shard of the split."""
    d = cfg.data
    local = min(world, int(os.environ.get("LOCAL_WORLD_SIZE", world)))
    sizes = sorted((s["bytes"] for s in manifest.split(d.train_split)["shards"]), reverse=True)
    if d.order == "permutation":
        need, why = sum(sizes), "data.order=permutation reads every shard every epoch"
    else:
        n = local * 2 * (streams // world) * d.shuffle_window
        need = sum(sizes[:n])
        why = (f"{local} ranks on this node x 2 windows (open + next) x {streams // world} streams each x "
               f"data.shuffle_window={d.shuffle_window} shards")
    if need > d.cache_limit_gb * 1e9:
        raise AttrdistError(f"{manifest.root}: data.cache_limit_gb={d.cache_limit_gb:g} cannot hold what this node "
                            f"reads at once ({why}: up to {math.ceil(need / 1e8) / 10:g} GB); raise data.cache_limit_gb"
                            + (" or use data.order=windowed" if d.order == "permutation" else
                               ", or lower data.shuffle_window or data.streams (either changes the order)"))


def usable_workers(asked: int) -> int:
    """data.num_workers, at most the cores this process may use (its share among the node's local processes):
    more workers than cores only time-slice, and torch warns for every loader made (the full profiles ask 4)."""
    local = int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or os.environ.get("WORLD_SIZE") or 1)
    cap = max(1, available_cores() // max(1, local))
    if asked <= cap:
        return asked
    log.info("data.num_workers=%d: %d worker processes per loader, the cores this process can use (%d core%s for %d "
             "local process%s)", asked, cap, available_cores(), "s" * (available_cores() != 1), local,
             "es" * (local != 1))
    return cap


def debug_config(cfg: Config) -> Config:
    """run.debug: a few steps on a small subset, one eval, no workers."""
    b = cfg.data.batch_size
    return replace(cfg, data=replace(cfg.data, subset=max(4 * b, 8), num_workers=0),
                   run=replace(cfg.run, epochs=1, max_steps=3, eval_every=1, log_every=1))


def build_optimizer(cfg, model: torch.nn.Module, fused: bool = True, offload: bool = False) -> torch.optim.Optimizer:
    """AdamW / Adam / SGD with no weight decay on biases and norms. `fused`: torch's single-kernel
    implementation (CPU and CUDA), ~4x faster steps than the default on CPU (ResNet-18: 4.7 vs 20.8 ms,
    bench/train_step.py); off under DeepSpeed, which steps its own flattened partitions. `offload`: DeepSpeed
    with run.offload, which takes its own CPU Adam only (attrdist.train.zero.cpu_optimizer)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if offload:
        from attrdist.train import zero

        return zero.cpu_optimizer(groups, cfg)
    params = [p for g in groups for p in g["params"]]
    kw = {"fused": True} if fused and params and all(p.device.type in ("cpu", "cuda") for p in params) else {}
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, **kw)
    if cfg.name == "adam":  # Adam's L2-style weight decay, as in the experiment reports
        return torch.optim.Adam(groups, lr=cfg.lr, **kw)
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, **kw)


def check_compile(run_cfg, device: str) -> None:
    """run.compile=true where this process cannot honour it: one line, before anything is built (with DeepSpeed:
    attrdist.core.config.validate)."""
    if not run_cfg.compile:
        return
    dyn = os.environ.get("ACCELERATE_DYNAMO_BACKEND", "NO").upper()
    if dyn != "NO":
        raise AttrdistError(f"run.compile=true and ACCELERATE_DYNAMO_BACKEND={dyn} (accelerate launch --dynamo_backend or "
                            f"`accelerate config`) would both compile the model: drop one of them")
    cxx = os.environ.get("CXX", "g++")  # inductor's C++ compiler on Linux (torch._inductor.config.cpp.cxx)
    if device == "cpu" and not shutil.which(cxx):
        raise AttrdistError(f"run.compile=true on CPU: inductor builds C++ kernels but finds no compiler ({cxx}); "
                            f"install g++ (or set CXX), or drop run.compile")
    if device == "cuda" and importlib.util.find_spec("triton") is None:
        raise AttrdistError("run.compile=true on CUDA: inductor needs triton, which is not installed; install the "
                            "triton that matches torch, or drop run.compile")
    if device not in ("cpu", "cuda"):
        raise AttrdistError(f"run.compile=true on {device}: attrdist compiles on CPU and CUDA only; drop run.compile")


def log_shapes_once(model: torch.nn.Module) -> list:
    """Forward hooks that log every leaf module's output shape on the first forward (debug)."""
    handles = []

    def hook(mod, _inp, out, name=None):
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        log.info("shape %-50s %s", name, shape)

    for name, mod in model.named_modules():
        if name and not any(True for _ in mod.children()):
            handles.append(mod.register_forward_hook(lambda m, i, o, name=name: hook(m, i, o, name)))
    return handles


class Trainer:
    def __init__(self, cfg: Config, recipe: str):
        if cfg.run.debug:
            cfg = debug_config(cfg)
        # size, eval crop, resampling, mean/std from the model where the recipe left them open: config.json,
        # the checkpoints, evaluation and `attrdist predict` all see these concrete values
        cfg, preprocess_notes = resolve_preprocess(cfg)
        self.cfg, self.recipe = cfg, recipe
        trackers = check_trackers(cfg.run.log_with)  # before anything starts: a missing package stops the run
        planned = planned_run_dir(cfg)  # rank 0's is the run directory
        self.acc, self.rt = make_accelerator(cfg.run, cfg.optim, cfg.data.batch_size, project_dir=str(planned),
                                             log_with=accelerate_log_with(trackers, planned))
        # run.precision=auto on a CPU with native bf16 (and no explicit launcher setting): measured on the model
        # once it is built (settle_precision)
        self.precision_pending = precision.needs_probe(self.rt.precision_pref, self.rt.device, self.rt.mixed_precision,
                                                       cfg.run.deepspeed)
        if self.precision_pending:
            self.rt = replace(self.rt, mixed_precision="auto")  # the runtime line says so until it is settled
        check_compile(cfg.run, self.rt.device)
        host_sync, host_sync_note = agreement.resolve(cfg.run, cfg.optim, self.rt.device, self.rt.mixed_precision)
        self.rt = replace(self.rt, host_sync=host_sync)
        self.sync = agreement.HostSync(lagged=host_sync == "lagged")
        self.main = self.acc.is_main_process
        self.run_dir = self.open_run_dir(planned)
        log.info("%s", host_sync_note)
        self.workers = usable_workers(cfg.data.num_workers)
        log.info("preprocessing: %s", "; ".join(preprocess_notes))
        self.manifest = load_manifest(cfg.data.shards, cache=cfg.data)
        self.task = make_task(cfg, self.manifest)
        if cfg.data.decode == "device" and not self.task.pixel_stage:
            raise AttrdistError(f"data.decode=device: the {cfg.data.task} task decodes its images in the loader's "
                                f"workers only; set data.decode=workers")
        self.data = build_data(cfg, self.manifest, self.acc.num_processes)
        self.model, self.optimizer = self.build_model_and_optimizer()
        self.env = StepEnv(self.acc.device, self.acc.autocast,
                           torch.channels_last if cfg.model.channels_last else torch.contiguous_format,
                           (lambda c: self.acc.reduce(c, "mean")) if self.acc.num_processes > 1 else None)
        self.train_ds = self.dataset(self.data.train_reader, train=not cfg.run.overfit_batches)
        if self.task.pixel_stage and cfg.data.decode == "device":
            log.info("input: %d workers read the samples and draw their augmentation; their JPEGs are decoded and "
                     "cropped/flipped on %s (%s; PNG, CMYK and the like in the workers), colour, normalisation and "
                     "erasing batched there (data.decode=device)", self.workers, self.acc.device,
                     "torchvision.io.decode_jpeg: " + ("nvJPEG" if self.acc.device.type == "cuda" else "libjpeg-turbo"))
        elif self.task.pixel_stage:
            log.info("input: %d workers decode + crop/flip; colour, normalisation and erasing run %s "
                     "(data.pixel_stage=%s)", self.workers,
                     f"in the workers, {str(self.train_ds.image_dtype).split('.')[-1]} batches (data.worker_dtype="
                     f"{cfg.data.worker_dtype})" if self.pixels_in_workers else
                     f"batched on {self.acc.device.type}, from uint8 batches", cfg.data.pixel_stage)
        self.state = LoopState()
        self.tracker = Tracker(self.run_dir, enabled=self.main, acc=self.acc, cfg=cfg, recipe=recipe)
        self.ckpt_root = self.run_dir / "checkpoints"
        self.timings: dict = {"train_s": 0.0}
        self.step_rates = array("d")  # images/s of every optimizer step: the report's median
        self.bar = None  # the training progress bar on a terminal (attrdist.train.progress)
        self.step_time, self.rates_start, self.steps_start = 0.0, 0, 0  # this launch's step time, for the ETA
        # after the first forward, one log line of what the step really got: a pinned batch, channels_last tensors
        self.input_check = InputCheck(self.acc.unwrap_model(self.model), pin_memory=self.rt.device == "cuda",
                                      channels_last=cfg.model.channels_last,
                                      weights_channels_last=cfg.model.channels_last and not self.deepspeed,
                                      observe_input=not cfg.run.compile)

    # ---------------------------------------------------------------- builders
    def open_run_dir(self, planned: Path) -> Path:
        """The run directory (chosen and locked by rank 0), train.log, the first log lines, config.json."""
        cfg, acc = self.cfg, self.acc
        setup_logging(None, acc.process_index)
        run_dir = resolve_run_dir(cfg, acc, planned)
        setup_logging(run_dir, acc.process_index)
        log.info("attrdist %s recipe: %s | run dir: %s", __version__, self.recipe, run_dir)
        log.info("runtime: %s", self.rt.describe())
        for note in self.rt.launcher_notes:
            log.info("launcher: %s", note)
        if acc.num_processes > 1:
            log.info("distributed run verified: %d ranks (%s, backend %s)", self.rt.world_size,
                     self.rt.distributed_type, self.rt.backend)
            log.info("nodes: %s", self.rt.layout)
            log.info("gradient all-reduce: %s", self.rt.allreduce_note)
        log.info("config:\n%s", to_json(cfg))
        if self.main:
            atomic.write_json(run_dir / "config.json", {"recipe": self.recipe, **to_dict(cfg)})
        return run_dir

    def build_model_and_optimizer(self) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        """The model (seeded by run.seed), its norm options and memory format, the optimizer, both wrapped by
        accelerate (DDP / DeepSpeed), the shared-memory all-reduce hooked in; then the task's own set-up."""
        cfg, names = self.cfg, list(self.manifest.attributes)
        torch.manual_seed(cfg.run.seed)
        model = build_model(cfg.model, len(names), names)
        if cfg.run.init_from:
            checkpoint.init_model(model, cfg.run.init_from)
        self.apply_norm_options(model)
        total, trainable = count_parameters(model)
        log.info("model %s/%s: %.2fM parameters, %.2fM trainable; backbone weights: %s", cfg.model.name,
                 cfg.model.backbone, total / 1e6, trainable / 1e6, getattr(model, "weights_source", "?"))
        if hasattr(model, "attr_source"):
            log.info("attribute queries: %s", model.attr_source)
        if cfg.model.channels_last and self.deepspeed:
            # DeepSpeed flattens/broadcasts parameters as contiguous bytes: channels_last weights fail in
            # deepspeed.initialize ("stride(-1) must be 1"); the weights stay contiguous, inputs are still converted
            log.info("model.channels_last: weights kept contiguous under DeepSpeed (it needs them flat)")
        elif cfg.model.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.settle_precision(model)
        optimizer = build_optimizer(cfg.optim, model, fused=cfg.optim.fused and not cfg.run.deepspeed,
                                    offload=bool(cfg.run.deepspeed) and cfg.run.offload != "none")
        model, optimizer = self.acc.prepare(model, optimizer)
        if self.rt.allreduce == "shm" and isinstance(model, torch.nn.parallel.DistributedDataParallel):
            shm_allreduce.register(model)
        if cfg.run.compile:
            self.compile_model(model)
        if self.deepspeed:
            from attrdist.train import zero

            zero.use_weights_only_loads(model)  # DeepSpeed's own reader unpickles with weights_only=False
        self.task.prepare(self.acc.unwrap_model(model))
        if self.task.describe():
            log.info("%s", self.task.describe())
        return model, optimizer

    def compile_model(self, model: torch.nn.Module) -> None:
        """run.compile: torch.compile (inductor) in place (nn.Module.compile), so the state_dict keys, checkpoints
        and `attrdist predict` are those of the plain model. After accelerate's prepare, on what it returned: under
        DDP the DDP module, as torch's DDP notes advise and accelerate's own dynamo_backend does (dynamo's
        DDPOptimizer then splits the graph at DDP's gradient buckets, so the all-reduce still overlaps the
        backward). The first forward and backward compile (logged: the first step's time); evaluation runs the
        compiled module too and compiles its eval-mode, no-grad forward once more (twice when its last batch is
        smaller: shapes then turn dynamic). What rules it out was checked at the start (`check_compile`)."""
        model.compile()
        log.info("run.compile: %s compiled in place with torch.compile (inductor); the first step compiles",
                 type(model).__name__)

    def settle_precision(self, model: torch.nn.Module) -> None:
        """run.precision=auto on a CPU with native bf16 (attrdist.train.precision): rank 0 takes this run's earlier
        decision (a resume), else the machine's cached one, else probes a copy of `model`; every rank gets rank 0's
        answer; the accelerator drops to fp32 if bf16 is not faster. Before `prepare` wraps the forward."""
        cfg, acc = self.cfg, self.acc
        if not self.precision_pending:
            if acc.num_processes > 1 and precision.needs_probe(self.rt.precision_pref, self.rt.device, "bf16", cfg.run.deepspeed):
                # this rank's CPU has no native bf16 (rule: fp32): join rank 0's broadcast, refuse to differ from it
                mine = {"choice": "no", "source": "rule"} if self.main else None
                theirs = precision.broadcast(mine, acc.num_processes)["choice"]
                if theirs != "no":
                    raise AttrdistError(f"run.precision=auto: rank 0 chose bf16 but rank {acc.process_index}'s CPU has no "
                                        f"native bf16 (mixed CPUs in one job); pin run.precision=fp32 or bf16")
            return
        rec = None
        if self.main:
            rec = precision.previous(self.run_dir) if cfg.run.resume == "auto" else None
            if rec is None:
                fields = precision.key_fields(
                    model=to_dict(cfg.model), classes=len(self.manifest.attributes), task=type(self.task).__name__,
                    image_size=cfg.data.image_size, per_rank_batch=cfg.data.batch_size // acc.num_processes,
                    threads=self.rt.threads)
                try:
                    rec = precision.decide(fields, lambda: self.probe_precision(model))
                except Exception as e:  # a probe that cannot run must not stop the run: the rule (bf16) holds
                    rec = {"choice": "bf16", "source": "failed", "error": f"{type(e).__name__}: {e}"[:300]}
            atomic.write_json(self.run_dir / "precision.json", rec)
        rec = precision.broadcast(rec, acc.num_processes)
        log.info("%s", precision.describe(rec))
        if rec["choice"] == "no":
            precision.use_fp32(acc)
        self.rt = replace(self.rt, mixed_precision=str(acc.mixed_precision))
        self.precision_pending = False

    def probe_precision(self, model: torch.nn.Module) -> dict:
        """{"no": [s...], "bf16": [s...]}: forward + loss + backward of a copy of `model` on this rank's first
        training batch (decoded and augmented as in training), fp32 and bf16 autocast alternated
        (precision.time_alternating). The copy keeps the model's weights and BatchNorm statistics untouched, and
        torch's RNG is restored after: the run trains exactly as without the probe."""
        import copy

        cfg, dev = self.cfg, self.acc.device
        b = cfg.data.batch_size // self.acc.num_processes
        ds = self.task.dataset(self.data.train_reader, train=True, pixels_in_workers=self.pixels_in_workers,
                               image_dtype=torch.float32)
        batch = self.task.collate([ds[(i % self.data.n_train, 0)] for i in range(b)])
        fmt = torch.channels_last if cfg.model.channels_last else torch.contiguous_format
        with torch.random.fork_rng(devices=[]):
            probe = copy.deepcopy(model).train()
            params = [p for p in probe.parameters() if p.requires_grad]

            def step(autocast):
                loss, _ = self.task.forward_loss(probe, batch, StepEnv(dev, autocast, fmt, None))
                loss.backward()
                for p in params:
                    p.grad = None

            bf16 = lambda: torch.autocast(device_type=dev.type, dtype=torch.bfloat16)  # noqa: E731
            return precision.time_alternating({"no": lambda: step(contextlib.nullcontext), "bf16": lambda: step(bf16)})

    def apply_norm_options(self, model: torch.nn.Module) -> None:
        """model.freeze_bn_stats / model.sync_bn: BatchNorm that does not depend on how the global batch is
        split over ranks. Before acc.prepare (DDP checks SyncBatchNorm when it wraps the model)."""
        m, W, dev = self.cfg.model, self.acc.num_processes, self.acc.device.type
        if m.freeze_bn_stats:
            n = freeze_batchnorm_stats(model)
            log.info("model.freeze_bn_stats: %d BatchNorm layers normalise with their running statistics in training "
                     "(eval mode; weights still train)", n)
        if not m.sync_bn:
            return
        if W == 1:
            log.info("model.sync_bn: 1 process, BatchNorm already sees the whole global batch (nothing converted)")
            return
        if dev not in ("cuda", "xpu", "hpu"):
            raise AttrdistError(f"model.sync_bn=true with {W} {dev} processes: torch's SyncBatchNorm works on GPUs only "
                                f"(DDP refuses it in a {dev} module); on CPU ranks use model.freeze_bn_stats=true (no "
                                f"batch statistics) or one process")
        n = convert_sync_batchnorm(model)
        log.info("model.sync_bn: %d BatchNorm layers -> SyncBatchNorm (statistics over the global batch of %d ranks)",
                 n, W)

    def dataset(self, reader: ShardReader, train: bool):
        """(index, epoch) -> one sample of the task, decoded and (train) augmented in the loader's workers."""
        return self.task.dataset(reader, train=train, pixels_in_workers=self.pixels_in_workers,
                                 image_dtype=worker_image_dtype(self.cfg.data.worker_dtype, self.rt.mixed_precision))

    @property
    def pixels_in_workers(self) -> bool:
        """data.pixel_stage: auto = in the workers on a CPU device (the training process's threads are busy
        with the step there), else on the device; always on the device with data.decode=device (the workers
        hand over JPEG bytes, not pixels)."""
        where = self.cfg.data.pixel_stage
        on_cpu = self.acc.device.type == "cpu" and self.cfg.data.decode == "workers"
        return where == "workers" or (where == "auto" and on_cpu)

    def loader(self, ds, plan: BatchPlan):
        return make_loader(ds, plan, self.workers, pin_memory=self.rt.device == "cuda",
                           malloc=self.cfg.run.malloc, collate_fn=self.task.collate)

    @property
    def deepspeed(self) -> bool:
        return bool(self.cfg.run.deepspeed)

    def autocast(self):
        """Mixed precision for a forward outside the engine (the unwrapped model): under DeepSpeed the
        engine autocasts its own forward and accelerate's autocast is off."""
        if self.deepspeed and self.rt.mixed_precision in ("bf16", "fp16"):
            dtype = torch.bfloat16 if self.rt.mixed_precision == "bf16" else torch.float16
            return torch.autocast(device_type=self.acc.device.type, dtype=dtype)
        return self.acc.autocast()

    # ---------------------------------------------------------------- checkpoints
    def _meta(self, metric: float | None = None) -> dict:
        return {"epoch": self.state.epoch, "batch": self.state.batch, "samples": self.state.samples,
                "recipe": self.recipe, "attributes": list(self.manifest.attributes), "config": to_dict(self.cfg),
                "monitor": self.cfg.run.monitor, "metric": metric, "world_size": self.acc.num_processes,
                "engine": self.rt.engine, "mixed_precision": self.rt.mixed_precision, "attrdist_version": __version__}

    def save(self, pointers=("last",), metric: float | None = None) -> None:
        """Collective: every rank calls it. DDP: rank 0 writes. DeepSpeed: every rank writes its ZeRO
        partitions into the staging directory, the full weights are gathered (zero3), then rank 0 writes
        model.safetensors (consolidated: `attrdist predict` and non-DeepSpeed runs load it) and renames."""
        acc = self.acc
        if self.sync.pending:  # run.host_sync=lagged: the loop settles first, so that the state saved is exact
            raise RuntimeError(f"save at step {self.state.step} with {len(self.sync.pending)} step(s) not yet read: a bug")
        acc.wait_for_everyone()
        name = checkpoint.step_dir_name(self.state.step)
        write = not (self.ckpt_root / name).exists()  # agreed: nobody renames before the barriers below
        staged = None
        if self.deepspeed and write:
            staged = self.ckpt_root / f".{name}.staging"
            if self.main:
                shutil.rmtree(staged, ignore_errors=True)
                staged.mkdir(parents=True)
            acc.wait_for_everyone()
            try:
                self.model.save_checkpoint(str(staged / checkpoint.DEEPSPEED_DIR), tag=checkpoint.DEEPSPEED_TAG)
            except Exception as e:  # the staging directory goes at the next start (checkpoint.clean_stale)
                if not checkpoint.no_space(e):
                    raise
                raise checkpoint.no_space_error(self.ckpt_root, name) from None
        if self.deepspeed:
            model_state = acc.get_state_dict(self.model) if write else {}  # collective under zero3
        else:
            model_state = acc.unwrap_model(self.model).state_dict() if self.main else {}
        acc.wait_for_everyone()
        if self.main:
            train_state = {"loop": asdict(self.state), "thresholds": self.task.state_dict()}
            if not self.deepspeed:  # DeepSpeed's optimizer partitions (and loss scale) are in deepspeed/
                train_state["optimizer"] = self.optimizer.state_dict()
                if self.acc.scaler is not None:  # fp16 on CUDA: the dynamic loss scale and its growth tracker
                    train_state["grad_scaler"] = self.acc.scaler.state_dict()
            path = checkpoint.save(self.ckpt_root, step=self.state.step, model_state=model_state,
                                   train_state=train_state, meta=self._meta(metric), pointers=pointers,
                                   keep=self.cfg.run.keep_checkpoints, staged=staged)
            log.info("checkpoint %s -> %s", "+".join(pointers), path.name)
        acc.wait_for_everyone()

    def maybe_resume(self) -> None:
        if self.main:  # this process holds the run directory's lock: nobody else is writing checkpoints
            removed = checkpoint.clean_stale(self.ckpt_root)
            if removed:
                log.info("removed what a killed run left half-written in %s: %s", self.ckpt_root, ", ".join(removed))
        if self.cfg.run.resume != "auto":
            return
        found = checkpoint.find_resumable(self.ckpt_root)  # AttrdistError when checkpoints exist but none is intact
        if found is None:
            log.info("run.resume=auto: no checkpoint in %s, starting fresh", self.ckpt_root)
            return
        path, meta = found
        self.acc.wait_for_everyone()  # every rank has chosen `path` before rank 0 moves damaged newer ones aside
        if self.main:
            for d in checkpoint.set_aside_damaged(self.ckpt_root, path):
                log.warning("%s: damaged, moved aside (kept for inspection, never loaded); this run trains and saves "
                            "that step again", d)
        saved_engine, saved_world, world = meta.get("engine", "ddp"), meta.get("world_size"), self.acc.num_processes
        # DDP state is whole on every rank: any world size. DeepSpeed's is partitioned by rank.
        if not (saved_engine == self.rt.engine == "ddp" or (saved_engine == self.rt.engine and saved_world == world)):
            raise AttrdistError(
                f"{path}: saved by {saved_engine} with {saved_world} processes; this run is {self.rt.engine} with "
                f"{world}. DeepSpeed's partitioned optimizer state resumes only on the same engine and world "
                f"size: relaunch that way, or start a new run from its consolidated weights with "
                f"run.init_from={path} (fresh optimizer and schedule)")
        if self.deepspeed:
            self.model.load_checkpoint(str(path / checkpoint.DEEPSPEED_DIR), tag=checkpoint.DEEPSPEED_TAG)
            self.task.prepare(self.acc.unwrap_model(self.model))
            st = checkpoint.load_train_state(path)
        else:
            self.load_weights(path)
            st = checkpoint.load_train_state(path)
            self.optimizer.load_state_dict(st["optimizer"])
            if self.acc.scaler is not None and "grad_scaler" in st:
                self.acc.scaler.load_state_dict(st["grad_scaler"])
        self.state = LoopState(**st["loop"])
        self.task.load_state_dict(st.get("thresholds", {}))
        log.info("resumed from %s: epoch %d, batch %d of the epoch, step %d, %s samples (saved by %s with world "
                 "size %s%s)", path, self.state.epoch, self.state.batch, self.state.step, self.state.samples,
                 saved_engine, saved_world, "" if saved_world == world else
                 f"; now {world}: the same global batches continue, {self.cfg.data.batch_size // world} per rank")

    def load_weights(self, ckpt_dir: Path) -> None:
        """The model weights of a checkpoint (not the optimizer); collective under DeepSpeed."""
        if self.deepspeed:  # zero3 parameters are partitioned: the engine loads its own files
            self.model.load_checkpoint(str(ckpt_dir / checkpoint.DEEPSPEED_DIR), tag=checkpoint.DEEPSPEED_TAG,
                                       load_module_only=True)
        else:
            self.acc.unwrap_model(self.model).load_state_dict(checkpoint.load_model_state(ckpt_dir))
        self.task.prepare(self.acc.unwrap_model(self.model))

    # ---------------------------------------------------------------- evaluation
    def eval_split(self, split: str) -> tuple[ShardReader, int]:
        """The reader of `split` and how many of its samples are evaluated (run.overfit_batches: the training
        samples themselves)."""
        if self.cfg.run.overfit_batches and split == self.cfg.data.train_split:
            return self.data.train_reader, self.data.n_train
        reader = ShardReader(self.manifest, split)
        return reader, min(len(reader), self.cfg.data.subset) if self.cfg.data.subset else len(reader)

    def evaluate(self, split: str, tune: bool = False) -> tuple[dict, dict]:
        """(scalar record, details) of `split`: the one ordered evaluation pass, then the task's metrics.
        Collective: every rank calls it."""
        reader, n = self.eval_split(split)
        plan = BatchPlan(n, self.data.eval_batch, self.acc.num_processes, self.acc.process_index, 0, 0,
                         shuffle=False, drop_last=False)
        tally = CorruptTally(f"eval {reader.split}")  # this (latest) evaluation's skipped samples per shard
        progress = Progress(f"eval {split}", len(plan), "batch", enabled=self.main, every_s=self.cfg.run.progress_every_s)
        outputs = evaluation_pass(self.acc, self.model, self.task, self.loader(self.dataset(reader, train=False), plan),
                                  self.env, tally, n, reader, progress=progress)
        self.state = loop.with_corrupt_shards(self.state, reader.split, tally.counts)
        bad, total = self.task.nonfinite_outputs(outputs)
        if bad:  # finite weights can still overflow in the forward: the metrics would be meaningless
            best = checkpoint.pointer_target(self.ckpt_root, "best")
            raise AttrdistError(
                f"eval on {split!r} after step {self.state.step}: the model's scores are NaN/Inf for {bad} of "
                f"{total} images: its weights have diverged ({self.state.nonfinite} optimizer steps were skipped for "
                f"a NaN/Inf loss so far); lower optim.lr or check the data, then start again"
                + (f", e.g. from the best checkpoint so far with run.init_from={best}" if best else ""))
        return self.task.evaluate(split, outputs, tune=tune)

    @torch.no_grad()
    def measure_inference(self, split: str, batches: int = 10, warmup: int = 3) -> dict:
        """Model forward images/s on one real eval batch after `warmup` batches (decode excluded)."""
        model = self.acc.unwrap_model(self.model).eval()
        reader, n = self.eval_split(split)
        b = max(1, min(self.data.eval_batch // self.acc.num_processes, n))
        x = self.task.inference_input(self.dataset(reader, train=False), n, b, self.env)
        sync = torch.cuda.synchronize if self.rt.device == "cuda" else (lambda: None)
        for i in range(warmup + batches):
            if i == warmup:
                sync()
                t0 = time.perf_counter()
            with self.autocast():
                model(x)
        sync()
        seconds = time.perf_counter() - t0
        model.train()
        return {"images_per_s": b * batches / seconds, "batch": b, "batches": batches, "warmup": warmup}

    # ---------------------------------------------------------------- training
    def train(self) -> Path:
        self.maybe_resume()
        cfg, acc, B, ga = self.cfg, self.acc, self.cfg.data.batch_size, self.cfg.optim.grad_accum
        handlers = interrupt.install()  # SIGTERM/SIGUSR2: checkpoint at the end of the step, then stop
        if cfg.run.debug:
            torch.autograd.set_detect_anomaly(True)
        hooks = log_shapes_once(acc.unwrap_model(self.model)) if cfg.run.debug else []
        t_start = time.perf_counter()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        # buffers change in the forward (BatchNorm running statistics): a skipped step puts them back too, or one
        # overflowing forward would leave NaN statistics behind (measured: every later eval NaN)
        self.buffers = list(self.model.buffers())
        self.saved_buffers = [b.detach().clone() for b in self.buffers]
        self.nan_steps = _fault_nan_steps()
        self.corrupt_start = self.state.corrupt  # data.max_corrupt counts this launch's skipped samples
        self.tally = CorruptTally("train", dict(self.state.corrupt_shards.get("training", {})))
        epoch_batches = self.data.step_batches(ga)
        self.rates_start, self.steps_start = len(self.step_rates), self.state.step
        stop = loop.steps_done(self.state, cfg.run.max_steps)  # resumed at the end: nothing left to train
        try:
            while self.state.epoch < cfg.run.epochs and not stop:
                plan = self.data.train_plan(cfg.data, acc.num_processes, acc.process_index, cfg.run.seed,
                                            self.state.epoch, self.state.batch, shuffle=not cfg.run.overfit_batches)
                self.model.train()
                t_epoch = t_step = time.perf_counter()
                step_errors, step_samples = [], []
                self.bar = Progress("train", self.data.total_steps, "step", enabled=self.main, initial=self.state.step,
                                    lines=False)  # a bar on a terminal; the log_every lines carry the rate and ETA
                for batch in self.loader(self.train_ds, plan):
                    if self.state.batch >= epoch_batches:
                        break
                    micro = self.state.batch % ga
                    lr = cfg.optim.lr * lr_factor(self.state.step, cfg.schedule, self.data.steps_per_epoch,
                                                  self.data.total_steps)
                    loss, parts = self.micro_batch(batch, micro, lr)
                    self.input_check.log_once(batch)
                    for h in hooks:
                        h.remove()
                    hooks = []
                    if cfg.run.log_samples:  # collective, every micro-batch: rank r holds slice r of the global batch
                        step_samples.append(acc.gather(batch["index"].to(acc.device)).cpu())
                    step_errors += batch["errors"]  # counted (per shard, all ranks) once the step is taken
                    self.state = loop.after_batch(self.state, B)
                    if micro < ga - 1:
                        continue
                    step = self.optimizer_step(loss, parts, step_errors, lr)
                    now = time.perf_counter()
                    step.rec.update(img_per_s=B * ga / max(now - t_step, 1e-9), time=now - t_start)
                    self.step_time += now - t_step
                    t_step = now
                    if cfg.run.log_samples:
                        step.rec["samples"] = torch.cat(step_samples).tolist()
                    self.agree(step, handlers)
                    step_errors, step_samples = [], []
                    if loop.steps_done(self.state, cfg.run.max_steps):
                        stop = True
                        break
                self.settle(handlers)  # run.host_sync=lagged: the last step read, before evaluation and checkpoints
                self.bar.close()
                self.bar = None
                self.timings["train_s"] += time.perf_counter() - t_epoch
                stop = self.end_of_epoch(loop.epoch_done(self.state, epoch_batches), stop, t_start)
        except BaseException:
            self.record_pending()
            raise
        self.check_ranks_agree()
        interrupt.restore(handlers)
        self.timings["wall_s"] = time.perf_counter() - t_start
        return self.finish()

    def micro_batch(self, batch: dict, micro: int, lr: float) -> tuple[torch.Tensor, dict]:
        """Forward and backward of this rank's slice of one global batch (micro-batch `micro` of the step)."""
        acc, st, ga = self.acc, self.state, self.cfg.optim.grad_accum
        for g in self.optimizer.param_groups:  # set before backward: DeepSpeed's engine steps inside acc.backward
            g["lr"] = lr
        if micro == 0:
            _copy(self.saved_buffers, self.buffers)
        # dropout & co. draw from torch's global RNG: key it by position, so resume needs no RNG state
        seed_rng(rnglib.fold(self.cfg.run.seed, rnglib.DROPOUT, st.epoch, st.batch, acc.process_index), acc.device)
        with acc.accumulate(self.model):  # DDP: no_sync on all but the last micro-batch of a step
            if acc.sync_gradients != (micro == ga - 1):
                raise RuntimeError(f"accumulation out of step: batch {st.batch}, accelerate step {acc.step}")
            loss, parts = self.task.forward_loss(self.model, batch, self.env)
            if st.step + 1 in self.nan_steps:  # test hook (ATTRDIST_FAULT_NAN_STEPS): this step's loss is NaN
                loss = loss * float("nan")
            acc.backward(loss)  # divided by optim.grad_accum inside (accelerate; DeepSpeed's engine)
        return loss, parts

    def optimizer_step(self, loss: torch.Tensor, parts: dict, step_errors: list, lr: float) -> agreement.Step:
        """Clip, agree with every rank, then step or skip. One small all-reduce per step, before the optimizer
        step: the loss for the log; the non-finite flag, corrupt count and stop signal summed over ranks, so
        every rank skips the same steps and saves the same step. run.host_sync=step reads the sums here and
        steps or skips from the host; lagged decides on the device and leaves the sums to be read later
        (attrdist.train.agreement). Returns the step, for `after_step` once its agreement is read."""
        acc, W, clip = self.acc, self.acc.num_processes, self.cfg.optim.clip_grad_norm
        grad_norm = acc.clip_grad_norm_(self.params, clip) if clip else None
        host = [float(len(step_errors)), float(interrupt.requested())]
        if self.sync.lagged:
            if grad_norm is None:
                grad_norm = agreement.total_norm(self.params, acc.device)
            flags = agreement.flags(loss, parts, grad_norm, host)
        else:
            flags = torch.tensor([loss.detach().float().item(), *(float(v) for v in parts.values()),
                                  float(not self.step_is_finite(loss, grad_norm, self.params)), *host], device=acc.device)
        red = acc.reduce(flags, "sum") if W > 1 else flags
        if self.sync.lagged and agreement.state_ready(self.optimizer):  # no host read: the device steps or skips
            agreement.step_unless(red[-3] > 0, self.optimizer, self.buffers, self.saved_buffers)
            values = agreement.DeviceRead(torch.cat([red, grad_norm.detach().float().reshape(1)]))
        else:
            values = red.tolist() + [None if grad_norm is None else float(grad_norm)]
            if values[-4]:
                self.skip_step()
                _copy(self.buffers, self.saved_buffers)
            else:
                self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.state = loop.step_taken(self.state)
        return agreement.Step({"type": "train", "step": self.state.step, "epoch": self.state.epoch, "lr": lr},
                              tuple(parts), list(step_errors), values)

    def agree(self, step: agreement.Step, handlers: dict) -> None:
        """Hand `step` over to run.host_sync's reader and act on every step read now (`after_step`: this one, or
        the one before when lagged); then a periodic checkpoint, once nothing is pending."""
        for done in self.sync.push(step):
            self.after_step(done, handlers)
        if self.cfg.run.compile and step.rec["step"] == self.steps_start + 1:
            log.info("run.compile: the first step of this launch took %.1f s from the start of the loop (it compiles "
                     "the forward and backward; the first evaluation compiles the eval-mode forward)", step.rec["time"])
        if itstime(self.state.step, self.cfg.run.ckpt_every_steps):
            self.settle(handlers)
            self.save()

    def settle(self, handlers: dict) -> None:
        """Read and act on the step still pending under run.host_sync=lagged (nothing in step mode): before
        whatever needs the loop state exact (a checkpoint, the end of the epoch, evaluation, the end)."""
        for done in self.sync.flush():
            self.after_step(done, handlers)

    def record_pending(self) -> None:
        """The training loop is leaving on an exception: the pending step's record still goes to metrics.jsonl
        (its limits and checkpoints do not run: no collective on an error path). An error reading the device
        (it may be why the loop is leaving) drops the record: the exception on its way out says more."""
        try:
            for done in self.sync.flush():
                self.tracker.log(self.step_record(done))
        except Exception as e:
            log.warning("the last step's record is lost (%s: %s)", type(e).__name__, e)

    def step_record(self, step: agreement.Step) -> dict:
        """The metrics.jsonl record of a step whose agreement has been read; applies it to the loop state first
        (`loop.step_agreed`: the skipped and corrupt counts)."""
        W, v = self.acc.num_processes, step.values
        self.state = loop.step_agreed(self.state, skipped=step.skipped, corrupt=step.corrupt)
        h = step.rec
        rec = {"type": "train", "step": h["step"], "epoch": h["epoch"], "loss": v[0] / W, "lr": h["lr"]}
        rec.update({k: v[1 + i] / W for i, k in enumerate(step.parts)})
        if self.cfg.optim.clip_grad_norm and step.grad_norm is not None:
            rec["grad_norm"] = step.grad_norm
        if step.skipped:
            rec.update(skipped=True, nonfinite_steps=self.state.nonfinite)
        rec.update({k: x for k, x in h.items() if k not in rec})  # img_per_s, time, samples
        return rec

    def after_step(self, step: agreement.Step, handlers: dict) -> None:
        """Record the step; then the policies that may end the run (non-finite streak, corrupt samples, a
        stop signal: each saves a checkpoint first where training would otherwise be lost). Under
        run.host_sync=lagged this runs one step late: a save first reads the step pending after it, so the
        checkpoint holds every step taken (its number is the later step's)."""
        cfg, rec = self.cfg, self.step_record(step)
        if step.corrupt:  # some rank skipped corrupt samples: count and log them all (collective)
            count_corrupt(self.acc, self.tally, step.errors)
            self.state = loop.with_corrupt_shards(self.state, "training", self.tally.counts)
        self.step_rates.append(rec["img_per_s"])
        self.tracker.log(rec)
        if self.bar is not None:
            self.bar.update(1, loss=f"{rec['loss']:.4f}")
        if itstime(rec["step"], cfg.run.log_every, first=True):  # ETA: this launch's training-step rate (evaluations extra)
            log.info("epoch %d step %d/%d loss %.4f lr %.2e %.0f img/s | %s", rec["epoch"], rec["step"],
                     self.data.total_steps, rec["loss"], rec["lr"], rec["img_per_s"],
                     rate_eta(len(self.step_rates) - self.rates_start, self.data.total_steps - self.steps_start,
                              self.step_time, "step"))
        if rec.get("skipped"):
            self.after_nonfinite_step(rec)
        st = self.state
        if st.corrupt - self.corrupt_start > cfg.data.max_corrupt:
            self.settle(handlers)
            self.save()  # no training is lost: fix the shards, then resume
            st = self.state
            since = f" since the resume ({st.corrupt} in the whole run)" if self.corrupt_start else ""
            raise AttrdistError(f"{self.manifest.root}: {st.corrupt - self.corrupt_start} samples failed to decode{since}, "
                                f"more than data.max_corrupt={cfg.data.max_corrupt}; per shard: {self.tally.worst()} "
                                f"(the warnings above say why); restore or re-pack those shards, or raise "
                                f"data.max_corrupt to skip them, then continue with --resume (checkpoint saved at "
                                f"step {st.step})")
        if step.stop:  # a rank was asked to stop: every rank saves this step (lagged: the next), then stops
            signum = interrupt.requested() or step.stop  # else: another rank's
            self.settle(handlers)
            self.save()
            log.warning("stopped by signal %d after step %d (checkpoint saved); resume with --resume "
                        "(run.run_dir=%s)", signum, self.state.step, self.run_dir)
            interrupt.restore(handlers)
            raise interrupt.Interrupted(signum, self.state.step, self.run_dir)

    def end_of_epoch(self, epoch_done: bool, stop: bool, t_start: float) -> bool:
        """After an epoch (or a stop inside one): evaluate when it is time, save (best, last, permanent), decide
        on early stopping. Returns whether training stops."""
        cfg = self.cfg
        if epoch_done:
            self.state = loop.after_epoch(self.state)
        epoch = self.state.epoch
        keep = (f"epoch-{epoch:04d}",) if epoch_done and itstime(epoch, cfg.run.ckpt_every_epochs) else ()
        if not (epoch_done and itstime(epoch, cfg.run.eval_every, total=cfg.run.epochs, last=True) or stop):
            if keep:
                self.save(pointers=("last", *keep))
            elif not epoch_done and not stop:  # a rank leaving the loop alone would hang the others
                raise RuntimeError(f"epoch {epoch}: the train loader ended after global batch {self.state.batch} of "
                                   f"{self.data.step_batches(cfg.optim.grad_accum)} (its batch plan yields every "
                                   f"batch: a bug)")
            return stop
        split, monitor = self.val_split(), self.monitor()
        rec, _ = self.evaluate(split)
        rec.update(type="eval", step=self.state.step, epoch=epoch, time=time.perf_counter() - t_start)
        if monitor not in rec:
            raise AttrdistError(f"run.monitor={monitor!r} is not an eval metric; have: "
                                f"{', '.join(k for k in rec if '/' in k and ':' not in k)}")
        self.state = loop.after_eval(self.state, loop.monitored(rec[monitor], self.task.higher_is_better(monitor)))
        self.tracker.log(rec)
        log.info("eval epoch %d: %s", epoch, "  ".join(
            f"{k}={v:.4f}" for k, v in rec.items() if isinstance(v, float) and ":" not in k
            and k.split("/")[-1] in (*self.task.log_keys(), "loss")))
        improved = loop.improved(self.state)
        self.save(pointers=("last", "best", *keep) if improved else ("last", *keep), metric=rec[monitor])
        if self.main and itstime(epoch, cfg.run.curves_every, total=cfg.run.epochs, last=True):
            plot_curves(self.run_dir, self.task.headline_keys(split))
        if loop.patience_exhausted(self.state, cfg.run.patience):
            log.info("early stopping: %s has not improved for %d evaluations (best %.4f at step %d)",
                     monitor, self.state.bad_evals, abs(self.state.best), self.state.best_step)
            self.state = replace(self.state, stopped_early=True)
            return True
        return stop

    def val_split(self) -> str:
        """The split evaluated during training: data.val_split, or the training samples under run.overfit_batches."""
        return self.cfg.data.train_split if self.cfg.run.overfit_batches else self.cfg.data.val_split

    def monitor(self) -> str:
        """run.monitor; under run.overfit_batches the same metric on the training samples."""
        monitor, d = self.cfg.run.monitor, self.cfg.data
        if self.cfg.run.overfit_batches and monitor.startswith(f"{d.val_split}/"):
            return f"{d.train_split}/" + monitor.split("/", 1)[1]
        return monitor

    def check_ranks_agree(self) -> None:
        """Every rank must have taken the same steps (the plan makes it so): say it, and check it."""
        acc, st = self.acc, self.state
        done = torch.tensor([[st.step, st.samples]], dtype=torch.int64, device=acc.device)
        per_rank = (acc.gather(done) if acc.num_processes > 1 else done).tolist()
        log.info("train loop done: optimizer steps per rank %s (global samples seen, per rank: %s)",
                 [r[0] for r in per_rank], [r[1] for r in per_rank])
        if any(r != per_rank[0] for r in per_rank):
            raise RuntimeError(f"ranks disagree on (steps, samples) at the end of training: {per_rank}")

    def step_is_finite(self, loss: torch.Tensor, grad_norm, params: list) -> bool:
        """Whether this rank's loss and the step's gradients are finite (no NaN/Inf). Under DDP the
        gradients are already averaged over ranks here, so all ranks see the same norm. With fp16 loss
        scaling a gradient overflow is the scaler's business (it skips the step and lowers the scale;
        routine while the scale calibrates): only the loss counts. DeepSpeed's engine has already taken
        its step inside backward and skips a step with non-finite gradients itself, as attrdist does."""
        if not bool(torch.isfinite(loss.detach()).all()):
            return False
        if self.rt.mixed_precision == "fp16":
            return True
        if self.deepspeed:
            return self.model.was_step_applied()
        if grad_norm is None:  # optim.clip_grad_norm=0: nothing computed the norm
            grads = [p.grad for p in params if p.grad is not None]
            grad_norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())
        return bool(torch.isfinite(torch.as_tensor(grad_norm)))

    def skip_step(self) -> None:
        """Leave the weights and the optimizer state as they are: some rank's loss or the gradients of
        this step are not finite. fp16: do what GradScaler.step does on an overflow (lower the scale,
        forget this step's unscale). DeepSpeed: its engine has stepped already; it must have skipped."""
        if self.deepspeed:
            if self.model.was_step_applied():
                raise AttrdistError(
                    f"step {self.state.step + 1}: the loss is not finite (NaN/Inf) but DeepSpeed applied the update "
                    f"(its overflow check saw finite gradients), so the weights may be damaged; lower optim.lr or check "
                    f"the data, then resume from the last checkpoint {self._last_checkpoint()}")
            return
        scaler = self.acc.scaler
        if scaler is not None:
            scaler.update(scaler.get_scale() * scaler.get_backoff_factor())

    def _last_checkpoint(self) -> str:
        last = checkpoint.pointer_target(self.ckpt_root, "last")
        return f"{last} with --resume (run.run_dir={self.run_dir})" if last else "(none written yet: start again)"

    def after_nonfinite_step(self, rec: dict) -> None:
        """Log a skipped step (rank 0); stop the run once more than optim.max_nonfinite steps in a row were
        skipped (every rank: the count is agreed through the step's all-reduce). `rec`'s step: the state has
        counted the steps queued after it already under run.host_sync=lagged, its streak is this step's."""
        st, limit, n = self.state, self.cfg.optim.max_nonfinite, rec["step"]
        if self.main:
            log.warning("step %d: loss %s%s not finite: optimizer step skipped, weights and optimizer state unchanged "
                        "(%d in a row, %d in this run; optim.max_nonfinite=%d in a row)", n, rec["loss"],
                        f", gradient norm {rec['grad_norm']}" if "grad_norm" in rec else " or gradients",
                        st.nonfinite_streak, st.nonfinite, limit)
        if st.nonfinite_streak > limit:
            raise AttrdistError(
                f"step {n}: the loss or gradients were NaN/Inf in {st.nonfinite_streak} optimizer steps in a row, "
                f"more than optim.max_nonfinite={limit}; all were skipped, so the weights are those of step "
                f"{n - st.nonfinite_streak}; lower optim.lr (or check the data), then resume from the last "
                f"checkpoint {self._last_checkpoint()}")

    def finish(self) -> Path:
        """Reload the best checkpoint, evaluate val (tuning thresholds) and test, write the report."""
        try:
            best = checkpoint.resolve(self.ckpt_root, "best")
            if not self.deepspeed:  # DeepSpeed loads its own partition files (verified at resume)
                checkpoint.verify(best)
        except AttrdistError as e:  # e.g. damaged on disk before a resume: the last checkpoint is this run's own
            best = checkpoint.resolve(self.ckpt_root, "last")
            log.warning("best checkpoint unusable (%s); the final evaluation and the report use the last checkpoint "
                        "%s instead", e, best)
        self.load_weights(best)
        val, results = self.val_split(), {}
        rec, details = self.evaluate(val, tune=True)
        results["val"] = {**rec, "_details": details}
        test = self.cfg.data.test_split
        if test and self.manifest.has_split(test) and not self.cfg.run.overfit_batches:
            rec, details = self.evaluate(test)
            results["test"] = {**rec, "_details": details}
        if self.main or self.cfg.run.deepspeed == "zero3":  # zero3: a forward gathers parameters from every rank
            self.timings["inference"] = self.measure_inference(val)
        rates = self.step_rates[5:] or self.step_rates
        self.timings.update(step_img_s_median=statistics.median(rates) if rates else None, steps_timed=len(rates))
        if self.main:
            plot_curves(self.run_dir, self.task.headline_keys(val))
            path = report.write(self.run_dir, task=self.task, recipe=self.recipe, cfg=self.cfg, rt=self.rt,
                                results=results, state=self.state, timings=self.timings, best_dir=best,
                                n_train=self.data.n_train, model=self.acc.unwrap_model(self.model))
            log.info("report: %s", path)
            log.info("headline: %s", self.task.headline_text(results))
        self.tracker.close()
        self.acc.wait_for_everyone()
        self.acc.end_training()
        return self.run_dir


def seed_rng(seed: int, device: torch.device) -> None:
    """What torch.manual_seed does for the generators this run draws from (the CPU's, and the device's on
    CUDA), without also seeding every other backend's (CUDA, XPU, MTIA, ...): 0.0013 ms per call here against
    torch.manual_seed's 0.11 ms (bench/trainer_profile.py). The streams are the same as torch.manual_seed's."""
    torch.default_generator.manual_seed(seed)
    if device.type == "cuda":
        torch.cuda.manual_seed(seed)


@torch.no_grad()
def _copy(dst: list[torch.Tensor], src: list[torch.Tensor]) -> None:
    """dst[i] <- src[i]: one multi-tensor kernel call (torch._foreach_copy_) instead of a Python loop of copy_
    (EfficientNet-B0: 147 BatchNorm buffers every step; bench/timm_peer.py)."""
    if dst:
        torch._foreach_copy_(dst, src)


def _fault_nan_steps() -> set[int]:
    """TEST HOOK, the only place it is read: ATTRDIST_FAULT_NAN_STEPS=3,4 makes the loss of optimizer
    steps 3 and 4 NaN, so tests can inject a NaN loss into a run that then carries on (a diverging
    optim.lr injects NaN for real, but for good). Unset in normal use."""
    text = os.environ.get("ATTRDIST_FAULT_NAN_STEPS", "")
    try:
        return {int(v) for v in text.split(",") if v.strip()}
    except ValueError:
        raise AttrdistError(f"ATTRDIST_FAULT_NAN_STEPS={text!r}: a test hook taking comma-separated optimizer steps "
                            f"(e.g. 3,4); unset it") from None
