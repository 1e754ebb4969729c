"""The training loop's state and its transitions: frozen data and pure functions.

The loop (attrdist.train.trainer) holds one `LoopState` and replaces it after each global batch,
optimizer step, epoch and evaluation; a checkpoint saves it whole (`dataclasses.asdict`) and a resume
starts from it. Every decision the loop takes ("is it time to evaluate / save / log", "stop for too
many skipped steps") is a predicate of the state and the config, so it can be tested without a model:

    s = LoopState()
    s = after_batch(s, global_batch=32)                   # one global (micro-)batch read
    s = after_step(s, skipped=False, corrupt=0)           # one optimizer step taken (or skipped)
    s = step_agreed(step_taken(s), skipped=False, corrupt=0)   # the same in two halves (run.host_sync=lagged)
    if itstime(s.step, cfg.run.log_every, first=True): ...
    s = after_epoch(s)
    s = after_eval(s, value=0.91)                         # value: higher is better
    stop = patience_exhausted(s, cfg.run.patience)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace


@dataclass(frozen=True)
class LoopState:
    epoch: int = 0
    batch: int = 0  # global batches done in `epoch`
    step: int = 0  # optimizer steps done
    samples: int = 0
    best: float = -math.inf  # the monitored metric, signed so that higher is better
    best_step: int = -1
    bad_evals: int = 0  # evaluations in a row without improvement
    corrupt: int = 0  # training samples skipped as corrupt, in the whole run
    corrupt_shards: dict = field(default_factory=dict)  # {"training": {shard file: skipped}, eval split: {...}}
    stopped_early: bool = False
    nonfinite: int = 0  # optimizer steps skipped for a NaN/Inf loss or gradient, in total
    nonfinite_streak: int = 0  # ... in a row, up to the last step


def after_batch(s: LoopState, global_batch: int) -> LoopState:
    """One global batch (a micro-batch of the step when optim.grad_accum > 1) has been through backward."""
    return replace(s, batch=s.batch + 1, samples=s.samples + global_batch)


def after_step(s: LoopState, *, skipped: bool, corrupt: int) -> LoopState:
    """An optimizer step was taken, or `skipped` (a non-finite loss/gradient on some rank); `corrupt`:
    samples of this step's batches that were skipped as undecodable, all ranks together."""
    return step_agreed(step_taken(s), skipped=skipped, corrupt=corrupt)


def step_taken(s: LoopState) -> LoopState:
    """The count of `after_step` alone: an optimizer step has been taken or skipped (run.host_sync=lagged
    counts it when the step is queued on the device, and learns which it was one step later)."""
    return replace(s, step=s.step + 1)


def step_agreed(s: LoopState, *, skipped: bool, corrupt: int) -> LoopState:
    """The rest of `after_step`: what every rank agreed about the latest step whose agreement has been read
    (steps are read in order, so the streak is the same as when each is read at once)."""
    return replace(s, nonfinite=s.nonfinite + skipped, nonfinite_streak=s.nonfinite_streak + 1 if skipped else 0,
                   corrupt=s.corrupt + corrupt)


def after_epoch(s: LoopState) -> LoopState:
    return replace(s, epoch=s.epoch + 1, batch=0)


def with_corrupt_shards(s: LoopState, where: str, counts: dict) -> LoopState:
    """The per-shard counts of skipped samples `where` ("training", or an evaluated split: its latest pass)."""
    return replace(s, corrupt_shards={**s.corrupt_shards, where: dict(counts)})


def after_eval(s: LoopState, value: float) -> LoopState:
    """An evaluation gave `value` (higher is better): a new best, or one more evaluation without improvement."""
    if value > s.best:
        return replace(s, best=value, best_step=s.step, bad_evals=0)
    return replace(s, bad_evals=s.bad_evals + 1)


def patience_exhausted(s: LoopState, patience: int) -> bool:
    """Early stopping: `patience` > 0 evaluations in a row without improvement."""
    return bool(patience and s.bad_evals >= patience)


def improved(s: LoopState) -> bool:
    """Whether the evaluation that made `s` (after_eval) set a new best."""
    return s.bad_evals == 0 and s.best_step == s.step


def itstime(count: int, every: int, *, total: int | None = None, first: bool = False, last: bool = False) -> bool:
    """Whether periodic work falls due at `count` (1-based: the step or epoch just finished): every `every`
    (0: never), or at the first, or at the last (`total`)."""
    return bool((every and count % every == 0) or (first and count == 1) or (last and total and count >= total))


def epoch_done(s: LoopState, batches_per_epoch: int) -> bool:
    return s.batch >= batches_per_epoch


def steps_done(s: LoopState, max_steps: int) -> bool:
    """run.max_steps reached (0: no limit)."""
    return bool(max_steps and s.step >= max_steps)


def monitored(value: float, higher_is_better: bool) -> float:
    """The monitored metric signed so that higher is better (a loss is minimised)."""
    return value if higher_is_better else -value
