"""Early stopping that keeps the best model: the decision after each evaluation, as a pure function.

The loop applies it to its state on every rank with the same numbers (rank 0's, broadcast by the stage's
evaluation), so every rank reaches the same verdict at the same step and they stop together. An
improvement is checkpointed and that checkpoint is protected from `keep_last` rotation
(checkpoint.py `best`); the stage exports it (trainer.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from dist_ft.recipe.config import EarlyStopping


@dataclass(frozen=True)
class Rule:
    metric: str  # a logged evaluation metric: eval_loss, eval_rouge_l, ...
    direction: str  # "min" | "max"
    patience: int
    min_delta: float = 0.0

    @classmethod
    def from_config(cls, section: EarlyStopping) -> Rule:
        return cls(section.metric, section.direction, section.patience, section.min_delta)


@dataclass(frozen=True)
class Verdict:
    improved: bool
    stop: bool
    best_value: float | None
    best_step: int | None
    evals_without_gain: int


def judge(rule: Rule, values: dict[str, float], step: int, best_value: float | None, best_step: int | None,
          evals_without_gain: int, can_keep: bool = True) -> Verdict:
    """The verdict on an evaluation at `step` with `values` ({metric: value}), given the best so far.

    A value improves when it beats the best by more than min_delta in the rule's direction; a tie, a
    missing or NaN value does not. `can_keep` False (the step cannot be checkpointed: inside a run of
    non-finite steps) turns an improvement into no gain, so the best always has a checkpoint. Patience
    counts evaluations without gain; reaching it stops."""
    value = values.get(rule.metric)
    better = (value is not None and math.isfinite(value) and can_keep
              and (best_value is None or _beats(rule, value, best_value)))
    if better:
        return Verdict(True, False, value, step, 0)
    misses = evals_without_gain + 1
    return Verdict(False, misses >= rule.patience, best_value, best_step, misses)


def _beats(rule: Rule, value: float, best: float) -> bool:
    if rule.direction == "min":
        return value < best - rule.min_delta
    return value > best + rule.min_delta
