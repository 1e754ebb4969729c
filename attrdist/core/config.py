"""Config as data: frozen dataclasses, `key=value` overrides, validation, help, JSON.

A recipe builds a `Config` (data, model, optim, schedule, run) in plain Python; the command
line then overrides fields by dotted path:

    python recipes/coconut.py optim.lr=3e-4 data.batch_size=16 run.precision=fp32

Every value is parsed by the field's annotated type (int, float, bool, str, Literal choices,
tuples) and validated; unknown keys and bad values raise `AttrdistError` with one line that
names the key and what would be accepted. Nothing in here touches torch.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import types
import typing
from dataclasses import dataclass, field, fields, is_dataclass, replace
from typing import Any, Literal

from attrdist.errors import AttrdistError


def _f(default, help: str, **kw):
    """A dataclass field with a help string (shown by `--help`)."""
    if isinstance(default, (list, dict, set)):
        raise TypeError("use tuples for sequence defaults: configs are frozen")
    return field(default=default, metadata={"help": help, **kw})


# --------------------------------------------------------------------------------------------
# The schema. Every recipe uses these five sections; recipe-specific knobs live in `model`.
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AugmentConfig:
    """Train-time augmentation; each op is a pure function of (image, key)."""

    crop_scale: tuple[float, float] = _f((0.5, 1.0), "RandomResizedCrop area range")
    crop_ratio: tuple[float, float] = _f((0.75, 1.3333), "RandomResizedCrop aspect range")
    hflip: float = _f(0.5, "probability of a horizontal flip")
    vflip: float = _f(0.0, "probability of a vertical flip")
    rotate: float = _f(0.0, "max rotation in degrees (uniform in [-r, r])")
    brightness: float = _f(0.2, "colour jitter: brightness factor range 1 +- x")
    contrast: float = _f(0.2, "colour jitter: contrast factor range 1 +- x")
    saturation: float = _f(0.2, "colour jitter: saturation factor range 1 +- x")
    hue: float = _f(0.0, "colour jitter: hue shift range +- x (in [0, 0.5])")
    blur: float = _f(0.0, "probability of a Gaussian blur")
    erase: float = _f(0.25, "probability of random erasing")
    erase_scale: tuple[float, float] = _f((0.02, 0.2), "random erasing area range")


@dataclass(frozen=True)
class DataConfig:
    shards: str = _f("", "directory of packed shards (with manifest.json), or a remote pack's URL: https://host/pack/ or s3://bucket/pack/ (shards fetched into data.cache_dir); empty = built-in demo")
    cache_dir: str = _f("", "remote shards: the node-local cache directory (a folder per pack inside); empty = <attrdist cache>/shards ($ATTRDIST_CACHE or ~/.cache/attrdist)")
    cache_limit_gb: float = _f(100.0, "remote shards: the most the cache directory may hold; least recently used shards are evicted beyond it (it must hold data.prefetch_shards shards per process reading)")
    prefetch_shards: int = _f(0, "remote shards: the most shards ShardReader.prefetch keeps downloaded ahead and pinned; 0 = every shard of the windows the data order has open or opens within the next window's span (README 'Remote shards': the cache must hold them)")
    train_split: str = _f("train", "split used for training")
    val_split: str = _f("val", "split used for validation / early stopping")
    test_split: str = _f("test", "split reported at the end with thresholds tuned on val (skipped if absent)")
    image_size: int = _f(0, "training/eval resolution (square); 0 = the model's pretrained input size (timm's pretrained cfg of model.backbone; 224 where it has none). Like every preprocessing key, resolved when the run starts and recorded in config.json (README 'Preprocessing')")
    eval_resize: float = _f(0.0, "eval and predict: resize the short side to image_size*eval_resize, then centre-crop image_size (1/eval_resize is timm's crop_pct); 0 = from the model (1/crop_pct of its pretrained cfg)")
    interpolation: Literal["auto", "bilinear", "bicubic", "nearest"] = _f("auto", "resampling filter of the training crop and the eval/predict resize (antialiased); auto = the model's (its pretrained cfg: bicubic for most timm models; bilinear for the open-vocabulary detector)")
    mean: tuple[float, ...] = _f((), "per-channel RGB mean (0..1 scale) images are normalised with, e.g. 0.5,0.5,0.5; empty = the model's: timm's pretrained cfg of model.backbone (ImageNet's for most, 0.5 for tf_efficientnet_lite0 and many ViTs, OpenAI CLIP's for CLIP towers), OpenAI CLIP's for the open-vocabulary detector")
    std: tuple[float, ...] = _f((), "per-channel RGB std (0..1 scale) images are normalised with; empty = the model's (see data.mean)")
    batch_size: int = _f(8, "GLOBAL batch size per optimizer micro-step (split over processes)")
    eval_batch_size: int = _f(0, "global eval batch size (0 = 2 x batch_size)")
    num_workers: int = _f(2, "DataLoader worker processes per rank (decode + augment + collate)")
    pixel_stage: Literal["auto", "workers", "device"] = _f("auto", "where colour jitter, normalisation and erasing run: 'workers' (per sample, float batches), 'device' (batched where the batch lands, from uint8 batches); auto = workers on a CPU device, else device (bench/input.py)")
    worker_dtype: Literal["auto", "float32", "bfloat16"] = _f("auto", "the dtype of the finished images workers hand over when the pixel stage runs in them: auto = bfloat16 when the run computes in bf16 (half the bytes through shared memory; the model's first layer casts its input to bf16 under autocast anyway, so it sees the same values: tests/test_train.py), else float32")
    decode: Literal["workers", "device"] = _f("workers", "where JPEGs are decoded and cropped: 'workers' (libjpeg-turbo in the loader's CPU workers, at a DCT-reduced scale, uint8 crops handed over) or 'device' (the workers only read and check each sample, read its JPEG header and draw its augmentation as 'workers' does, the crop box scaled to the full-size image; the batch's JPEGs are decoded at full size on the run's device (nvJPEG through torchvision.io.decode_jpeg on CUDA, libjpeg-turbo on a CPU device) and cropped/flipped/rotated/blurred there: pixels differ slightly from 'workers', the parameters do not; evaluation batches too, resized and centre-cropped there; PNG, CMYK and JPEGs whose header the workers cannot read are decoded in the workers as with 'workers', a JPEG the device refuses on the CPU; needs the pixel stage on the device (data.pixel_stage=auto/device) and a task with one (not detection)): for GPUs whose CPU cores cannot keep up (bench/gpu.py)")
    task: str = _f("multilabel", "what is learned: multilabel (sigmoid/BCE attributes), multiclass (softmax/CE classes), detection (boxes, open vocabulary): attrdist/tasks/<task>.py; or the module path of a task of your own")
    novel_classes: tuple[str, ...] = _f((), "detection: classes held out of training (their boxes are background) and detected at test time only through their prompts")
    labels: str = _f("labels", "which label field of the shards to train on")
    eval_labels: tuple[str, ...] = _f(("labels",), "label fields to evaluate against (first = headline)")
    max_corrupt: int = _f(10, "stop the run once more than this many samples failed to decode")
    subset: int = _f(0, "use only the first N samples of each split (0 = all)")
    order: Literal["windowed", "permutation"] = _f("windowed", "training order (attrdist/core/order.py): 'windowed' = shards permuted and cut into data.streams canonical streams, each shuffled a window of data.shuffle_window shards at a time (each rank reads a 1/world share of the shards, a few at a time; O(shards) memory); 'permutation' = a full permutation of the samples (best mixing, every rank reads every shard: data that fits the page cache). Both give the same batches at every supported world size")
    streams: int = _f(64, "windowed order: canonical streams; the run uses S = gcd(data.streams, data.batch_size) and supports every world size dividing S. More streams mix more shards per batch, but every process reads S/world windows at once (cache: README 'Remote shards')")
    shuffle_window: int = _f(4, "windowed order: shards per shuffle window of a stream (samples are permuted within a window); larger mixes better and needs more shards open/cached per stream (BENCHMARKS.md 'Data at scale')")
    augment: AugmentConfig = field(default_factory=AugmentConfig)


@dataclass(frozen=True)
class DetectorConfig:
    """Open-vocabulary detector (model.name=open_vocab_detector; attrdist/models/detector.py). Its CLIP
    comes from model.backbone (an open_clip ResNet CLIP such as RN50, or 'tiny'), model.pretrained (a
    local RemoteCLIP/open_clip file) and model.frozen_stages. Defaults: torchvision's Faster R-CNN layout
    for 800 px DIOR images; `tiny()` is the 128 px CPU demo measured on 2 cores."""

    min_size: int = _f(800, "images are resized so the short side is min_size (GeneralizedRCNNTransform)")
    max_size: int = _f(800, "... and the long side at most max_size")
    fpn_layers: tuple[int, ...] = _f((1, 2, 3, 4), "CLIP ResNet stages fed to the FPN (strides 4, 8, 16, 32)")
    fpn_channels: int = _f(256, "FPN width")
    anchor_sizes: tuple[int, ...] = _f((32, 64, 128, 256, 512), "anchor size per FPN level (the extra max-pool level last)")
    aspect_ratios: tuple[float, ...] = _f((0.5, 1.0, 2.0), "anchor aspect ratios")
    box_head_dim: int = _f(1024, "width of the RoI box head (TwoMLPHead)")
    rpn_batch_size: int = _f(256, "anchors sampled per image for the RPN loss")
    roi_batch_size: int = _f(512, "proposals sampled per image for the box-head loss")
    proposals_train: int = _f(2000, "RPN proposals kept after NMS in training")
    proposals_test: int = _f(1000, "RPN proposals kept after NMS in evaluation")
    freeze_bn: bool | None = _f(None, "freeze the trunk's BatchNorm (empty/null: frozen iff pretrained weights were loaded)")
    temperature: float = _f(0.07, "initial region/text softmax temperature (learned)")
    score_thresh: float = _f(0.01, "detections below this score are dropped (keep low for mAP)")
    detections_per_img: int | None = _f(None, "detections kept per image (torchvision box_detections_per_img); empty/null: fitted to the pack, max(100, the most boxes any of its images has), since fewer than the densest image's boxes caps recall there (DIOR: several hundred; torchvision's 100 suits COCO)")
    clip_crops: bool | None = _f(None, "score detections also with a frozen copy of the CLIP image tower on square crops around them (ViLD ensemble; empty/null: iff pretrained weights were loaded)")
    crop_weight_base: float = _f(0.35, "clip_crops: weight w of the CLIP crop probability for base classes, score = det^(1-w) * clip^w")
    crop_weight_novel: float = _f(0.65, "clip_crops: the same for novel classes (never trained: the crop score matters more)")
    crop_margin: float = _f(1.375, "clip_crops: side of the square crop / longest side of the box")
    crop_topk: int = _f(300, "clip_crops: the RPN's highest-scoring proposals per image that are classified (the rest are dropped); CLIP cost grows with it")

    @classmethod
    def tiny(cls, **overrides) -> "DetectorConfig":
        """The CPU demo (with model.backbone=tiny): 128 px images, objects of ~10-50 px."""
        return replace(cls(min_size=128, max_size=128, fpn_layers=(2, 3, 4), fpn_channels=64,
                           anchor_sizes=(12, 24, 48, 96), box_head_dim=128, rpn_batch_size=128, roi_batch_size=64,
                           proposals_train=300, proposals_test=200, crop_topk=50), **overrides)


@dataclass(frozen=True)
class ModelConfig:
    name: str = _f("cross_modal", "model family (see attrdist/models)")
    backbone: str = _f("resnet50", "timm backbone architecture")
    feature_level: int = _f(4, "backbone stage whose spatial map feeds the attention (timm out_indices)")
    pretrained: str = _f("auto", "backbone weights (nothing is ever downloaded): 'auto' = the weights for model.backbone already in the local timm/HF cache, and the run STOPS if there are none (a fine-tuning recipe must not train from scratch unnoticed); a local .safetensors/.pth file; 'none' = from scratch on purpose ('' is the same). Detector (open_vocab_detector): a local RemoteCLIP/open_clip file, 'auto' = an open_clip checkpoint of model.backbone in the HF cache, 'demo-clip' = the demo's tiny CLIP")
    frozen_stages: int = _f(0, "freeze the stem and the first N backbone stages")
    dim: int = _f(512, "width of the fusion space")
    heads: int = _f(8, "attention heads")
    dropout: float = _f(0.1, "dropout in the fusion block")
    contrastive_dim: int = _f(256, "width of the contrastive projection")
    fusion_layers: int = _f(1, "cross_modal: attention + FFN blocks in which the attribute queries attend to the image")
    head_dims: tuple[int, ...] = _f((), "hidden widths of the MLP head: on pooled features (classifier) or on each attribute query's output (cross_modal), e.g. 512 or 256,128; empty = linear")
    attr_init: Literal["learned", "text"] = _f("learned", "cross_modal: attribute queries from random init, or initialised from an open_clip text tower over the attribute names")
    text_encoder: str = _f("RN50", "attr_init=text: open_clip architecture whose text tower embeds the attribute names")
    text_pretrained: str = _f("auto", "attr_init=text: local open_clip checkpoint for the text tower; 'auto' = an open_clip checkpoint for text_encoder in the local HF cache (one trained with the same activation: OpenAI's need text_encoder=RN50-quickgelu), and the run STOPS if there is none; 'none' = a random text tower on purpose (distinct but meaningless initial queries; '' is the same)")
    channels_last: bool = _f(True, "channels_last memory format (faster convs on CPU and GPU)")
    sync_bn: bool = _f(False, "with N > 1 processes, convert BatchNorm to torch.nn.SyncBatchNorm: statistics over the whole global batch, so N ranks train like 1 process (frozen-stage norms stay as they are). GPU only: in torch 2.14 SyncBatchNorm refuses CPU tensors and DDP refuses it in a CPU module ('SyncBatchNorm layers only work with GPU modules', checked with gloo), so on CPU ranks the run stops; use freeze_bn_stats there. No effect with 1 process")
    freeze_bn_stats: bool = _f(False, "BatchNorm normalises with its running statistics in training too (eval mode: statistics never update, affine weights still train), so nothing depends on how the batch is split over ranks; the CPU stand-in for sync_bn. From scratch the statistics stay at init (mean 0, var 1): BatchNorm is then a learned per-channel scale and shift")
    detector: DetectorConfig = field(default_factory=DetectorConfig)


@dataclass(frozen=True)
class OptimConfig:
    name: Literal["adamw", "adam", "sgd"] = _f("adamw", "optimizer")
    lr: float = _f(1e-4, "peak learning rate")
    weight_decay: float = _f(1e-4, "weight decay")
    momentum: float = _f(0.9, "SGD momentum")
    fused: bool = _f(True, "torch's fused (single-kernel) optimizer step, CPU and CUDA; ~5x faster on CPU (off under DeepSpeed)")
    clip_grad_norm: float = _f(1.0, "max gradient norm (0 = no clipping)")
    grad_accum: int = _f(1, "gradient accumulation steps")
    max_nonfinite: int = _f(10, "an optimizer step whose loss or gradients are NaN/Inf is skipped (weights and optimizer state unchanged, counted in the log and report.json); the run stops when more than this many steps IN A ROW were skipped (a diverged run), naming the last checkpoint (0 = stop at the first). Occasional bad steps never stop a run; fp16 loss-scale overflows are the scaler's and not counted")
    bce_weight: float = _f(1.0, "weight of the multi-label BCE term")
    contrastive_weight: float = _f(0.1, "weight of the image/attribute contrastive term")
    temperature: float = _f(0.1, "contrastive temperature")


@dataclass(frozen=True)
class ScheduleConfig:
    name: Literal["cosine", "step", "warm_restarts", "constant"] = _f("cosine", "LR schedule (per optimizer step)")
    warmup_epochs: float = _f(0.0, "linear warm-up length in epochs")
    min_lr_ratio: float = _f(0.0, "cosine floor as a fraction of lr")
    step_epochs: float = _f(15.0, "step: decay every N epochs")
    step_gamma: float = _f(0.5, "step: decay factor")
    restart_epochs: float = _f(10.0, "warm_restarts: first cycle length in epochs")
    restart_mult: int = _f(1, "warm_restarts: cycle length multiplier")


@dataclass(frozen=True)
class RunConfig:
    name: str = _f("run", "run name (used in the run directory name)")
    out_dir: str = _f("runs", "parent directory of run directories")
    run_dir: str = _f("", "explicit run directory (default: <out_dir>/<name>)")
    seed: int = _f(0, "seed of model init, data order and augmentation keys")
    epochs: int = _f(100, "maximum epochs")
    eval_every: int = _f(1, "evaluate every N epochs")
    monitor: str = _f("val/mAP", "metric for best checkpoint and early stopping")
    patience: int = _f(20, "early stopping: evaluations without improvement (0 = off)")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = _f("auto", "auto = bf16 on a GPU that supports it; on a CPU with native bf16, measured: a few fp32 vs bf16 steps of the run's model (seconds; cached per machine and model, in <run_dir>/precision.json, kept on resume) pick bf16 only if >= 5% faster (attrdist/train/precision.py); else fp32. fp16 only on CUDA")
    device: Literal["auto", "cuda", "mps", "cpu"] = _f("auto", "auto = CUDA > MPS > CPU")
    ckpt_every_steps: int = _f(0, "also save `last` every N optimizer steps (0 = at evals only)")
    ckpt_every_epochs: int = _f(0, "also keep a permanent checkpoint every N epochs (pointer epoch-NNNN.json; 0 = none)")
    keep_checkpoints: int = _f(2, "step checkpoints kept besides `best`")
    log_every: int = _f(10, "log a training line (loss, lr, img/s, ETA of the run) every N steps when stderr is not a terminal (on a terminal: a progress bar)")
    progress_every_s: float = _f(30.0, "evaluation progress (batches done/total, rate, ETA): a line at most every N seconds when stderr is not a terminal (SLURM logs, files; no carriage returns); on a terminal a tqdm bar, as for training")
    log_with: str = _f("tensorboard", "experiment trackers (through accelerate, rank 0), comma-separated: tensorboard (run_dir/tensorboard), mlflow (store: MLFLOW_TRACKING_URI; experiment: run.name), wandb (project: run.name; WANDB_MODE=offline works offline; files in run_dir/wandb unless WANDB_DIR); '' or none = no tracker. Parameters: the resolved config (dotted keys); metrics.jsonl and curves.png are written either way; run.resume=auto continues the same MLflow/W&B run (trackers.json)")
    resume: Literal["", "auto"] = _f("", "'auto' = continue from the run directory's last checkpoint")
    debug: bool = _f(False, "few steps on a small subset, anomaly detection, per-module shape log")
    overfit_batches: int = _f(0, "train on the first N batches only, no augmentation (loss should go to ~0)")
    max_steps: int = _f(0, "stop after N optimizer steps (0 = no limit)")
    world_size: int = _f(0, "expected number of processes; the run fails if it got another (0 = any)")
    threads: int = _f(0, "torch intra-op threads per process (0 = cores / local processes)")
    malloc: Literal["keep", "system"] = _f("keep", "glibc malloc of this process and its data workers: 'keep' = large tensors from the heap, freed memory kept for reuse (no page faults per tensor: ResNet-50@224 training 1.65-1.72x faster here, bench/malloc.py; the RSS stays at its peak); 'system' = glibc's defaults")
    curves_every: int = _f(10, "refresh curves.png every N epochs (and at the end)")
    log_samples: bool = _f(False, "every train record in metrics.jsonl also lists the sample indices of the step's whole global batch (all ranks, all grad_accum micro-batches, in global order): checks that 1 and N processes, or a resumed run, see the same data")
    deepspeed: Literal["", "zero1", "zero2", "zero3"] = _f("", "DeepSpeed ZeRO stage through accelerate ('' = DDP); template attrdist/deepspeed_configs/<stage>.json; launch with `python -m launch local SCRIPT --nproc N --deepspeed zero2`")
    deepspeed_config: str = _f("", "a DeepSpeed JSON merged over the stage's template (its values win; batch sizes, accumulation and clipping always follow data/optim)")
    offload: Literal["none", "cpu", "nvme"] = _f("none", "DeepSpeed: offload optimizer states (and zero3 parameters) to CPU memory or NVMe; GPU runs only")
    offload_dir: str = _f("", "offload=nvme: a directory on a local NVMe disk")
    shm_allreduce: Literal["auto", "on", "off"] = _f("auto", "CPU DDP with every rank on this host: all-reduce the gradients through shared memory (DeepSpeed's shm kernel, JIT-built once) instead of gloo's TCP: 2-rank ResNet-18@64 training 1.15-1.17x faster here (bench/ddp.py); auto = when possible (else gloo, reason logged), on = fail if not possible, off = gloo")
    compile: bool = _f(False, "torch.compile the model (inductor) before training, in place (checkpoints keep the plain model's keys): fuses kernels, worth it on GPUs for long runs (the first step compiles for a minute or more, the first evaluation once more; bench/gpu.py measures it); DDP runs only (not with run.deepspeed); on CPU inductor needs g++")
    host_sync: Literal["auto", "step", "lagged"] = _f("auto", "when the host reads each step's all-ranks agreement (loss, non-finite flag, corrupt count, stop signal): 'step' = right after the step (one device sync per step), 'lagged' = one step later, while the next step runs (a non-finite step is still skipped, on the device: the same steps and weights as 'step'; a stop signal or data.max_corrupt takes effect one step later); lagged needs optim.fused and no run.deepspeed, fp16, run.log_samples or run.debug: auto = lagged on CUDA where it can (else step, reason logged), step elsewhere (on a CPU the sync costs nothing)")
    dist_timeout_s: int = _f(1800, "seconds a rank waits in a collective (all-reduce, barrier) for the others before the run fails: a crashed or stuck rank never hangs the job forever")
    init_from: str = _f("", "initialise the whole model from a checkpoint (run dir, checkpoints/step-* dir or model.safetensors, e.g. a DeepSpeed run's consolidated weights); fresh optimizer and schedule")


@dataclass(frozen=True)
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    run: RunConfig = field(default_factory=RunConfig)


# --------------------------------------------------------------------------------------------
# Overrides, validation, help, JSON
# --------------------------------------------------------------------------------------------


TRACKERS = ("tensorboard", "mlflow", "wandb")  # run.log_with: what attrdist passes to accelerate and tests


def tracker_names(text: str) -> tuple[str, ...]:
    """run.log_with -> tracker names (deduplicated, in order); '' / 'none' = none. One-line error for a name
    that is not a tracker."""
    names = [n.strip().lower() for n in text.split(",") if n.strip()]
    if names == ["none"]:
        return ()
    for n in names:
        if n not in TRACKERS:
            close = difflib.get_close_matches(n, TRACKERS, n=1)
            raise AttrdistError(f"run.log_with={text}: unknown tracker {n!r}{f' (did you mean {close[0]}?)' if close else ''}; "
                                f"accepted: {', '.join(TRACKERS)} (comma-separated), or none")
    return tuple(dict.fromkeys(names))


def flatten(cfg: Any, prefix: str = "") -> dict[str, tuple[Any, dataclasses.Field]]:
    """Dotted key -> (value, field) for every leaf of a nested config dataclass."""
    out = {}
    for f in fields(cfg):
        v = getattr(cfg, f.name)
        key = f"{prefix}{f.name}"
        if is_dataclass(v):
            out.update(flatten(v, key + "."))
        else:
            out[key] = (v, f)
    return out


def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _parse(text: str, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        if text not in choices:
            raise AttrdistError(f"{key}={text!r}: must be one of {', '.join(map(repr, choices))}")
        return text
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if text.lower() in ("none", "null", "") and len(args) < len(typing.get_args(tp)):
            return None
        return _parse(text, args[0], key)
    if origin is tuple:
        args = typing.get_args(tp)
        inner = text.strip()
        for lo, hi in ("[]", "()"):
            if inner[:1] == lo and inner[-1:] == hi:
                inner = inner[1:-1]
                break
        if any(b in inner for b in "[]()"):
            raise AttrdistError(f"{key}={text!r}: unbalanced or nested brackets; write a list as {key}=[0.5,1.0] or "
                                f"{key}=0.5,1.0")
        parts = [p.strip() for p in inner.split(",") if p.strip()]
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_parse(p, args[0], key) for p in parts)
        if len(parts) != len(args):
            raise AttrdistError(f"{key}={text!r}: expected {len(args)} comma-separated values, e.g. {key}=0.5,1.0")
        return tuple(_parse(p, a, key) for p, a in zip(parts, args))
    if tp is bool:
        low = text.lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise AttrdistError(f"{key}={text!r}: expected a boolean (true/false)")
    if tp is int:
        try:
            return int(text)
        except ValueError:
            try:
                as_float = float(text)
            except ValueError:
                as_float = None
            if as_float is not None and as_float.is_integer():
                return int(as_float)
            raise AttrdistError(f"{key}={text!r}: expected an integer") from None
    if tp is float:
        try:
            return float(text)
        except ValueError:
            raise AttrdistError(f"{key}={text!r}: expected a number") from None
    if tp is str:
        return text
    raise AttrdistError(f"{key}: cannot parse values of type {tp}")


def _set(cfg: Any, path: list[str], value: Any) -> Any:
    head, *rest = path
    if not rest:
        return replace(cfg, **{head: value})
    return replace(cfg, **{head: _set(getattr(cfg, head), rest, value)})


def _leaf_type(cfg: Any, path: list[str]) -> Any:
    obj = cfg
    for p in path[:-1]:
        obj = getattr(obj, p)
    return _hints(type(obj))[path[-1]]


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    """Return a new config with `key=value` overrides applied (validated, one-line errors)."""
    known = flatten(cfg)
    for item in overrides:
        if "=" not in item:
            raise AttrdistError(f"{item!r}: overrides are key=value (e.g. optim.lr=3e-4); see --help")
        key, text = item.split("=", 1)
        key = key.strip()
        if key not in known:
            close = difflib.get_close_matches(key, known.keys(), n=3, cutoff=0.75)
            hint = f"; did you mean {', '.join(close)}?" if close else "; see --help for every key"
            raise AttrdistError(f"unknown config key {key!r}{hint}")
        path = key.split(".")
        value = _parse(text, _leaf_type(cfg, path), key)
        cfg = _set(cfg, path, value)
    validate(cfg)
    return cfg


def config_leaves(data: Any, where: str, _prefix: str = "") -> dict[str, Any]:
    """A config file's mapping as dotted key -> value. Sections may be nested as in a run's config.json
    ({"data": {"batch_size": 16}}), written as flat dotted keys ({"data.batch_size": 16}), or mixed; keys are
    checked by `apply_mapping`. A key given twice (nested and dotted) is an AttrdistError naming `where`."""
    if not isinstance(data, dict):
        raise AttrdistError(f"{where}: {_prefix.rstrip('.') or 'the file'} is a {type(data).__name__}, expected a "
                            f"mapping of config keys (nested like a run's config.json, or dotted like data.batch_size)")
    leaves = set(_LEAF_KEYS)
    out: dict[str, Any] = {}
    for k, v in data.items():
        key = f"{_prefix}{k}"
        sub = config_leaves(v, where, key + ".") if isinstance(v, dict) and key not in leaves else {key: v}
        for dup in sub.keys() & out.keys():
            raise AttrdistError(f"{where}: config key {dup!r} is given twice (nested and dotted); keep one")
        out.update(sub)
    return out


def apply_mapping(cfg: Config, leaves: dict[str, Any], where: str) -> Config:
    """`cfg` with the values of a config file (`config_leaves` output) applied: every key must exist (an unknown
    one is an AttrdistError naming `where`, the key and close matches); a string value is parsed like a
    `key=value` override (YAML reads 1e-4 as a string), any other value must fit the field's type as in a
    config.json. Not validated here: the command line's overrides come next, then `validate`."""
    known = flatten(cfg)
    for key, v in leaves.items():
        if key not in known:
            close = difflib.get_close_matches(key, known.keys(), n=3, cutoff=0.75)
            hint = (f"; did you mean {', '.join(close)}?" if close else
                    "; not a config key of this attrdist (see --help for every key)")
            raise AttrdistError(f"{where}: unknown config key {key!r}{hint}")
        path = key.split(".")
        tp = _leaf_type(cfg, path)
        value = _parse(v, tp, f"{where}: {key}") if isinstance(v, str) else _from_json(v, tp, key, where)
        cfg = _set(cfg, path, value)
    return cfg


