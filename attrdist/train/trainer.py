"""The imperative shell: one training loop on accelerate (1 process, N-process DDP).

    python recipes/coconut.py                      # 1 process: CUDA > MPS > CPU
    accelerate launch recipes/coconut.py           # whatever accelerate is configured for
    python -m launch local recipes/coconut.py --nproc 2   # N CPU ranks that really are N (gloo)

Everything random is keyed (see attrdist.core.rng); the loop state saved in a checkpoint is only
(epoch, batch within the epoch, optimizer step, early-stopping counters). The pure parts live
elsewhere: data order (data.py), transforms, losses, metrics, schedules.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import socket
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from attrdist.train import checkpoint, interrupt, shm_allreduce
from attrdist.core import rng as rnglib
from attrdist.core.config import Config, to_dict, to_json
from attrdist.core.order import BatchPlan
from attrdist.data.samples import SampleDataset, batch_images, collate, worker_image_dtype
from attrdist.data.loader import make_loader
from attrdist.errors import AttrdistError
from attrdist.models import build_model, convert_sync_batchnorm, count_parameters, freeze_batchnorm_stats
from attrdist.train.runtime import make_accelerator
from attrdist.core.schedules import lr_factor
from attrdist.core.tasks import make_task
from attrdist.data.shards import Manifest, ShardReader, load_manifest
from attrdist.train.tracking import Tracker, plot_curves

log = logging.getLogger("attrdist")


@dataclass
class LoopState:
    epoch: int = 0
    batch: int = 0  # global batches done in `epoch`
    step: int = 0  # optimizer steps done
    samples: int = 0
    best: float = -math.inf
    best_step: int = -1
    bad_evals: int = 0
    corrupt: int = 0
    corrupt_shards: dict = field(default_factory=dict)  # {"training": {shard file: skipped}, eval split: ...}
    stopped_early: bool = False
    nonfinite: int = 0  # optimizer steps skipped for a NaN/Inf loss or gradient, in total
    nonfinite_streak: int = 0  # ... in a row, up to the last step


def setup_logging(run_dir: Path | None, rank: int) -> None:
    fmt = logging.Formatter(f"%(asctime)s [rank{rank}] %(levelname)s %(message)s", "%H:%M:%S")
    log.handlers.clear()
    log.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    h = logging.StreamHandler(sys.stdout)
    h.setFormatter(fmt)
    log.addHandler(h)
    if run_dir is not None and rank == 0:
        fh = logging.FileHandler(run_dir / "train.log")
        fh.setFormatter(fmt)
        log.addHandler(fh)
    log.propagate = False


def resolve_run_dir(cfg: Config, acc) -> Path:
    """Same directory on every rank (rank 0 decides)."""
    from accelerate.utils import broadcast_object_list

    r = cfg.run
    if r.run_dir:
        chosen = r.run_dir
    else:
        base = Path(r.out_dir)
        existing = sorted(base.glob(f"{r.name}-2*")) if base.is_dir() else []
        if r.resume == "auto" and existing:
            chosen = str(existing[-1])
        else:
            chosen = str(base / f"{r.name}-{time.strftime('%Y%m%d-%H%M%S')}")
    obj = [chosen, _lock_run_dir(Path(chosen)) if acc.is_main_process else None]
    if acc.num_processes > 1:
        broadcast_object_list(obj, from_process=0)  # rank 0's verdict on the lock reaches every rank
    run_dir = Path(obj[0])
    if obj[1]:
        raise AttrdistError(obj[1])
    has_ckpt = (run_dir / "checkpoints").is_dir() and any((run_dir / "checkpoints").glob("step-*"))
    if has_ckpt and r.resume != "auto":
        raise AttrdistError(f"{run_dir}: already holds a run; pass --resume (run.resume=auto) to continue it, "
                            f"or choose another run.run_dir")
    acc.wait_for_everyone()
    return run_dir


_RUN_LOCKS: list = []  # held for the life of the process


def _lock_run_dir(run_dir: Path) -> str | None:
    """Rank 0 holds <run_dir>/.run.lock while it runs (an fcntl lock: the kernel drops it when the
    process dies, SIGKILL included) and records itself (pid, host, start time) in .run.lock.json beside
    it, which the lock file cannot hold: contenders open it too. Returns the error when another live
    run holds the lock, naming that run."""
    from filelock import FileLock, Timeout

    from attrdist import atomic

    run_dir.mkdir(parents=True, exist_ok=True)
    lock, holder_file = FileLock(str(run_dir / ".run.lock")), run_dir / ".run.lock.json"
    try:
        lock.acquire(timeout=0)
    except Timeout:
        return (f"{run_dir}: another run is writing to this directory right now: {_lock_holder(holder_file)} (it holds "
                f"{run_dir}/.run.lock); wait for it to end or stop it, or choose another run.run_dir")
    _RUN_LOCKS.append(lock)
    atomic.write_json(holder_file, {"pid": os.getpid(), "host": socket.gethostname(),
                                    "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "argv": sys.argv})
    return None


def _lock_holder(holder_file: Path) -> str:
    """Who holds a run directory's lock, from the .run.lock.json it wrote; a holder on another host is
    said to be there: it may be alive on that node, which this one cannot check."""
    try:
        h = json.loads(holder_file.read_text())
        pid, host, started = int(h["pid"]), str(h["host"]), str(h["started"])
    except (OSError, ValueError, KeyError, TypeError):
        return f"holder unknown ({holder_file.name} is missing or unreadable)"
    if host == socket.gethostname():
        return f"pid {pid} on this host ({host}), started {started}; `kill {pid}` stops it (in its training loop it saves a checkpoint first)"
    return (f"pid {pid} on host {host}, another node, started {started}: the run may be alive there (check on {host}; "
            f"this node cannot see its processes)")


def debug_config(cfg: Config) -> Config:
    """run.debug: a few steps on a small subset, one eval, no workers."""
    b = cfg.data.batch_size
    return replace(cfg, data=replace(cfg.data, subset=max(4 * b, 8), num_workers=0),
                   run=replace(cfg.run, epochs=1, max_steps=3, eval_every=1, log_every=1))


def build_optimizer(cfg, model: torch.nn.Module, fused: bool = True) -> torch.optim.Optimizer:
    """AdamW / Adam / SGD with no weight decay on biases and norms. `fused`: torch's single-kernel
    implementation (CPU and CUDA), ~4x faster steps than the default on CPU (ResNet-18: 4.7 vs 20.8 ms,
    bench/train_step.py); off under DeepSpeed, which steps its own flattened partitions."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    params = [p for g in groups for p in g["params"]]
    kw = {"fused": True} if fused and params and all(p.device.type in ("cpu", "cuda") for p in params) else {}
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, **kw)
    if cfg.name == "adam":  # Adam's L2-style weight decay, as in the experiment reports
        return torch.optim.Adam(groups, lr=cfg.lr, **kw)
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, **kw)


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
        self.cfg, self.recipe = cfg, recipe
        self.acc, self.rt = make_accelerator(cfg.run, cfg.optim, cfg.data.batch_size)
        setup_logging(None, self.acc.process_index)
        self.run_dir = resolve_run_dir(cfg, self.acc)
        setup_logging(self.run_dir, self.acc.process_index)
        self.main = self.acc.is_main_process
        log.info("attrdist %s recipe: %s | run dir: %s", _version(), recipe, self.run_dir)
        log.info("runtime: %s", self.rt.describe())
        if self.acc.num_processes > 1:
            log.info("distributed run verified: %d ranks (%s, backend %s)", self.rt.world_size,
                     self.rt.distributed_type, self.rt.backend)
        log.info("config:\n%s", to_json(cfg))
        if self.main:
            from attrdist import atomic

            atomic.write_json(self.run_dir / "config.json", {"recipe": recipe, **to_dict(cfg)})

        self.manifest: Manifest = load_manifest(cfg.data.shards)
        self.attributes = self.manifest.attributes
        fields = [cfg.data.labels, *[f for f in cfg.data.eval_labels if f != cfg.data.labels]]
        for f in fields:
            if f not in self.manifest.label_fields:
                raise AttrdistError(f"{self.manifest.root}/manifest.json: no label field {f!r} "
                                    f"(have {self.manifest.label_fields}); set data.labels / data.eval_labels")
        self.fields = fields
        self.task = make_task(cfg.data.task)
        B, W = cfg.data.batch_size, self.acc.num_processes
        if B % W:
            raise AttrdistError(f"data.batch_size={B} is the GLOBAL batch and must be divisible by the {W} processes")
        self.eval_batch = cfg.data.eval_batch_size or 2 * B
        if self.eval_batch % W:
            self.eval_batch += W - self.eval_batch % W

        torch.manual_seed(cfg.run.seed)
        model = build_model(cfg.model, len(self.attributes), list(self.attributes))
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
        self.raw_model = model
        optimizer = build_optimizer(cfg.optim, model, fused=cfg.optim.fused and not cfg.run.deepspeed)
        self.model, self.optimizer = self.acc.prepare(model, optimizer)
        if self.rt.allreduce == "shm" and isinstance(self.model, torch.nn.parallel.DistributedDataParallel):
            shm_allreduce.register(self.model)
        if self.deepspeed:
            from attrdist.train import zero

            zero.use_weights_only_loads(self.model)  # DeepSpeed's own reader unpickles with weights_only=False

        train_split = cfg.data.train_split
        self.train_reader = ShardReader(self.manifest, train_split)
        overfit = cfg.run.overfit_batches
        n = len(self.train_reader)
        if cfg.data.subset:
            n = min(n, cfg.data.subset)
        if overfit:
            n = min(n, overfit * B)
        self.n_train = n
        self.batches_per_epoch = n // B
        if self.batches_per_epoch < cfg.optim.grad_accum:
            raise AttrdistError(f"split {train_split!r} has {n} samples: fewer than one optimizer step of "
                                f"{B} x {cfg.optim.grad_accum}; lower data.batch_size")
        self.steps_per_epoch = self.batches_per_epoch // cfg.optim.grad_accum
        self.total_steps = self.steps_per_epoch * cfg.run.epochs
        if cfg.run.max_steps:
            self.total_steps = min(self.total_steps, cfg.run.max_steps)
        log.info("train split %r: %d samples, global batch %d (%d per rank x %d ranks), %d batches/epoch; "
                 "the last %d samples of each epoch's order are dropped (incomplete global batch)",
                 train_split, n, B, B // W, W, self.batches_per_epoch, n - self.batches_per_epoch * B)
        self.train_ds = self.make_dataset(self.train_reader, train=not overfit)
        if isinstance(self.train_ds, SampleDataset):
            log.info("input: %d workers decode + crop/flip; colour, normalisation and erasing run %s "
                     "(data.pixel_stage=%s)", cfg.data.num_workers,
                     f"in the workers, {str(self.worker_dtype).split('.')[-1]} batches (data.worker_dtype="
                     f"{cfg.data.worker_dtype})" if self.pixels_in_workers else
                     f"batched on {self.acc.device.type}, from uint8 batches", cfg.data.pixel_stage)
        self.prior = {f: self.manifest.label_prior(train_split, f) for f in self.fields}
        self.state = LoopState()
        self.tracker = Tracker(self.run_dir, enabled=self.main)
        self.ckpt_root = self.run_dir / "checkpoints"
        self.timings = {"train_s": 0.0, "train_samples": 0, "step_img_s": []}
        self.thresholds: dict[str, np.ndarray] = {}

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

    # ---------------------------------------------------------------- checkpoints
    def _meta(self, metric: float | None = None) -> dict:
        return {"epoch": self.state.epoch, "batch": self.state.batch, "samples": self.state.samples,
                "recipe": self.recipe, "attributes": list(self.attributes), "config": to_dict(self.cfg),
                "monitor": self.cfg.run.monitor, "metric": metric, "world_size": self.acc.num_processes,
                "engine": self.rt.engine, "attrdist_version": _version()}

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

    def save(self, pointers=("last",), metric: float | None = None) -> None:
        """Collective: every rank calls it. DDP: rank 0 writes. DeepSpeed: every rank writes its ZeRO
        partitions into the staging directory, the full weights are gathered (zero3), then rank 0 writes
        model.safetensors (consolidated: `attrdist predict` and non-DeepSpeed runs load it) and renames."""
        acc = self.acc
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
            train_state = {"loop": asdict(self.state),
                           "thresholds": {k: torch.from_numpy(v) for k, v in self.thresholds.items()}}
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
            self.after_weights_loaded()
            st = checkpoint.load_train_state(path)
        else:
            self.load_weights(path)
            st = checkpoint.load_train_state(path)
            self.optimizer.load_state_dict(st["optimizer"])
            if self.acc.scaler is not None and "grad_scaler" in st:
                self.acc.scaler.load_state_dict(st["grad_scaler"])
        self.state = LoopState(**st["loop"])
        self.thresholds = {k: v.numpy() for k, v in st.get("thresholds", {}).items()}
        log.info("resumed from %s: epoch %d, batch %d of the epoch, step %d, %s samples (saved by %s with world "
                 "size %s%s)", path, self.state.epoch, self.state.batch, self.state.step, self.state.samples,
                 saved_engine, saved_world, "" if saved_world == world else
                 f"; now {world}: the same global batches continue, {self.cfg.data.batch_size // world} per rank")


    # ---------------------------------------------------------------- evaluation
    @torch.no_grad()
    def predict_split(self, ds: SampleDataset, n: int) -> dict:
        """Scores and labels of the first n samples of a split, gathered from all ranks, in order."""
        model = self.model
        model.eval()
        plan = BatchPlan(n, self.eval_batch, self.acc.num_processes, self.acc.process_index, 0, 0,
                         shuffle=False, drop_last=False)
        loader = self.make_loader(ds, plan)
        chunks = {k: [] for k in ("scores", "index", "valid", *[f"labels/{f}" for f in self.fields],
                                  *[f"mask/{f}" for f in self.fields])}
        t0, corrupt = time.perf_counter(), []
        f0 = self.cfg.data.labels
        loss_sum = torch.zeros(2, device=self.acc.device)  # (sum of batch loss x valid samples, valid samples)
        for batch in loader:
            x = self.images(batch)
            with self.acc.autocast():
                out = model(x)
            logits = out["logits"]
            valid = batch["valid"].to(self.acc.device)
            if valid.any():
                loss, _ = self.task.loss(out, batch[f"labels/{f0}"].to(self.acc.device),
                                         batch[f"mask/{f0}"].to(self.acc.device), valid, self.cfg.optim)
                loss_sum += torch.stack([loss.float() * valid.sum(), valid.sum().float()])
            corrupt += batch["errors"]  # counted per shard and logged at the end, all ranks together
            local = {"scores": self.task.probs(logits), "index": batch["index"].to(self.acc.device),
                     "valid": batch["valid"].to(self.acc.device)}
            for f in self.fields:
                local[f"labels/{f}"] = batch[f"labels/{f}"].to(self.acc.device)
                local[f"mask/{f}"] = batch[f"mask/{f}"].to(self.acc.device)
            gathered = self.acc.gather(local)
            for k, v in gathered.items():
                chunks[k].append(v.cpu())
        elapsed = time.perf_counter() - t0
        model.train()
        out = {k: torch.cat(v).numpy() for k, v in chunks.items()}
        keep = out["valid"] & (out["index"] >= 0)
        order = np.argsort(out["index"][keep], kind="stable")
        res = {k: v[keep][order] for k, v in out.items()}
        from attrdist.data.samples import CorruptTally

        split = getattr(getattr(ds, "reader", None), "split", "eval")
        self.state.corrupt_shards[split] = {}  # this (latest) evaluation's skipped samples per shard, for the report
        res["corrupt"] = self.count_corrupt(CorruptTally(f"eval {split}", self.state.corrupt_shards[split]), corrupt)
        loss_sum = self.acc.reduce(loss_sum, "sum") if self.acc.num_processes > 1 else loss_sum
        res["loss"] = float(loss_sum[0] / loss_sum[1].clamp_min(1.0))
        res["seconds"], res["n"] = elapsed, n
        return res

    def count_corrupt(self, tally, errors: list) -> int:
        """Add the skipped samples (`SampleError`s) of every rank to `tally`, counted per shard; rank 0 logs
        them. Collective with several ranks: all call it at the same point. Returns the tally's total."""
        if self.acc.num_processes > 1:
            from accelerate.utils import gather_object

            errors = gather_object(list(errors))  # every rank's list, concatenated
        tally.add(errors, log_them=self.main)
        return tally.total

    def make_dataset(self, reader: ShardReader, train: bool):
        """(index, epoch) -> one decoded sample; a subclass for another kind of sample overrides this and
        make_loader (batching), forward_loss and evaluate."""
        return SampleDataset(reader, len(self.attributes), self.fields, self.cfg.data, self.cfg.run.seed, train=train,
                             pixels_in_workers=self.pixels_in_workers, image_dtype=self.worker_dtype)

    @property
    def worker_dtype(self) -> torch.dtype:
        return worker_image_dtype(self.cfg.data.worker_dtype, self.rt.mixed_precision)

    @property
    def pixels_in_workers(self) -> bool:
        """data.pixel_stage: auto = in the workers on a CPU device (the training process's threads are busy
        with the step there), else on the device."""
        where = self.cfg.data.pixel_stage
        return where == "workers" or (where == "auto" and self.acc.device.type == "cpu")

    def make_loader(self, ds, plan: BatchPlan):
        return make_loader(ds, plan, self.cfg.data.num_workers, pin_memory=self.rt.device == "cuda",
                           malloc=self.cfg.run.malloc)

    def eval_dataset(self, split: str):
        reader = self.train_reader if split == "__overfit__" else ShardReader(self.manifest, split)
        n = self.n_train if split == "__overfit__" else len(reader)
        if self.cfg.data.subset:
            n = min(n, self.cfg.data.subset)
        return self.make_dataset(reader, train=False), n

    def evaluate(self, split: str, tune: bool = False, per_attribute: bool = False) -> dict:
        ds, n = self.eval_dataset(split)
        p = self.predict_split(ds, n)
        name = "train" if split == "__overfit__" else split
        bad = ~np.isfinite(p["scores"].reshape(len(p["scores"]), -1)).all(axis=1)
        if bad.any():  # finite weights can still overflow in the forward: the metrics would be meaningless
            best = checkpoint.pointer_target(self.ckpt_root, "best")
            raise AttrdistError(
                f"eval on {name!r} after step {self.state.step}: the model's scores are NaN/Inf for {int(bad.sum())} of "
                f"{len(bad)} images: its weights have diverged ({self.state.nonfinite} optimizer steps were skipped for "
                f"a NaN/Inf loss so far); lower optim.lr or check the data, then start again"
                + (f", e.g. from the best checkpoint so far with run.init_from={best}" if best else ""))
        rec: dict = {f"{name}/images_per_s": n / max(p["seconds"], 1e-9), f"{name}/corrupt": p["corrupt"]}
        details = {}
        for f in self.fields:
            res, new = self.task.evaluate(p["scores"], p[f"labels/{f}"], p[f"mask/{f}"], prior=self.prior[f],
                                          names=list(self.attributes), thresholds=self.thresholds.get(f), tune=tune)
            if new is not None:
                self.thresholds[f] = new
            for k, _ in self.task.scalars:
                if k in res:
                    rec[f"{name}/{f}/{k}"] = res[k]
                    for b in self.task.baselines:
                        if k in res["baselines"][b]:
                            rec[f"{name}/{f}/{k}:{b}"] = res["baselines"][b][k]
            details[f] = res
        rec[f"{name}/loss"] = p["loss"]
        rec["_details"] = details if per_attribute else None
        return rec

    # ---------------------------------------------------------------- training
    def images(self, batch: dict) -> torch.Tensor:
        """The model's input for a batch: uint8 images to the device, augmented (train batches) and
        normalised there, in the model's memory format."""
        fmt = torch.channels_last if self.cfg.model.channels_last else torch.contiguous_format
        return batch_images(batch, self.acc.device, fmt)

    def forward_loss(self, batch: dict) -> tuple[torch.Tensor, dict]:
        """The training loss of one (per-rank) batch and its logged parts."""
        acc, f = self.acc, self.cfg.data.labels
        x = self.images(batch)
        with acc.autocast():
            out = self.model(x)
        # several ranks: divide by the global counts (labelled entries, positives), not this rank's
        mean_counts = (lambda c: acc.reduce(c, "mean")) if acc.num_processes > 1 else None
        return self.task.loss(out, batch[f"labels/{f}"].to(acc.device), batch[f"mask/{f}"].to(acc.device),
                              batch["valid"].to(acc.device), self.cfg.optim, mean_counts=mean_counts)

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
        skipped (every rank: the count is agreed through the step's all-reduce)."""
        st, limit = self.state, self.cfg.optim.max_nonfinite
        if self.main:
            log.warning("step %d: loss %s%s not finite: optimizer step skipped, weights and optimizer state unchanged "
                        "(%d in a row, %d in this run; optim.max_nonfinite=%d in a row)", st.step, rec["loss"],
                        f", gradient norm {rec['grad_norm']}" if "grad_norm" in rec else " or gradients",
                        st.nonfinite_streak, st.nonfinite, limit)
        if st.nonfinite_streak > limit:
            raise AttrdistError(
                f"step {st.step}: the loss or gradients were NaN/Inf in {st.nonfinite_streak} optimizer steps in a row, "
                f"more than optim.max_nonfinite={limit}; all were skipped, so the weights are those of step "
                f"{st.step - st.nonfinite_streak}; lower optim.lr (or check the data), then resume from the last "
                f"checkpoint {self._last_checkpoint()}")

    def train(self) -> Path:
        self.maybe_resume()  # replaces self.state: bind `st` after it
        cfg, st, acc = self.cfg, self.state, self.acc
        old_handlers = interrupt.install()  # SIGTERM/SIGUSR2: checkpoint at the end of the step, then stop
        if cfg.run.debug:
            torch.autograd.set_detect_anomaly(True)
            hooks = log_shapes_once(self.acc.unwrap_model(self.model))
        else:
            hooks = []
        val_split = "__overfit__" if cfg.run.overfit_batches else cfg.data.val_split
        monitor = cfg.run.monitor
        if cfg.run.overfit_batches and monitor.startswith(f"{cfg.data.val_split}/"):
            monitor = "train/" + monitor.split("/", 1)[1]  # overfit mode evaluates on the training batches
        higher_better = "loss" not in monitor.rsplit("/", 1)[-1]
        B, ga = cfg.data.batch_size, cfg.optim.grad_accum
        t_start = time.perf_counter()
        params = [p for p in self.model.parameters() if p.requires_grad]
        nan_steps = _fault_nan_steps()
        # buffers change in the forward (BatchNorm running statistics): a skipped step puts them back too, or one
        # overflowing forward would leave NaN statistics behind (measured: every later eval NaN)
        buffers = list(self.model.buffers())
        saved_buffers = [b.detach().clone() for b in buffers]
        stop = bool(cfg.run.max_steps and st.step >= cfg.run.max_steps)  # resumed at the end: nothing left to train
        step_samples: list[torch.Tensor] = []  # run.log_samples: the global batch indices of this step
        # samples skipped as corrupt: this step's (all micro-batches), per shard over the run, since this launch
        from attrdist.data.samples import CorruptTally

        step_errors, tally, corrupt_start = [], CorruptTally("train", st.corrupt_shards.setdefault("training", {})), st.corrupt
        while st.epoch < cfg.run.epochs and not stop:
            plan = BatchPlan(self.n_train, B, acc.num_processes, acc.process_index, cfg.run.seed, st.epoch,
                             shuffle=not cfg.run.overfit_batches, drop_last=True, start=st.batch)
            plan_batches = (self.batches_per_epoch // ga) * ga  # whole optimizer steps only
            loader = self.make_loader(self.train_ds, plan)
            self.model.train()
            t_epoch = time.perf_counter()
            t_step = time.perf_counter()
            for batch in loader:
                if st.batch >= plan_batches:
                    break
                micro = st.batch % ga
                sync = micro == ga - 1
                # set before backward: DeepSpeed's engine takes its optimizer step inside acc.backward
                lr = cfg.optim.lr * lr_factor(st.step, cfg.schedule, self.steps_per_epoch, self.total_steps)
                for g in self.optimizer.param_groups:
                    g["lr"] = lr
                if micro == 0:
                    _copy(saved_buffers, buffers)
                # dropout & co. draw from torch's global RNG: key it by position, so resume needs no RNG state
                seed_rng(rnglib.fold(cfg.run.seed, rnglib.DROPOUT, st.epoch, st.batch, acc.process_index), acc.device)
                with acc.accumulate(self.model):  # DDP: no_sync on all but the last micro-batch of a step
                    if acc.sync_gradients != sync:
                        raise RuntimeError(f"accumulation out of step: batch {st.batch}, accelerate step {acc.step}")
                    loss, parts = self.forward_loss(batch)
                    if st.step + 1 in nan_steps:  # test hook (ATTRDIST_FAULT_NAN_STEPS): this step's loss is NaN
                        loss = loss * float("nan")
                    acc.backward(loss)  # divided by optim.grad_accum inside (accelerate; DeepSpeed's engine)
                if cfg.run.log_samples:  # collective, every micro-batch: rank r holds slice r of the global batch
                    step_samples.append(acc.gather(batch["index"].to(acc.device)).cpu())
                if hooks:
                    for h in hooks:
                        h.remove()
                    hooks = []
                step_errors += batch["errors"]  # counted (per shard, all ranks) once the step is taken
                st.batch += 1
                st.samples += B
                if not sync:
                    continue
                grad_norm = None
                if cfg.optim.clip_grad_norm:
                    grad_norm = acc.clip_grad_norm_(params, cfg.optim.clip_grad_norm)
                # one small all-reduce per step, before the optimizer step: loss for the log; non-finite flag, corrupt
                # count and stop signal agreed by all ranks (so every rank skips the same steps, saves the same step)
                flags = torch.tensor([loss.detach().float().item(), *(float(v) for v in parts.values()),
                                      float(not self.step_is_finite(loss, grad_norm, params)),
                                      float(len(step_errors)), float(interrupt.requested())], device=acc.device)
                red = acc.reduce(flags, "sum") if acc.num_processes > 1 else flags
                W = acc.num_processes
                skipped = bool(red[-3].item())
                if skipped:
                    self.skip_step()
                    _copy(buffers, saved_buffers)
                else:
                    self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                st.step += 1
                st.nonfinite += skipped
                st.nonfinite_streak = st.nonfinite_streak + 1 if skipped else 0
                st.corrupt += int(red[-2].item())
                if red[-2].item():  # some rank skipped corrupt samples: count and log them all (collective)
                    self.count_corrupt(tally, step_errors)
                step_errors = []
                now = time.perf_counter()
                img_s = B * ga / max(now - t_step, 1e-9)
                t_step = now
                self.timings["step_img_s"].append(img_s)
                rec = {"type": "train", "step": st.step, "epoch": st.epoch, "loss": red[0].item() / W, "lr": lr,
                       "img_per_s": img_s, "time": now - t_start}
                for i, k in enumerate(parts):
                    rec[k] = red[1 + i].item() / W
                if grad_norm is not None:
                    rec["grad_norm"] = float(grad_norm)
                if cfg.run.log_samples:
                    rec["samples"] = torch.cat(step_samples).tolist()
                    step_samples = []
                if skipped:
                    rec.update(skipped=True, nonfinite_steps=st.nonfinite)
                self.tracker.log(rec)
                if st.step % cfg.run.log_every == 0 or st.step == 1:
                    log.info("epoch %d step %d/%d loss %.4f lr %.2e %.0f img/s", st.epoch, st.step,
                             self.total_steps, rec["loss"], lr, img_s)
                if skipped:
                    self.after_nonfinite_step(rec)
                if st.corrupt - corrupt_start > cfg.data.max_corrupt:  # this launch's: a resume may go on
                    self.save()  # no training is lost: fix the shards, then resume
                    since = f" since the resume ({st.corrupt} in the whole run)" if corrupt_start else ""
                    raise AttrdistError(f"{self.manifest.root}: {st.corrupt - corrupt_start} samples failed to decode{since}, "
                                        f"more than data.max_corrupt={cfg.data.max_corrupt}; per shard: {tally.worst()} (the "
                                        f"warnings above say why); restore or re-pack those shards, or raise "
                                        f"data.max_corrupt to skip them, then continue with --resume (checkpoint saved at "
                                        f"step {st.step})")
                if red[-1].item():  # a rank was asked to stop: every rank saves this step, then stops
                    signum = interrupt.requested() or int(red[-1].item())  # else: another rank's
                    self.save()
                    log.warning("stopped by signal %d after step %d (checkpoint saved); resume with --resume "
                                "(run.run_dir=%s)", signum, st.step, self.run_dir)
                    interrupt.restore(old_handlers)
                    raise interrupt.Interrupted(signum, st.step, self.run_dir)
                if cfg.run.ckpt_every_steps and st.step % cfg.run.ckpt_every_steps == 0:
                    self.save()
                if cfg.run.max_steps and st.step >= cfg.run.max_steps:
                    stop = True
                    break
            self.timings["train_s"] += time.perf_counter() - t_epoch
            epoch_done = st.batch >= plan_batches
            if epoch_done:
                st.epoch += 1
                st.batch = 0
            keep = (f"epoch-{st.epoch:04d}",) if (epoch_done and cfg.run.ckpt_every_epochs
                                                   and st.epoch % cfg.run.ckpt_every_epochs == 0) else ()
            if epoch_done and (st.epoch % cfg.run.eval_every == 0 or st.epoch == cfg.run.epochs) or stop:
                rec = self.evaluate(val_split)
                rec.pop("_details")
                rec.update(type="eval", step=st.step, epoch=st.epoch, time=time.perf_counter() - t_start)
                key = monitor if monitor in rec else None
                if key is None:
                    raise AttrdistError(f"run.monitor={monitor!r} is not an eval metric; have: "
                                        f"{', '.join(k for k in rec if '/' in k and ':' not in k)}")
                value = rec[key] if higher_better else -rec[key]
                improved = value > st.best
                if improved:
                    st.best, st.best_step, st.bad_evals = value, st.step, 0
                else:
                    st.bad_evals += 1
                self.tracker.log(rec)
                log.info("eval epoch %d: %s", st.epoch, "  ".join(
                    f"{k}={v:.4f}" for k, v in rec.items() if isinstance(v, float) and ":" not in k
                    and k.split("/")[-1] in (self.task.headline, "loss", "micro_f1@0.5", "macro_f1")))
                self.save(pointers=("last", "best", *keep) if improved else ("last", *keep), metric=rec[key])
                if self.main and (st.epoch % cfg.run.curves_every == 0 or st.epoch >= cfg.run.epochs):
                    plot_curves(self.run_dir, self._headline_keys(val_split))
                if cfg.run.patience and st.bad_evals >= cfg.run.patience:
                    log.info("early stopping: %s has not improved for %d evaluations (best %.4f at step %d)",
                             monitor, st.bad_evals, abs(st.best), st.best_step)
                    st.stopped_early = True
                    stop = True
            elif keep:
                self.save(pointers=("last", *keep))
            elif not epoch_done and not stop:  # a rank leaving the loop alone would hang the others
                raise RuntimeError(f"epoch {st.epoch}: the train loader ended after global batch {st.batch} of "
                                   f"{plan_batches} (its batch plan yields every batch: a bug)")
        # every rank must have taken the same steps (the plan makes it so): say it, and check it
        done = torch.tensor([[st.step, st.samples]], dtype=torch.int64, device=acc.device)
        per_rank = (acc.gather(done) if acc.num_processes > 1 else done).tolist()
        log.info("train loop done: optimizer steps per rank %s (global samples seen, per rank: %s)",
                 [r[0] for r in per_rank], [r[1] for r in per_rank])
        if any(r != per_rank[0] for r in per_rank):
            raise RuntimeError(f"ranks disagree on (steps, samples) at the end of training: {per_rank}")
        interrupt.restore(old_handlers)
        self.timings["wall_s"] = time.perf_counter() - t_start
        return self.finish(val_split)

    def inference_input(self, split: str):
        """(one real eval batch as the model takes it, its size): what measure_inference times."""
        ds, n = self.eval_dataset(split)
        b = max(1, min(self.eval_batch // self.acc.num_processes, n))
        return self.images(collate([ds[(i, 0)] for i in range(b)])), b

    @torch.no_grad()
    def measure_inference(self, split: str, batches: int = 10, warmup: int = 3) -> dict:
        """Model forward images/s on one real eval batch after `warmup` batches (decode excluded)."""
        model = self.acc.unwrap_model(self.model).eval()
        x, b = self.inference_input(split)
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

    def _headline_keys(self, val_split: str) -> list[str]:
        name = "train" if val_split == "__overfit__" else val_split
        return [f"{name}/{f}/{self.task.headline}" for f in self.cfg.data.eval_labels]

    def load_weights(self, ckpt_dir: Path) -> None:
        """The model weights of a checkpoint (not the optimizer); collective under DeepSpeed."""
        if self.deepspeed:  # zero3 parameters are partitioned: the engine loads its own files
            self.model.load_checkpoint(str(ckpt_dir / checkpoint.DEEPSPEED_DIR), tag=checkpoint.DEEPSPEED_TAG,
                                       load_module_only=True)
        else:
            self.acc.unwrap_model(self.model).load_state_dict(checkpoint.load_model_state(ckpt_dir))
        self.after_weights_loaded()

    def after_weights_loaded(self) -> None:
        """Hook for state derived from the weights (the detector re-encodes its class prompts)."""

    def write_report(self, results: dict, best: Path, val_split: str) -> tuple[Path, str]:
        """(report.md path, headline line) for the final results."""
        from attrdist.train import report

        path = report.write(self.run_dir, task=self.task, recipe=self.recipe, cfg=self.cfg, rt=self.rt, results=results,
                            state=self.state, timings=self.timings, fields=list(self.cfg.data.eval_labels),
                            attributes=list(self.attributes), best_dir=best, manifest=self.manifest,
                            thresholds=self.thresholds, n_train=self.n_train)
        return path, report.headline(self.task, results, list(self.cfg.data.eval_labels))

    def finish(self, val_split: str) -> Path:
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
        results = {"val": self.evaluate(val_split, tune=True, per_attribute=True)}
        test = self.cfg.data.test_split
        if test and self.manifest.has_split(test) and val_split != "__overfit__":
            results["test"] = self.evaluate(test, per_attribute=True)
        if self.main or self.cfg.run.deepspeed == "zero3":  # zero3: a forward gathers parameters from every rank
            self.timings["inference"] = self.measure_inference(val_split)
        if self.main:
            plot_curves(self.run_dir, self._headline_keys(val_split))
            path, headline = self.write_report(results, best, val_split)
            log.info("report: %s", path)
            log.info("headline: %s", headline)
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
    for d, s in zip(dst, src):
        d.copy_(s)


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


def _version() -> str:
    from attrdist import __version__

    return __version__
