"""The interface every task implements, and the two small values it exchanges with the trainer.

The trainer (attrdist.train.trainer) owns the process: accelerate, the model's wrapping, the data
order, collectives, checkpoints. A task owns what differs between kinds of learning, as plain
methods the trainer calls at fixed points:

    ds = task.dataset(reader, train=True, ...)             # (index, epoch) -> one sample
    loss, parts = task.forward_loss(model, batch, env)     # one rank's batch -> its training loss
    out = task.eval_batch(model, batch, env)               # one rank's eval batch -> EvalBatch
    rec, details = task.evaluate(split, outputs, tune=...) # a whole split's gathered outputs -> metrics
    task.report(...)                                       # its section of report.md / report.json

A task does no collectives and no I/O of its own beyond reading its pack: the evaluation pass gathers
`EvalBatch.per_sample` from every rank (in split order), concatenates `objects` and sums `sums`.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Callable

import torch


@dataclass(frozen=True)
class StepEnv:
    """What a task needs to run the model: the device, the autocast context of this run, the model's
    memory format, and `mean_counts` (several ranks: the all-ranks mean of a tensor of counts, so that a loss
    divides by global counts; None with one process)."""

    device: torch.device
    autocast: Callable[[], contextlib.AbstractContextManager]
    memory_format: torch.memory_format = torch.contiguous_format
    mean_counts: Callable[[torch.Tensor], torch.Tensor] | None = None


@dataclass
class EvalBatch:
    """What one rank's evaluation batch yields. `per_sample`: tensors with one row per sample of the batch,
    including "index" (-1: padding) and "valid"; gathered from all ranks and put in split order with
    padding and invalid samples dropped. `objects`: anything else (e.g. COCO detections), concatenated
    over ranks. `sums`: a tensor summed over batches and ranks (e.g. a loss and its sample count)."""

    per_sample: dict[str, torch.Tensor] | None = None
    objects: list = field(default_factory=list)
    sums: torch.Tensor | None = None


@dataclass
class EvalOutputs:
    """A whole split's evaluation outputs, the same on every rank (attrdist.train.evaluation)."""

    per_sample: dict  # name -> numpy array, one row per evaluated sample, in split order
    objects: list
    sums: torch.Tensor | None
    corrupt: int  # samples that failed to decode, all ranks
    seconds: float  # the pass's wall time (forward, gather, decode)
    n: int  # samples asked for (the split, or its subset)
    reader: object = None  # the split's ShardReader


class Task:
    """Defaults shared by every task; a task module subclasses this as `Task`."""

    kind = "?"
    headline = "?"  # the metric of the report's headline (a key of `evaluate`'s details)
    gathers_objects = False  # whether eval_batch yields `objects` (then gathered from every rank)
    pixel_stage = False  # whether samples carry the pixel-wise stage (data.pixel_stage: workers or device)

    def __init__(self, cfg, manifest=None):
        self.cfg, self.manifest = cfg, manifest

    def describe(self) -> str:
        """A line for train.log about how the task uses the data, or ""."""
        return ""

    # ------------------------------------------------------------------ data
    def dataset(self, reader, *, train: bool, pixels_in_workers: bool, image_dtype: torch.dtype):
        raise NotImplementedError

    def collate(self, samples: list[dict]) -> dict:
        raise NotImplementedError

    # ------------------------------------------------------------------ model
    def prepare(self, model: torch.nn.Module) -> None:
        """After the model is built or its weights loaded (e.g. the detector encodes its class prompts)."""

    def eval_mode(self, model: torch.nn.Module) -> contextlib.AbstractContextManager:
        """Held around an evaluation pass (e.g. the detector classifies against every class, novel ones too)."""
        return contextlib.nullcontext()

    def forward_loss(self, model, batch: dict, env: StepEnv) -> tuple[torch.Tensor, dict]:
        raise NotImplementedError

    def eval_batch(self, model, batch: dict, env: StepEnv) -> EvalBatch:
        raise NotImplementedError

    def inference_input(self, ds, n: int, batch: int, env: StepEnv):
        """One real evaluation batch as the model takes it (what the report's inference figure times)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ metrics and report
    def nonfinite_outputs(self, outputs: EvalOutputs) -> tuple[int, int]:
        """(samples whose outputs are NaN/Inf, samples): diverged weights stop the run."""
        return 0, 0

    def evaluate(self, split: str, outputs: EvalOutputs, *, tune: bool = False) -> tuple[dict, dict]:
        """(scalar record {"<split>/<...>": value}, details for the report) of one evaluated split."""
        raise NotImplementedError

    def headline_keys(self, split: str) -> list[str]:
        """The metric records plotted in curves.png."""
        raise NotImplementedError

    def log_keys(self) -> tuple[str, ...]:
        """The metrics (last part of their record key) of an evaluation's log line, besides the loss."""
        return (self.headline,)

    def higher_is_better(self, metric: str) -> bool:
        """Whether a larger value of the record `metric` (run.monitor) is better; a loss is minimised."""
        return "loss" not in metric.rsplit("/", 1)[-1]

    def state_dict(self) -> dict[str, torch.Tensor]:
        """What the task learns from evaluations and a checkpoint keeps (e.g. thresholds tuned on val)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def headline_text(self, results: dict) -> str:
        raise NotImplementedError

    def report_header(self, n_train: int, model=None) -> list[str]:
        """report.md's lines about the data (after the run directory); `model`: the unwrapped model."""
        raise NotImplementedError

    def report_sections(self, results: dict, run_dir, recipe: str) -> list[str]:
        """report.md's sections after the headline: the metrics of each split."""
        raise NotImplementedError

    def report_json(self, results: dict) -> dict:
        """Fields of report.json beside the common ones."""
        return {}

    def confusion(self, results: dict) -> tuple[list[list[int]], list[str], str] | None:
        """(matrix, class names, title) drawn as confusion.png, if the task has one."""
        return None


def fmt(v) -> str:
    """A figure as report.md shows it: 4 decimals, "n/a" for a missing or NaN value."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    return f"{v:.4f}" if isinstance(v, float) else str(v)
