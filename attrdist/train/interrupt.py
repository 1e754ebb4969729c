"""A stop request for this process: SIGTERM or SIGUSR2 (SLURM's preemption and time-limit signal)
asks the training loop to checkpoint at the end of the current step and stop.

The request is process-wide because signals are: a SLURM task installs the handler as soon as it
starts (`attrdist.train.slurm_job`), so a signal that arrives while the data or the model are still being
prepared is not lost; the trainer's loop reads it after every optimizer step and agrees on it with
every rank through the step's all-reduce, so all ranks save the same step.
"""

from __future__ import annotations

import signal
import threading

SIGNALS = (signal.SIGTERM, signal.SIGUSR2)
_requested = [0]


def _on_signal(signum, _frame) -> None:
    _requested[0] = signum


def requested() -> int:
    """The signal number that asked this process to stop, or 0."""
    return _requested[0]


def clear() -> None:
    _requested[0] = 0


def install() -> dict:
    """Route SIGTERM/SIGUSR2 to the stop request; returns the previous handlers (for `restore`).
    Off the main thread (where Python cannot set handlers) nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {s: signal.signal(s, _on_signal) for s in SIGNALS}


def restore(previous: dict) -> None:
    for s, h in previous.items():
        signal.signal(s, h)


def finish(previous: dict) -> None:
    """The task's work is over (finished, requeued or failed): restore the handlers, then ignore SIGUSR2.
    A late time-limit warning or preemption signal must not change the outcome: CPython resets
    Python-level handlers to SIG_DFL early in interpreter shutdown, and USR2's default action kills the
    process, which SLURM then records as FAILED with exit 12 (seen in CI); submitit's own handler would
    requeue a job that has already finished."""
    restore(previous)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGUSR2, signal.SIG_IGN)


class Interrupted(SystemExit):
    """Raised on every rank once a stop request has been agreed and the checkpoint is written.
    Exit status 128 + the signal, like a process the signal had killed."""

    def __init__(self, signum: int, step: int, run_dir):
        super().__init__(128 + signum)
        self.signum, self.step, self.run_dir = signum, step, run_dir