def validate(cfg: Config) -> None:
    """Range checks that types alone cannot express."""
    d, o, r, m = cfg.data, cfg.optim, cfg.run, cfg.model
    checks = [
        (d.image_size == 0 or d.image_size >= 16, "data.image_size must be >= 16 (or 0 = the model's input size)"),
        (d.eval_resize == 0 or d.eval_resize >= 1, "data.eval_resize must be >= 1 (resize the short side to at least "
                                                   "image_size before the centre crop) or 0 = from the model"),
        (len(d.mean) in (0, 3), "data.mean takes 3 values (R,G,B on the 0..1 scale, e.g. data.mean=0.5,0.5,0.5) or "
                                "none (data.mean= : the model's)"),
        (len(d.std) in (0, 3) and all(v > 0 for v in d.std), "data.std takes 3 positive values (R,G,B on the 0..1 "
                                                            "scale) or none (data.std= : the model's)"),
        (bool(d.mean) == bool(d.std), "data.mean and data.std go together: set both (3 values each) or neither "
                                      "(both from the model)"),
        (d.batch_size >= 1, "data.batch_size must be >= 1"),
        (d.eval_batch_size >= 0, "data.eval_batch_size must be >= 0"),
        (d.decode == "workers" or d.pixel_stage != "workers", "data.decode=device hands JPEG bytes, not pixels, over from "
                                                             "the workers: set data.pixel_stage=auto or device"),
        (d.num_workers >= 0, "data.num_workers must be >= 0"),
        (d.max_corrupt >= 0, "data.max_corrupt must be >= 0"),
        (d.streams >= 1, "data.streams must be >= 1"),
        (d.shuffle_window >= 1, "data.shuffle_window must be >= 1 (shards per window)"),
        (d.cache_limit_gb > 0, "data.cache_limit_gb must be > 0"),
        (d.prefetch_shards >= 0, "data.prefetch_shards must be >= 0"),
        (len(d.eval_labels) >= 1, "data.eval_labels needs at least one label field"),
        (0 < d.augment.crop_scale[0] <= d.augment.crop_scale[1] <= 1, "data.augment.crop_scale must satisfy 0 < lo <= hi <= 1"),
        (0 < d.augment.crop_ratio[0] <= d.augment.crop_ratio[1], "data.augment.crop_ratio must satisfy 0 < lo <= hi"),
        (0 <= d.augment.hue <= 0.5, "data.augment.hue must be in [0, 0.5]"),
        (o.lr > 0, "optim.lr must be > 0"),
        (o.weight_decay >= 0, "optim.weight_decay must be >= 0"),
        (o.clip_grad_norm >= 0, "optim.clip_grad_norm must be >= 0 (0 = off)"),
        (o.grad_accum >= 1, "optim.grad_accum must be >= 1"),
        (o.max_nonfinite >= 0, "optim.max_nonfinite must be >= 0 (0 = stop at the first non-finite step)"),
        (o.temperature > 0, "optim.temperature must be > 0"),
        (r.epochs >= 1, "run.epochs must be >= 1"),
        (r.eval_every >= 1, "run.eval_every must be >= 1"),
        (r.patience >= 0, "run.patience must be >= 0"),
        (r.world_size >= 0, "run.world_size must be >= 0"),
        (r.progress_every_s >= 0, "run.progress_every_s must be >= 0 seconds"),
        (r.dist_timeout_s >= 10, "run.dist_timeout_s must be >= 10 seconds"),
        (m.heads >= 1, "model.heads must be >= 1"),
        (m.heads < 1 or m.dim % m.heads == 0, f"model.dim ({m.dim}) must be divisible by model.heads ({m.heads})"),
        (0 <= m.dropout < 1, "model.dropout must be in [0, 1)"),
        (m.frozen_stages >= 0, "model.frozen_stages must be >= 0"),
        (m.fusion_layers >= 1, "model.fusion_layers must be >= 1"),
        (all(h >= 1 for h in m.head_dims), "model.head_dims are layer widths: each must be >= 1"),
        (r.ckpt_every_epochs >= 0, "run.ckpt_every_epochs must be >= 0 (0 = off)"),
        (not (m.sync_bn and m.freeze_bn_stats), "model.sync_bn and model.freeze_bn_stats exclude each other: synced batch statistics, or none"),
        (r.offload == "none" or r.deepspeed, "run.offload needs run.deepspeed=zero1|zero2|zero3"),
        (r.offload != "nvme" or r.offload_dir, "run.offload=nvme needs run.offload_dir (a directory on a local NVMe disk)"),
        (not r.deepspeed_config or r.deepspeed, "run.deepspeed_config needs run.deepspeed=zero1|zero2|zero3"),
        (not (r.compile and r.deepspeed), f"run.compile=true with run.deepspeed={r.deepspeed}: attrdist compiles DDP "
                                          f"runs only (DeepSpeed's engine.compile and ZeRO's parameter hooks are "
                                          f"untested here); drop one of them"),
    ]
    for f_name in ("hflip", "vflip", "blur", "erase"):
        p = getattr(d.augment, f_name)
        checks.append((0 <= p <= 1, f"data.augment.{f_name} is a probability: must be in [0, 1]"))
    for ok, msg in checks:
        if not ok:
            raise AttrdistError(msg)
    tracker_names(r.log_with)


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def to_json(cfg: Any) -> str:
    return json.dumps(to_dict(cfg), indent=2, sort_keys=False)


