"""One stage on one rank: model, method, data, engine, resume, loop, export.

Data flows one way: plan.json → model + data → DeepSpeed engine → loop → checkpoint/export/metrics.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

import torch

from dist_ft.decoding.bands import Band, band_edges
from dist_ft.plan import batching
from dist_ft.plan.plan import Plan, StagePlan
from dist_ft.plan.run_dir import StageDir
from dist_ft.plan.run_records import BestWeights, DoneMarker, finite_values, write_record
from dist_ft.plan.schedule import lr_multiplier
from . import engine as ds
from .distributed import DistEnv, read_env
from .early_stopping import Rule
from .heartbeat import Heartbeat
from .loop import LoopConfig, LoopHooks, LoopState, NonFiniteLossError, run_loop
from .head_loss import choose_head_kernel
from .loss import LanguageModelLoss, TokenMean
from .methods import trainable_summary
from .metrics import NullMetrics, RankZeroMetrics, mfu, quiet_progress_bars
from .optimizer import client_optimizer, parameter_groups
from .position_bands import LossWatch
from .stage_checkpoints import StageCheckpoints
from .stage_data import StageData, load_stage_data
from .stage_eval import StageEvaluation
from .stage_model import build_stage_model, export_stage, stage_tokenizer
from .stop import StopRequest


@dataclass
class StageRun:
    """One stage's wiring on one rank, built once by `_build`: what training, checkpointing and the
    export of the stage share."""
    plan: Plan
    stage: StagePlan
    env: DistEnv
    folder: StageDir
    batch: batching.RankBatch
    data: StageData
    engine: Any
    tokenizer: Any
    checkpoints: StageCheckpoints
    total_steps: int
    evaluation: StageEvaluation
    metrics: Any = None
    watch: LossWatch = field(default_factory=LossWatch)

    def train(self, state: LoopState, heartbeat: Heartbeat | None = None) -> str:
        """The loop until the stage ends, stops or fails ("failed": a non-finite streak, said on stderr).
        A fresh stage that generates samples evaluates first: the model before this stage."""
        if heartbeat:
            heartbeat.follow(state)
        self.metrics = self._metrics(state.step)
        self.evaluation.metrics = self.metrics
        hooks = self._hooks(StopRequest(self.plan.run.stop_file(self.stage.name)))
        if state.step == 0 and self.stage.samples is not None:
            self._evaluate_before()
        try:
            outcome = run_loop(self.engine, iter(self.data.train), state, self._loop_config(), hooks)
        except NonFiniteLossError as err:
            self.env.say(f"error: [{self.stage.name}] {err}", err=True)
            return "failed"
        self.env.say(f"[{self.stage.name}] {outcome} at step {state.step}/{self.total_steps}"
                     f"{_resume_note(outcome, state)}")
        return outcome

    def _evaluate_before(self) -> None:
        """The model before this stage: its samples and its validation metrics at step 0 (the zero-shot
        values the summary compares the last evaluation with). Not a candidate for early stopping:
        the stage exports trained weights."""
        values = self.evaluation.evaluate(0)
        if values:
            self._log({"step": 0, **values})

    def finish(self, state: LoopState, outcome: str) -> None:
        """The export (the best evaluation's weights under early stopping), the test set on them, then DONE:
        a stage counts as finished only once its model is on disk."""
        best = self._restore_best(state)
        export_stage(self.plan, self.stage, self.engine, self.tokenizer, self.env)
        exported = best.step if best else state.step
        test = self.evaluation.test(exported)
        if test:
            self._log({"step": state.step, "exported_step": exported, **test})
        if self.env.is_main:
            write_record(self.folder.done, DoneMarker(step=state.step, outcome=outcome, best=best,
                                                      test=finite_values(test) if test else None))

    def close(self) -> None:
        if self.metrics is not None:
            self.metrics.close()
            self.metrics = None

    def _restore_best(self, state: LoopState) -> BestWeights | None:
        """Under early stopping, the engine back at the best evaluation's checkpoint (every rank loads it);
        which one it was. None without early stopping or an evaluation to go by."""
        rule = self.stage.early_stopping
        if rule is None or state.best_step is None:
            return None
        if state.best_step != state.step:
            self.checkpoints.load_weights(self.engine, self.checkpoints.best_point(state.best_step))
        best = BestWeights(step=state.best_step, metric=rule.metric, value=state.best_value)
        self.env.say(f"[{self.stage.name}] exporting the best weights: step {state.best_step}, {rule.metric} "
                     f"{state.best_value:.4f}")
        return best

    def _loop_config(self) -> LoopConfig:
        rule = Rule.from_config(self.stage.early_stopping) if self.stage.early_stopping else None
        return LoopConfig(total_steps=self.total_steps, grad_accum=self.batch.accum,
                          data_parallel=self.batch.dp, checkpoint_every=self.plan.checkpointing.every_steps,
                          eval_every=self.stage.eval_every, early_stopping=rule)

    def _hooks(self, stop: StopRequest) -> LoopHooks:
        return LoopHooks(evaluate=self.evaluation.evaluate if self.evaluation.active else None,
                         checkpoint=self._save, stop_requested=stop.agreed, log=self._log,
                         step_extras=_step_extras(self.plan, self.stage, self.env, self.engine))

    def _log(self, row: dict[str, Any]) -> None:
        self.metrics.log({"stage": self.stage.name, "seq_len": self.stage.seq_len, "restart": self.env.restart_count,
                          **row})
        for warning in self.watch.observe(row):
            self.env.say(f"[{self.stage.name}] warning: {warning}")

    def _save(self, state: LoopState, best: bool = False) -> None:
        self.checkpoints.save(self.engine, state, self.data.train, best=best)

    def _metrics(self, start_step: int):
        if not self.env.is_main:
            return NullMetrics()
        plan, stage = self.plan, self.stage
        config = {"stage": stage.name, "phase": stage.phase, "seq_len": stage.seq_len, "method": stage.method,
                  "rope": stage.rope_parameters, "zero_stage": plan.parallelism.zero_stage,
                  "world_size": self.env.world_size, "tokens_per_step": stage.tokens_per_step, "lr": stage.lr,
                  "pipeline": plan.name}
        return RankZeroMetrics(self.folder, plan.tracking, plan.name, plan.run_dir, stage.name, config,
                               self.total_steps, start_step)


def train_stage(plan: Plan, stage: StagePlan) -> str:
    """Train one stage on this rank: its outcome, "failed", "stopped", "complete" (done before) or how the
    loop ended. The process group stays up and the engine is freed, so the caller (the train command) can
    run the after-stage evaluation on the same ranks."""
    env = read_env()
    if not env.is_main:
        quiet_progress_bars()
    ds.init_distributed(env, plan.cluster.collective_timeout_minutes)
    # torchrun counts restarts per node (a node restarted for another's failure counts none): agree on the most
    env = dataclasses.replace(env, restart_count=int(ds.all_reduce_max(float(env.restart_count))))
    folder = plan.run.stage(stage.name)
    if ds.broadcast_from_main(folder.done.exists() if env.is_main else None):  # one answer for all ranks
        env.say(f"[{stage.name}] already complete ({folder.done}); nothing to do")
        return "complete"
    heartbeat = Heartbeat(plan.run.heartbeat(stage.name, env.rank), env.rank, env.restart_count)
    outcome = _train(plan, stage, env, folder, heartbeat)
    if outcome == "failed":
        return outcome
    ds.barrier()
    heartbeat.close(outcome)
    _release_accelerator_memory()  # the engine and its optimizer state are gone with _train's frame
    return outcome


def _train(plan: Plan, stage: StagePlan, env: DistEnv, folder: StageDir, heartbeat: Heartbeat) -> str:
    run, state = _build(plan, stage, env, folder)
    try:
        outcome = run.train(state, heartbeat)
        if outcome == "failed":
            heartbeat.close("failed")
        elif outcome != "stopped":
            run.finish(state, outcome)
        return outcome
    finally:
        run.close()


def _build(plan: Plan, stage: StagePlan, env: DistEnv, folder: StageDir) -> tuple[StageRun, LoopState]:
    """Data, model, engine and the state to start from (a checkpoint's, when there is one)."""
    torch.manual_seed(plan.seed + stage.index)
    batch = _rank_batch(plan, stage, env)
    ds_config = _ds_config(plan, stage, batch)
    tokenizer = stage_tokenizer(plan)
    data = load_stage_data(plan, stage, batch, tokenizer)
    env.say(data.report)
    model = build_stage_model(plan, stage, ds_config, tokenizer)
    total_steps = stage.steps or batching.steps_for_epochs(stage.epochs, data.steps_per_epoch)
    checkpoints = StageCheckpoints(folder, plan.checkpointing, env, batch.dp,
                                   frozen_excluded=stage.method != "full")
    resume = checkpoints.resume_point()
    if resume and resume.universal:
        ds_config["checkpoint"] = {"load_universal": True}
    engine = _engine(plan, stage, model, ds_config, batch, total_steps)
    state = checkpoints.restore(engine, resume, data.train)
    _write_rank_info(folder, env, batch, engine)
    evaluation = StageEvaluation(stage, engine, tokenizer, env, folder, data.validation, data.test, data.eval_copies,
                                 bands=_validation_bands(plan, stage))
    return StageRun(plan, stage, env, folder, batch, data, engine, tokenizer, checkpoints, total_steps,
                    evaluation), state


def _validation_bands(plan: Plan, stage: StagePlan) -> list[Band] | None:
    """A long-context stage's position bands (quarters of seq_len, cut at the model's native context). Not under
    sequence parallelism: each rank holds a slice of the sequence there, the bands need the whole row."""
    if stage.phase != "continued_pretraining" or plan.sp > 1:
        return None
    return band_edges(stage.seq_len, (), plan.model_shape.max_position_embeddings if plan.model_shape else None)


def _engine(plan: Plan, stage: StagePlan, model, ds_config: dict[str, Any], batch: batching.RankBatch,
            total_steps: int):
    """DeepSpeed's engine around the model's loss (chunked or fused head, sequence-parallel slice)."""
    mpu, sp = _sequence_parallel(plan.sp, model, batch.micro, ds_config)
    kernel = choose_head_kernel(plan.model.loss_kernel, model, torch.cuda.is_available())
    token_mean = TokenMean(ds.token_mean_gradient_factor(plan.parallelism.zero_stage, batch.dp, plan.sp))
    wrapped = LanguageModelLoss(model, plan.model.loss_chunk_tokens, sequence_parallel=sp,
                                offload_activations=plan.model.offload_activations, head_kernel=kernel,
                                token_mean=token_mean)
    groups = parameter_groups(wrapped, stage.optimizer.weight_decay)
    client = None if "optimizer" in ds_config else client_optimizer(stage.optimizer, stage.lr, groups)
    return ds.build_engine(wrapped, ds_config, lambda s: lr_multiplier(stage.scheduler, s, total_steps), groups,
                           client, mpu=mpu)


def _release_accelerator_memory() -> None:
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _sequence_parallel(degree: int, model, micro: int, ds_config: dict[str, Any]):
    """(DeepSpeed's mpu, our slice of each batch) under Ulysses; (None, None) without it."""
    if degree == 1:
        return None, None
    mpu = ds.enable_sequence_parallel(model, degree, micro)
    return mpu, ds.sequence_parallel_group(mpu, ds_config)


def _resume_note(outcome: str, state: LoopState) -> str:
    if outcome != "stopped":
        return ""
    if state.consecutive_nonfinite:
        return " without a checkpoint (its last steps were NaN/inf); resume continues from the last good one"
    return " (checkpointed; resume continues here)"


def _rank_batch(plan: Plan, stage: StagePlan, env: DistEnv) -> batching.RankBatch:
    """This rank's batch in the live world: the planned one, or on a resume at another world size the
    same global batch by another gradient accumulation (said once)."""
    try:
        batch = plan.rank_batch(stage, env.world_size, env.rank)
    except ValueError as err:
        raise SystemExit(f"error: {err}; re-render the run for this size") from None
    if env.world_size != plan.world_size:
        env.say(f"[{stage.name}] world size {env.world_size} differs from the plan's {plan.world_size}: "
                f"gradient accumulation {batch.accum} keeps {batch.global_batch} sequences per step")
    return batch


def _ds_config(plan: Plan, stage: StagePlan, batch: batching.RankBatch) -> dict[str, Any]:
    """The rendered config with the live world's batch (the rendered one unless the world size changed)."""
    cfg = json.loads(plan.run.ds_config(stage.name).read_text())
    cfg.update(train_micro_batch_size_per_gpu=batch.micro, gradient_accumulation_steps=batch.accum,
               train_batch_size=batch.global_batch)
    return cfg


def _write_rank_info(folder: StageDir, env: DistEnv, batch: batching.RankBatch, engine) -> None:
    """What this rank holds: evidence that ZeRO shards for real (tests and humans read it)."""
    held, total = ds.parameter_residency(engine)
    info = {"rank": env.rank, "world_size": env.world_size, "dp_rank": batch.dp_rank, "dp_size": batch.dp,
            "zero_stage": engine.zero_optimization_stage(), "param_elements_held": held,
            "param_elements_total": total, "trainable_elements": trainable_summary(engine.module)[0], "device": env.device, "restart": env.restart_count,
            "collective_timeout_s": ds.collective_timeout_s()}
    path = folder.rank_info(env.rank)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(info) + "\n")


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

