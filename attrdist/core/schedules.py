"""Learning-rate schedules as pure functions of the optimizer step (multiplier of optim.lr).

The trainer sets `lr = optim.lr * lr_factor(step, ...)` before every optimizer step, so a
resumed run needs no scheduler state: the step number is the state.
"""

from __future__ import annotations

import math

from attrdist.core.config import ScheduleConfig


def lr_factor(step: int, cfg: ScheduleConfig, steps_per_epoch: int, total_steps: int) -> float:
    spe = max(1, steps_per_epoch)
    warm = int(round(cfg.warmup_epochs * spe))
    if step < warm:
        return (step + 1) / warm
    floor = cfg.min_lr_ratio
    if cfg.name == "constant":
        return 1.0
    if cfg.name == "step":
        return cfg.step_gamma ** ((step - warm) // max(1, int(round(cfg.step_epochs * spe))))
    if cfg.name == "cosine":
        span = max(1, total_steps - warm)
        t = min(1.0, (step - warm) / span)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t))
    if cfg.name == "warm_restarts":  # SGDR (Loshchilov & Hutter): cosine cycles of growing length
        period = max(1, int(round(cfg.restart_epochs * spe)))
        t = step - warm
        while t >= period:
            t -= period
            period *= max(1, cfg.restart_mult)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t / period))
    raise ValueError(cfg.name)
