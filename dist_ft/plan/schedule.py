"""Learning-rate schedules: the multiplier of a stage's peak lr at each optimizer step. Pure.

The plan report and every rank use these functions. Each named schedule is transformers'
(`transformers.get_scheduler(name, ...)`), tested equal to it to 1e-6 (tests/unit/test_schedule.py),
with one convention of our own: the linear warmup reaches the peak at its last step, so step s <
warmup has lr x (s+1)/warmup and no step runs at lr 0 (transformers' ramp starts at 0: our step s is
its step s+1 during the warmup, and the same step after it). Floors: cosine is transformers'
`cosine_with_min_lr`, linear with a floor its `polynomial` of power 1 ending at min_lr_ratio x lr.
"""

from __future__ import annotations

import math

from dist_ft.recipe.config import Scheduler

INVERSE_SQRT_TIMESCALE = 10_000  # transformers' timescale when there is no warmup


def warmup_steps(scheduler: Scheduler, total_steps: int) -> int:
    """The warmup in steps: given, or warmup_ratio of the stage's steps rounded up (as transformers')."""
    if scheduler.warmup_ratio is not None:
        return math.ceil(scheduler.warmup_ratio * total_steps)
    return scheduler.warmup_steps or 0


def decay_steps(scheduler: Scheduler, total_steps: int) -> int:
    """warmup_stable_decay: the steps of the final decay (decay_ratio of the stage's, rounded up)."""
    return math.ceil((scheduler.decay_ratio or 0.0) * total_steps)


def lr_multiplier(scheduler: Scheduler, step: int, total_steps: int) -> float:
    """Multiplier of the peak lr at optimizer step `step` (0-based) of `total_steps`. `scheduler` is
    a stage's effective one (recipe.config.effective_scheduler: every default filled)."""
    warmup = warmup_steps(scheduler, total_steps)
    floor = scheduler.min_lr_ratio or 0.0
    if step < warmup:
        ramp = (step + 1) / warmup
        return floor + (1 - floor) * ramp if scheduler.name == "warmup_stable_decay" else ramp
    name = scheduler.name
    if name in ("constant", "constant_with_warmup"):
        return 1.0
    if name == "inverse_sqrt":
        timescale = warmup or INVERSE_SQRT_TIMESCALE
        return 1.0 / math.sqrt((step + timescale - warmup) / timescale)
    if name == "warmup_stable_decay":
        decay = decay_steps(scheduler, total_steps)
        decay_start = total_steps - decay
        if step < decay_start:
            return 1.0
        progress = min((step - decay_start) / max(1, decay), 1.0)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    progress = min((step - warmup) / max(1, total_steps - warmup), 1.0)
    if name == "cosine":
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    power = scheduler.power if name == "polynomial" else 1.0  # linear: polynomial of power 1
    return floor + (1 - floor) * (1 - progress) ** power


def lr_at(scheduler: Scheduler, lr: float, total_steps: int, fractions: tuple[float, ...]) -> list[float]:
    """The lr at each fraction of the stage (0 = first step, 1 = last step)."""
    last = max(total_steps - 1, 0)
    return [lr * lr_multiplier(scheduler, round(f * last), total_steps) for f in fractions]


SPARK = "▁▂▃▄▅▆▇█"


def sparkline(scheduler: Scheduler, total_steps: int, width: int = 24) -> str:
    """The schedule's shape in `width` characters, from 0 to the peak lr."""
    points = lr_at(scheduler, 1.0, total_steps, tuple(i / max(1, width - 1) for i in range(width)))
    return "".join(SPARK[min(len(SPARK) - 1, int(p * len(SPARK)))] for p in points)
