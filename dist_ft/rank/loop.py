"""The one training loop, for every stage and method. Methods differ in which parameters
train (decided before the engine is built), never here."""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch

from . import engine as ds
from .early_stopping import Rule, judge


@dataclass
class LoopState:
    step: int = 0
    tokens_seen: int = 0
    nonfinite_steps: int = 0
    consecutive_nonfinite: int = 0  # never saved: no checkpoint is taken inside a run of non-finite steps
    best_value: float | None = None  # early stopping: the best evaluation so far, and its (checkpointed) step
    best_step: int | None = None
    evals_without_gain: int = 0
    early_stopped: bool = False  # a restart after an early stop goes straight to the export

    def state_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "consecutive_nonfinite"}

    @classmethod
    def from_state_dict(cls, saved: dict[str, Any]) -> LoopState:
        """The saved state; a checkpoint from before a field existed gets its default."""
        return cls(**{name: saved[name] for name in cls().state_dict() if name in saved})


@dataclass(frozen=True)
class LoopConfig:
    total_steps: int
    grad_accum: int
    data_parallel: int  # ranks reading different batches (a sequence-parallel group shares one)
    checkpoint_every: int | None
    eval_every: int | None
    early_stopping: Rule | None
    max_consecutive_nonfinite: int = 5


@dataclass(frozen=True)
class LoopHooks:
    """What the loop asks of the stage: evaluation, checkpointing, the stop request, metrics.
    `evaluate(step)` runs on every rank and returns the same {metric: value} on each (rank 0's);
    `checkpoint(state, best)` saves, `best` marking the checkpoint of the best evaluation."""
    evaluate: Callable[[int], dict[str, float]] | None
    checkpoint: Callable[[LoopState, bool], None]
    stop_requested: Callable[[], bool]
    log: Callable[[dict[str, Any]], None]
    step_extras: Callable[[float], dict[str, Any]]  # step time → tokens/s, memory, MFU


class NonFiniteLossError(RuntimeError):
    pass


def run_loop(engine, batches: Iterator[dict[str, torch.Tensor]], state: LoopState, cfg: LoopConfig,
             hooks: LoopHooks) -> str:
    """Train until total_steps. Returns "finished" or "early_stopped" (both checkpointed), or "stopped" on
    request: checkpointed, unless the last steps were non-finite (a rerun resumes from the last good one).
    Raises NonFiniteLossError rather than checkpoint, or end on, a non-finite state.

    Evaluations run every eval_every steps and once at the end (unless the last step was one); with early
    stopping, each improvement is checkpointed as the best, and patience evaluations without one stop."""
    if state.early_stopped:  # a restart after the early stop was checkpointed: nothing left to train
        return "early_stopped"
    while state.step < cfg.total_steps:
        started = time.perf_counter()
        lr = engine.get_lr()[0]  # the scheduler moves on inside the step
        loss, tokens, loss_finite = _optimizer_step(engine, batches, cfg.grad_accum, cfg.data_parallel)
        grad_norm = _grad_norm(engine)
        grad_finite = _gradient_finite(engine, grad_norm)  # a collective: every rank, every step
        state.step += 1
        state.tokens_seen += tokens
        _account_nonfinite(state, loss_finite and grad_finite, cfg)
        row = {"step": state.step, "loss": loss, "lr": lr, "tokens_seen": state.tokens_seen,
               "grad_norm": grad_norm, "nonfinite_steps": state.nonfinite_steps}
        row.update(hooks.step_extras(time.perf_counter() - started))
        hooks.log(row)
        _stop_on_nonfinite_streak(state, cfg)
        if _evaluate_now(state, cfg) and _evaluate(state, cfg, hooks):
            state.early_stopped = True
            _final_checkpoint(engine, state, hooks)
            return "early_stopped"
        if hooks.stop_requested():
            if state.consecutive_nonfinite == 0:
                _checkpoint(engine, state, hooks)
            return "stopped"
        if _checkpoint_due(state, cfg) or (_is_best(state) and state.step < cfg.total_steps):
            _checkpoint(engine, state, hooks)
    if hooks.evaluate is not None and not _evaluate_now(state, cfg):  # the last weights, once
        _evaluate(state, cfg, hooks)
    _final_checkpoint(engine, state, hooks)
    return "finished"


def _is_best(state: LoopState) -> bool:
    return state.best_step is not None and state.best_step == state.step