def from_dict(cls: type, data: dict, where: str = "config", _prefix: str = "") -> Any:
    """Rebuild a nested config dataclass from `to_dict` output (e.g. a saved config.json). Keys it does not
    know are ignored (a newer attrdist's); a value of the wrong type is an AttrdistError naming `where`
    (the file) and the key."""
    if not isinstance(data, dict):
        raise AttrdistError(f"{where}: {_prefix.rstrip('.') or 'the config'} is a {type(data).__name__}, expected an "
                            f"object of config keys; use a config.json written by attrdist")
    hints = _hints(cls)
    kwargs = {}
    for f in fields(cls):
        if f.name not in data:
            continue
        tp, v = hints[f.name], data[f.name]
        if is_dataclass(tp):
            kwargs[f.name] = from_dict(tp, v, where, f"{_prefix}{f.name}.")
        else:
            kwargs[f.name] = _from_json(v, tp, f"{_prefix}{f.name}", where)
    return cls(**kwargs)


def _from_json(v: Any, tp: Any, key: str, where: str) -> Any:
    """A JSON value checked against a field's annotated type (the JSON twin of `_parse`)."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        if isinstance(v, str) and v in typing.get_args(tp):
            return v
    elif origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return None if v is None and len(args) < len(typing.get_args(tp)) else _from_json(v, args[0], key, where)
    elif origin is tuple:
        args = typing.get_args(tp)
        if isinstance(v, (list, tuple)):
            if len(args) == 2 and args[1] is Ellipsis:
                return tuple(_from_json(x, args[0], key, where) for x in v)
            if len(v) == len(args):
                return tuple(_from_json(x, a, key, where) for x, a in zip(v, args))
    elif tp is bool:
        if isinstance(v, bool):
            return v
    elif tp is int:
        if isinstance(v, int) and not isinstance(v, bool):
            return v
    elif tp is float:
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return float(v)
    elif tp is str:
        if isinstance(v, str):
            return v
    else:
        return v
    raise AttrdistError(f"{where}: {key}={v!r:.80} does not fit its type {getattr(tp, '__name__', tp)}; use a config.json "
                        f"written by attrdist (or fix that value)")


def help_text(cfg: Config) -> str:
    """Every key with its type, current default and help, grouped by section."""
    lines, section = [], None
    for key, (value, f) in flatten(cfg).items():
        if key.startswith("model.detector.") and cfg.model.name != "open_vocab_detector":
            continue  # detector knobs only where they apply
        sec = key.rsplit(".", 1)[0]
        if sec != section:
            lines.append(f"\n[{sec}]")
            section = sec
        shown = ",".join(map(str, value)) if isinstance(value, tuple) else value
        lines.append(f"  {key}={shown}")
        if f.metadata.get("help"):
            lines.append(f"      {f.metadata['help']}")
    return "\n".join(lines)


_LEAF_KEYS = tuple(flatten(Config()))  # config_leaves: a dict under one of these keys is a value, not a section
