"""Progress with rate and ETA (rank 0): a tqdm bar when stderr is a terminal; otherwise plain log lines
(train.log, SLURM logs, files), never a carriage return, so `python -m launch tail` shows clean lines.

    p = Progress("eval val", total=40, unit="batch", enabled=rank0, every_s=30)
    for batch in loader:
        ...
        p.update()          # bar on a terminal; a line at most every `every_s` seconds (and the last one) otherwise
    p.close()

Training uses `rate_eta` for its periodic log line and a bar (`Progress(..., lines=False)`) on a terminal.
"""

from __future__ import annotations

import logging
import sys
import time

log = logging.getLogger("attrdist")


def stderr_is_terminal() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def fmt_duration(seconds: float) -> str:
    if seconds != seconds or seconds == float("inf"):
        return "?"
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def plural(unit: str) -> str:
    return unit + ("es" if unit.endswith(("ch", "sh", "s", "x")) else "s")


def rate_eta(done: int, total: int, elapsed: float, unit: str) -> str:
    """'3.2 step/s, ETA 0:01:05' for `done` of `total` units in `elapsed` seconds (of this launch)."""
    if done <= 0 or elapsed <= 0:
        return f"{unit}/s ?, ETA ?"
    rate = done / elapsed
    shown = f"{rate:.2f} {unit}/s" if rate >= 1 else f"{1 / rate:.2f} s/{unit}"
    return f"{shown}, ETA {fmt_duration(max(0, total - done) / rate) if total else '?'}"


class Progress:
    """`done`/`total` units with rate and ETA; `initial`: units already done before this launch (a resumed
    run): shown in the count, not in the rate. `lines`: also log plain lines when stderr is not a terminal."""

    def __init__(self, what: str, total: int, unit: str, enabled: bool = True, every_s: float = 30.0,
                 initial: int = 0, lines: bool = True):
        self.what, self.total, self.unit, self.every_s = what, total, unit, every_s
        self.enabled, self.lines = enabled, lines
        self.initial = self.done = initial
        self.t0 = self.last = time.perf_counter()
        self.bar = None
        if enabled and stderr_is_terminal():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=what, unit=unit, file=sys.stderr, dynamic_ncols=True,
                            leave=False)
        elif enabled and lines:
            log.info("%s: %d/%d %s", what, initial, total, plural(unit))

    def update(self, n: int = 1, **postfix) -> None:
        if not self.enabled:
            return
        self.done += n
        if self.bar is not None:
            if postfix:
                self.bar.set_postfix(postfix, refresh=False)
            self.bar.update(n)
            return
        now = time.perf_counter()
        if self.lines and (now - self.last >= self.every_s or self.done >= self.total):
            self.last = now
            log.info("%s: %d/%d %s, %s", self.what, self.done, self.total, plural(self.unit),
                     rate_eta(self.done - self.initial, self.total - self.initial, now - self.t0, self.unit))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
