"""One stage on one rank: model, method, data, engine, resume, loop, export.

Data flows one way: plan.json → model + data → DeepSpeed engine → loop → checkpoint/export/metrics.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch

from . import batching
from . import engine as ds
from .checkpoint import clear_tag, commit, ensure_universal, resume_choice, tag_for
from .distributed import DistEnv, read_env
from .evaluate import evaluate_after_stage
from .loss import LanguageModelLoss, TokenMean, choose_head_kernel
from .loop import LoopConfig, LoopHooks, LoopState, NonFiniteLossError, run_loop
from .metrics import NullMetrics, RankZeroMetrics, mfu
from .plan import Plan, StagePlan
from .run_dir import StageDir
from .schedule import lr_multiplier
from .stage_data import StageData, load_stage_data
from .stage_model import build_stage_model, export_stage, stage_tokenizer
from .stop import StopRequest


def train_stage(plan: Plan, stage: StagePlan) -> int:
    env = read_env()
    ds.init_distributed(env, plan.cluster.collective_timeout_minutes)
    folder = plan.run.stage(stage.name)
    if ds.broadcast_from_main(folder.done.exists() if env.is_main else None):  # one answer for all ranks
        _say(env, f"[{stage.name}] already complete ({folder.done}); nothing to do")
        return 0
    torch.manual_seed(plan.seed + stage.index)
    ds_config = _ds_config_for_world(plan, stage, env)
    tokenizer = stage_tokenizer(plan)
    data = load_stage_data(plan, stage, env, tokenizer, ds_config)
    _say(env, data.report)
    model = build_stage_model(plan, stage, ds_config, tokenizer)
    total_steps = stage.steps or max(1, math.ceil(stage.epochs * data.steps_per_epoch))
    resume_from = _find_resume(folder, data.dp_size, env)
    if resume_from and resume_from[0] == folder.universal:
        ds_config["checkpoint"] = {"load_universal": True}
    mpu, sp = _sequence_parallel(plan.sp, model, ds_config)
    kernel = choose_head_kernel(plan.model.loss_kernel, model, torch.cuda.is_available())
    token_mean = TokenMean(ds.token_mean_gradient_factor(ds_config, data.dp_size, plan.sp))
    wrapped = LanguageModelLoss(model, plan.model.loss_chunk_tokens, sequence_parallel=sp,
                                offload_activations=plan.model.offload_activations, head_kernel=kernel,
                                token_mean=token_mean)
    engine = ds.build_engine(wrapped, ds_config, lambda s: lr_multiplier(
        s, stage.warmup_steps, total_steps, stage.min_lr / stage.lr if stage.lr else 1.0), mpu=mpu)
    state = _resume(engine, resume_from, data, env)
    _write_rank_info(folder, env, data, engine)
    metrics = _metrics(plan, stage, env, folder, total_steps, state.step)
    outcome = _train(plan, stage, env, engine, data, state, total_steps, metrics, folder)
    if outcome == "failed":
        return 1
    if outcome != "stopped":
        export_stage(plan, stage, engine, tokenizer, env)
        if env.is_main:
            folder.done.write_text(json.dumps({"step": state.step, "outcome": outcome}) + "\n")
    ds.barrier()
    if outcome != "stopped" and env.is_main and plan.evaluation and plan.evaluation.after_each_stage:
        del engine  # the export is reloaded for eval; the engine's optimizer state is no longer needed
        _release_accelerator_memory()
        evaluate_after_stage(plan, stage.name)
    return 0


def _release_accelerator_memory() -> None:
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _sequence_parallel(degree: int, model, ds_config: dict[str, Any]):
    """(DeepSpeed's mpu, our slice of each batch) under Ulysses; (None, None) without it."""
    if degree == 1:
        return None, None
    mpu = ds.enable_sequence_parallel(model, degree, ds_config["train_micro_batch_size_per_gpu"])
    return mpu, ds.sequence_parallel_group(mpu, ds_config)


def _train(plan, stage, env, engine, data, state, total_steps, metrics, folder) -> str:
    stop = StopRequest(plan.run.stop_file(stage.name))
    save = _checkpointer(plan, stage, env, engine, data, folder.checkpoints, resumed_at=state.step)
    cfg = LoopConfig(total_steps=total_steps, grad_accum=engine.gradient_accumulation_steps(),
                     seq_len=stage.seq_len, data_parallel=data.dp_size,
                     checkpoint_every=plan.checkpointing.every_steps,
                     eval_every=stage.eval_every, early_stopping_patience=stage.early_stopping_patience)
    hooks = LoopHooks(evaluate=data.evaluator(engine), checkpoint=save, stop_requested=stop.agreed,
                      log=lambda row: metrics.log({"stage": stage.name, "seq_len": stage.seq_len,
                                                   "restart": env.restart_count, **row}),
                      step_extras=_step_extras(plan, stage, env, engine))
    try:
        outcome = run_loop(engine, iter(data.train), state, cfg, hooks)
    except NonFiniteLossError as err:
        _say(env, f"error: [{stage.name}] {err}", err=True)
        metrics.close()
        return "failed"
    metrics.close()
    _say(env, f"[{stage.name}] {outcome} at step {state.step}/{total_steps}{_resume_note(outcome, state)}")
    return outcome


def _resume_note(outcome: str, state: LoopState) -> str:
    if outcome != "stopped":
        return ""
    if state.consecutive_nonfinite:
        return " without a checkpoint (its last steps were NaN/inf); resume continues from the last good one"
    return " (checkpointed; resume continues here)"


def _checkpointer(plan, stage, env, engine, data, folder: Path, resumed_at: int):
    frozen_excluded = stage.method != "full"

    def save(state: LoopState) -> None:
        if state.step == resumed_at:  # a restart after the last step: that checkpoint is this very state
            return
        tag = tag_for(state.step)
        if env.is_main:
            clear_tag(folder, tag)
        ds.barrier()
        ds.save_checkpoint(engine, folder, tag, {"dist_ft": _client_state(state, data)}, frozen_excluded)
        ds.barrier()
        if env.is_main:
            commit(folder, tag, {"step": state.step, "dp": data.dp_size, "world_size": env.world_size,
                                 "time": time.time(), "restart": env.restart_count},
                   plan.checkpointing.keep_last)
        ds.barrier()

    return save


def _client_state(state: LoopState, data: StageData) -> dict[str, Any]:
    return {"step": state.step, "tokens_seen": state.tokens_seen, "nonfinite_steps": state.nonfinite_steps,
            "best_eval": state.best_eval, "evals_without_gain": state.evals_without_gain,
            "data": data.train.state_dict()}


def _find_resume(stage_dir: StageDir, dp: int, env: DistEnv) -> tuple[Path, str] | None:
    """The latest complete checkpoint, chosen by rank 0 for every rank; converted to DeepSpeed's universal
    format when it was saved at another data-parallel size (DeepSpeed refuses to load it directly)."""
    folder, universal = stage_dir.checkpoints, stage_dir.universal
    choice = ds.broadcast_from_main(resume_choice(folder) if env.is_main else None)
    if choice is None:
        return None
    tag, saved_dp = choice
    if saved_dp == dp:
        return folder, tag
    _say(env, f"{tag} was saved at data-parallel {saved_dp}; this run has {dp}: converting it to DeepSpeed's "
              f"universal checkpoint in {universal}")
    if env.is_main:  # the others wait in the barrier, under the recipe's collective timeout
        ensure_universal(folder, tag, universal, ds.convert_to_universal)
    ds.barrier()
    return universal, tag


def _resume(engine, resume_from: tuple[Path, str] | None, data: StageData, env: DistEnv) -> LoopState:
    if resume_from is None:
        return LoopState()
    folder, tag = resume_from
    saved = ds.load_checkpoint(engine, folder, tag)["dist_ft"]
    data.train.load_state_dict(saved["data"])
    _say(env, f"resumed from {folder / tag} at step {saved['step']}")
    return LoopState(step=saved["step"], tokens_seen=saved["tokens_seen"], nonfinite_steps=saved["nonfinite_steps"],
                     best_eval=saved["best_eval"], evals_without_gain=saved["evals_without_gain"])


def _ds_config_for_world(plan: Plan, stage: StagePlan, env: DistEnv) -> dict[str, Any]:
    """The rendered config, re-balanced if this run has another world size than planned (a resume on
    fewer or more ranks keeps the global batch by changing gradient accumulation)."""
    cfg = json.loads(plan.run.ds_config(stage.name).read_text())
    dp = batching.data_parallel_size(env.world_size, plan.sp)
    if dp == plan.dp:
        return cfg
    per_step = stage.global_batch_size
    accum = batching.exact_grad_accum(per_step, stage.micro_batch_size, dp)
    if accum is None or env.world_size % plan.sp:
        raise SystemExit(f"error: world size {env.world_size} cannot keep the planned {per_step} sequences per "
                         f"step with micro-batch {stage.micro_batch_size}; re-render the run for this size")
    cfg["gradient_accumulation_steps"] = accum
    cfg["train_batch_size"] = batching.train_batch_size(stage.micro_batch_size, accum, dp)
    _say(env, f"[{stage.name}] world size {env.world_size} differs from the plan's {plan.world_size}: "
              f"gradient accumulation {cfg['gradient_accumulation_steps']} keeps {per_step} sequences per step")
    return cfg


def _write_rank_info(folder: StageDir, env: DistEnv, data: StageData, engine) -> None:
    """What this rank holds: evidence that ZeRO shards for real (tests and humans read it)."""
    held, total = ds.parameter_residency(engine)
    info = {"rank": env.rank, "world_size": env.world_size, "dp_rank": data.dp_rank, "dp_size": data.dp_size,
            "zero_stage": engine.zero_optimization_stage(), "param_elements_held": held,
            "param_elements_total": total, "device": env.device, "restart": env.restart_count,
            "collective_timeout_s": ds.collective_timeout_s()}
    path = folder.rank_info(env.rank)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(info) + "\n")


