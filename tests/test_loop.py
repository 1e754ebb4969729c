"""attrdist.core.loop: the training loop's state transitions and `itstime` predicates, as pure functions
(the trainer's decisions, testable without a model)."""

from __future__ import annotations

import dataclasses
import math

import pytest

from attrdist.core import loop
from attrdist.core.loop import LoopState, itstime


def test_state_is_frozen_and_round_trips_through_a_checkpoint_dict():
    s = loop.with_corrupt_shards(loop.after_step(loop.after_batch(LoopState(), 32), skipped=True, corrupt=2),
                                 "training", {"train-000001.tar": 2})
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.step = 5
    assert LoopState(**dataclasses.asdict(s)) == s  # what checkpoint.save writes and a resume reads
    assert (s.batch, s.samples, s.step, s.nonfinite, s.nonfinite_streak, s.corrupt) == (1, 32, 1, 1, 1, 2)
    assert s.corrupt_shards == {"training": {"train-000001.tar": 2}}


def test_skipped_steps_count_in_total_and_in_a_row():
    s = LoopState()
    for skipped in (True, True, False, True):
        s = loop.after_step(s, skipped=skipped, corrupt=0)
    assert (s.step, s.nonfinite, s.nonfinite_streak) == (4, 3, 1)


def test_epoch_and_step_limits():
    s = LoopState(batch=7)
    assert loop.epoch_done(s, 7) and not loop.epoch_done(s, 8)
    s = loop.after_epoch(s)
    assert (s.epoch, s.batch) == (1, 0)
    assert not loop.steps_done(LoopState(step=10), 0) and loop.steps_done(LoopState(step=10), 10)


def test_best_bad_evals_and_early_stopping():
    s = LoopState(step=10)
    assert s.best == -math.inf
    s = loop.after_eval(s, 0.5)
    assert loop.improved(s) and (s.best, s.best_step, s.bad_evals) == (0.5, 10, 0)
    s = loop.after_eval(dataclasses.replace(s, step=20), 0.5)  # equal is no improvement
    assert not loop.improved(s) and (s.best_step, s.bad_evals) == (10, 1)
    assert not loop.patience_exhausted(s, 2) and not loop.patience_exhausted(s, 0)
    s = loop.after_eval(dataclasses.replace(s, step=30), 0.4)
    assert loop.patience_exhausted(s, 2) and not loop.patience_exhausted(s, 0)  # 0: never
    s = loop.after_eval(dataclasses.replace(s, step=40), 0.6)
    assert loop.improved(s) and (s.best, s.best_step, s.bad_evals) == (0.6, 40, 0)
    assert loop.monitored(0.3, higher_is_better=False) == -0.3 and loop.monitored(0.3, True) == 0.3


@pytest.mark.parametrize("count,every,kw,want", [
    (10, 10, {}, True), (5, 10, {}, False), (5, 0, {}, False), (1, 10, {"first": True}, True),
    (1, 10, {}, False), (12, 5, {"total": 12, "last": True}, True), (12, 5, {"total": 12}, False),
    (11, 5, {"total": 12, "last": True}, False), (3, 1, {}, True),
])
def test_itstime(count, every, kw, want):
    assert itstime(count, every, **kw) is want