def _checkpoint(engine, state: LoopState, hooks: LoopHooks) -> None:
    """Save, unless a weight is NaN/inf on some rank: a finite loss and gradient can still step a weight
    to inf, and a checkpoint of it would be where every restart resumes."""
    if not ds.parameters_finite(engine):
        raise NonFiniteLossError(f"a weight is NaN/inf after step {state.step}; not checkpointing it: the last "
                                 "good checkpoint stays the latest")
    hooks.checkpoint(state, _is_best(state))


def _final_checkpoint(engine, state: LoopState, hooks: LoopHooks) -> None:
    """The checkpoint the stage is exported from: never one taken inside a run of non-finite steps."""
    if state.consecutive_nonfinite:
        raise NonFiniteLossError(f"the stage ended on {state.consecutive_nonfinite} optimizer step(s) with a NaN/inf "
                                 f"loss or gradient (step {state.step}); not checkpointing or exporting it: the "
                                 "last good checkpoint stays the latest")
    _checkpoint(engine, state, hooks)


def _checkpoint_due(state: LoopState, cfg: LoopConfig) -> bool:
    """Periodic checkpoints, except inside a run of non-finite steps: the last good one must stay."""
    return (bool(cfg.checkpoint_every) and state.step % cfg.checkpoint_every == 0
            and state.step < cfg.total_steps and state.consecutive_nonfinite == 0)


def _optimizer_step(engine, batches, grad_accum: int, data_parallel: int) -> tuple[float, int, bool]:
    """grad_accum micro-steps; DeepSpeed applies the update on the last. A non-finite loss on any
    rank turns that micro-batch into a zero-gradient one on every rank, so collectives stay aligned.
    The engine's module returns the chunked loss (no full-vocabulary logits)."""
    total, finite_all, tokens = 0.0, True, 0
    for _ in range(grad_accum):
        batch = {k: v.to(engine.device) for k, v in next(batches).items()}
        raw = engine(**batch)
        finite = ds.all_reduce_max(0.0 if torch.isfinite(raw).item() else 1.0) == 0.0
        loss = raw if finite else _zero_loss(engine)
        engine.backward(loss)
        engine.step()
        finite_all &= finite
        total += ds.all_reduce_mean(raw.item()) if finite else math.nan
        tokens += int(batch["input_ids"].numel()) * data_parallel
    return total / grad_accum, tokens, finite_all


def _zero_loss(engine) -> torch.Tensor:
    params = [p for p in engine.module.parameters() if p.requires_grad]
    return sum(p.sum() for p in params) * 0.0


def _account_nonfinite(state: LoopState, finite: bool, cfg: LoopConfig) -> None:
    if finite:
        state.consecutive_nonfinite = 0
        return
    state.nonfinite_steps += 1
    state.consecutive_nonfinite += 1


def _stop_on_nonfinite_streak(state: LoopState, cfg: LoopConfig) -> None:
    if state.consecutive_nonfinite >= cfg.max_consecutive_nonfinite:
        raise NonFiniteLossError(f"{state.consecutive_nonfinite} optimizer steps in a row had a NaN/inf loss or "
                                 f"gradient (step {state.step}); stopping with the last good checkpoint intact")


def _grad_norm(engine) -> float | None:
    norm = engine.get_global_grad_norm()
    return float(norm) if norm is not None else None


def _gradient_finite(engine, norm: float | None) -> bool:
    """Whether the step's gradient norm was finite on every rank. DeepSpeed skips an update whose norm
    is NaN/inf (and reports inf): that step trained nothing, like a non-finite loss. Under fp16 such
    skips are the dynamic loss scale searching downwards, and DeepSpeed stops at its minimum scale."""
    if engine.fp16_enabled():
        return True
    local = norm is None or math.isfinite(norm)
    return ds.all_reduce_max(0.0 if local else 1.0) == 0.0


def _evaluate_now(state: LoopState, cfg: LoopConfig) -> bool:
    return bool(cfg.eval_every) and state.step % cfg.eval_every == 0


def _evaluate(state: LoopState, cfg: LoopConfig, hooks: LoopHooks) -> bool:
    """Evaluate and log; with early stopping, judge the result. Whether to stop (the same on every rank:
    the values are rank 0's on all of them)."""
    if hooks.evaluate is None:
        return False
    values = hooks.evaluate(state.step)
    if values:
        hooks.log({"step": state.step, **values})
    if cfg.early_stopping is None or not values:
        return False
    verdict = judge(cfg.early_stopping, values, state.step, state.best_value, state.best_step,
                    state.evals_without_gain, can_keep=state.consecutive_nonfinite == 0)
    state.best_value, state.best_step = verdict.best_value, verdict.best_step
    state.evals_without_gain = verdict.evals_without_gain
    return verdict.stop
