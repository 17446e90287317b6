"""The learning-rate schedules (dist_ft/plan/schedule.py) are transformers' `get_scheduler` family: each
named one equals transformers' to 1e-6 at every step, with our one convention that the warmup reaches
the peak at its last step (our step s < warmup is transformers' step s + 1)."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import get_scheduler

from dist_ft.plan.schedule import lr_at, lr_multiplier, sparkline, warmup_steps
from dist_ft.recipe.config import Scheduler, effective_scheduler

STEPS = 40


def transformers_lrs(name: str, warmup: int, steps: int, **kwargs) -> list[float]:
    """The lr transformers' scheduler sets before each of steps + 1 optimizer steps (peak lr 1)."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=steps,
                              scheduler_specific_kwargs=kwargs or None)
    lrs = []
    for _ in range(steps + 1):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


# (our scheduler section, transformers' name and scheduler_specific_kwargs); lr 1, so lr_end is a ratio
CASES = {
    "cosine to a floor": (dict(name="cosine", min_lr_ratio=0.1), "cosine_with_min_lr", {"min_lr_rate": 0.1}),
    "cosine to 0": (dict(name="cosine", min_lr_ratio=0.0), "cosine", {}),
    "linear to 0": (dict(name="linear", min_lr_ratio=0.0), "linear", {}),
    "linear to a floor": (dict(name="linear", min_lr_ratio=0.2), "polynomial", {"lr_end": 0.2, "power": 1.0}),
    "polynomial": (dict(name="polynomial", min_lr_ratio=0.05, power=2.0), "polynomial",
                   {"lr_end": 0.05, "power": 2.0}),
    "constant_with_warmup": (dict(name="constant_with_warmup"), "constant_with_warmup", {}),
    "inverse_sqrt": (dict(name="inverse_sqrt"), "inverse_sqrt", {}),
    "warmup_stable_decay": (dict(name="warmup_stable_decay", min_lr_ratio=0.1, decay_ratio=0.25),
                            "warmup_stable_decay", {"num_decay_steps": 10, "min_lr_ratio": 0.1}),
}


@pytest.mark.parametrize("warmup", [0, 1, 6])
@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_each_schedule_is_transformers_own(case, warmup):
    ours, name, kwargs = CASES[case]
    sched = effective_scheduler(Scheduler(**ours, warmup_steps=warmup), None, None)
    theirs = transformers_lrs(name, warmup, STEPS, **kwargs)
    for step in range(STEPS):
        expected = theirs[step + 1] if step < warmup else theirs[step]
        assert lr_multiplier(sched, step, STEPS) == pytest.approx(expected, abs=1e-6), (case, warmup, step)


def test_constant_is_transformers_constant():
    theirs = transformers_lrs("constant", 0, STEPS)
    sched = effective_scheduler(Scheduler(name="constant"), None, None)
    assert [lr_multiplier(sched, s, STEPS) for s in range(STEPS)] == pytest.approx(theirs[:STEPS], abs=1e-6)


def test_warmup_ratio_is_rounded_up_like_transformers_and_equals_those_steps():
    sched = effective_scheduler(Scheduler(name="warmup_stable_decay", warmup_ratio=0.1), None, None)
    assert warmup_steps(sched, 35) == math.ceil(3.5) == 4
    theirs = transformers_lrs("warmup_stable_decay", 4, 35, num_decay_steps=math.ceil(0.1 * 35), min_lr_ratio=0.1)
    ours = [lr_multiplier(sched, s, 35) for s in range(35)]
    assert ours == pytest.approx([theirs[s + 1] if s < 4 else theirs[s] for s in range(35)], abs=1e-6)


def legacy_lr_multiplier(step: int, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """dist_ft/rank/schedule.py before the scheduler section: every run's schedule until then."""
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(total_steps - warmup_steps, 1)
    progress = min(max(step - warmup_steps, 0) / decay_steps, 1.0)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


@pytest.mark.parametrize("warmup,steps", [(0, 10), (1, 6), (2, 12), (30, 200)])
def test_the_default_schedule_is_the_one_every_run_had(warmup, steps):
    sched = effective_scheduler(Scheduler(), warmup, None)  # a recipe with only the stage-level warmup_steps
    for step in range(steps + 2):
        assert lr_multiplier(sched, step, steps) == legacy_lr_multiplier(step, warmup, steps, 0.1)


def test_the_report_points_and_sparkline():
    sched = effective_scheduler(Scheduler(name="warmup_stable_decay", warmup_steps=2, decay_ratio=0.2), None, None)
    first, middle, last = lr_at(sched, 2e-4, 101, (0.0, 0.5, 1.0))
    assert (first, middle) == pytest.approx((2e-4 * (0.1 + 0.9 * 0.5), 2e-4))
    assert 2e-5 < last < 2.2e-5  # the last step is one short of the floor, as transformers'
    line = sparkline(sched, 101, 20)
    assert len(line) == 20 and line[5:15] == "█" * 10 and line[-1] == "▁"
