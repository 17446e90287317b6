"""The training loop's bookkeeping around non-finite steps, against a stand-in engine: real losses and
gradient norms are scripted per step; collectives are the single-rank identity."""

import math

import pytest
import torch

from dist_ft.rank import loop
from dist_ft.rank.loop import LoopConfig, LoopHooks, LoopState, NonFiniteLossError, run_loop

NAN = math.nan


class ScriptedEngine:
    """What the loop uses of a DeepSpeed engine; step k (1-based) has losses[k-1] and norms[k-1]."""
    device = "cpu"

    def __init__(self, losses, norms, fp16=False, weights_finite_until=None):
        self.losses, self.norms, self.fp16 = losses, norms, fp16
        self.weights_finite_until = weights_finite_until
        self.module = torch.nn.Linear(1, 1)
        self.steps = 0

    def __call__(self, **batch):
        return torch.tensor(self.losses[self.steps])

    def backward(self, loss):
        pass

    def step(self):
        self.steps += 1

    def get_lr(self):
        return [1e-3]

    def get_global_grad_norm(self):
        return self.norms[self.steps - 1]

    def fp16_enabled(self):
        return self.fp16

    def weights_finite(self):
        return self.weights_finite_until is None or self.steps <= self.weights_finite_until


@pytest.fixture(autouse=True)
def one_rank(monkeypatch):
    monkeypatch.setattr(loop.ds, "all_reduce_max", lambda value: value)
    monkeypatch.setattr(loop.ds, "all_reduce_mean", lambda value: value)
    monkeypatch.setattr(loop.ds, "parameters_finite", lambda engine: engine.weights_finite())


def train(engine, steps, every=None, stop_at=None):
    saved, rows = [], []
    state = LoopState()
    hooks = LoopHooks(evaluate=None, checkpoint=lambda s, best: saved.append(s.step),
                      stop_requested=lambda: state.step == stop_at, log=rows.append, step_extras=lambda s: {})
    cfg = LoopConfig(total_steps=steps, grad_accum=1, data_parallel=1, checkpoint_every=every,
                     eval_every=None, early_stopping=None)
    batches = iter(lambda: {"input_ids": torch.zeros(1, 4, dtype=torch.long)}, None)
    try:
        return run_loop(engine, batches, state, cfg, hooks), saved, rows
    except NonFiniteLossError as err:
        return err, saved, rows


def test_a_nan_gradient_with_a_finite_loss_counts_as_non_finite_and_is_not_checkpointed():
    outcome, saved, rows = train(ScriptedEngine([1.0] * 4, [1.0, NAN, 1.0, 1.0]), steps=4, every=1)
    assert outcome == "finished" and saved == [1, 3, 4]
    assert [r["nonfinite_steps"] for r in rows] == [0, 1, 1, 1]


def test_a_run_of_nan_gradients_stops_the_stage_but_fp16_loss_scale_skips_do_not():
    outcome, saved, _ = train(ScriptedEngine([1.0] * 8, [1.0] + [NAN] * 7), steps=8, every=1)
    assert isinstance(outcome, NonFiniteLossError) and "gradient" in str(outcome) and saved == [1]
    outcome, saved, _ = train(ScriptedEngine([1.0] * 8, [math.inf] * 8, fp16=True), steps=8, every=4)
    assert outcome == "finished" and saved == [4, 8]


def test_a_stop_request_inside_a_nan_streak_stops_without_a_checkpoint():
    outcome, saved, _ = train(ScriptedEngine([1.0, 1.0, NAN], [1.0] * 3), steps=6, stop_at=3)
    assert outcome == "stopped" and saved == []
    outcome, saved, _ = train(ScriptedEngine([1.0, 1.0, NAN, 1.0], [1.0] * 4), steps=6, stop_at=4)
    assert outcome == "stopped" and saved == [4]  # the streak ended: a sound state again


def test_ending_inside_a_nan_streak_neither_checkpoints_nor_finishes():
    outcome, saved, _ = train(ScriptedEngine([1.0, NAN], [1.0, 1.0]), steps=2)
    assert isinstance(outcome, NonFiniteLossError) and saved == []


def test_weights_stepped_to_inf_by_a_finite_step_are_never_checkpointed():
    outcome, saved, _ = train(ScriptedEngine([1.0] * 4, [1.0] * 4, weights_finite_until=2), steps=4, every=1)
    assert isinstance(outcome, NonFiniteLossError) and "weight" in str(outcome) and saved == [1, 2]