def _metrics(plan, stage, env, folder, total_steps, start_step):
    if not env.is_main:
        return NullMetrics()
    config = {"stage": stage.name, "phase": stage.phase, "seq_len": stage.seq_len, "method": stage.method,
              "rope": stage.rope_parameters, "zero_stage": plan.parallelism.zero_stage, "world_size": env.world_size,
              "tokens_per_step": stage.tokens_per_step, "lr": stage.lr, "pipeline": plan.name}
    return RankZeroMetrics(folder, plan.tracking, plan.name, plan.run_dir, stage.name, config, total_steps,
                           start_step)


def _step_extras(plan, stage, env, engine):
    on_gpu = env.device.startswith("cuda")
    layers, hidden = (plan.model_shape.num_layers, plan.model_shape.hidden_size) if plan.model_shape else (0, 0)

    def extras(seconds: float) -> dict[str, Any]:
        tokens = stage.tokens_per_step
        row = {"step_time_s": round(seconds, 4), "tokens_per_s": round(tokens / seconds, 1)}
        if on_gpu:
            row["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 1024**3, 3)
            value = mfu(tokens / seconds, _num_params(engine), layers, hidden, stage.seq_len, env.world_size,
                        torch.cuda.get_device_name())
            if value is not None:
                row["mfu"] = round(value, 4)
        else:
            row["peak_memory_gib"] = round(_max_rss_gib(), 3)
        return row

    return extras


def _num_params(engine) -> int:
    return sum(getattr(p, "ds_numel", p.numel()) for p in engine.module.parameters())


def _max_rss_gib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def _say(env: DistEnv, text: str, err: bool = False) -> None:
    if env.is_main and text:
        print(text, file=sys.stderr if err else sys.stdout, flush=True)
