"""Recipe + model shape → Plan: every number a run needs. Pure: no I/O, no environment.

The cross-field checks live in `checks.py` (and `sp_checks.py`, `method_options.py`), the micro-batch
search in `micro_batch.py`, RoPE reasoning in `rope.py`; this module builds the stages from them.

The launcher writes the plan to `plan.json`; every rank reads the same file, so
the two sides can never disagree about batch sizes, RoPE or schedules.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from pathlib import Path

from dist_ft.recipe.config import (Checkpointing, Cluster, Data, EarlyStopping, Evaluation, MethodOptions, Model,
                                   Optimizer, Parallelism, Recipe, Rope, Samples, Scheduler, Stage, Tracking)
from dist_ft.recipe.model_shape import ModelShape
from dist_ft.recipe.prompts import stage_template
from dist_ft.recipe.strict import Problem, RecipeError, build

from . import batching, oom_advice
from .checks import (check_cluster, check_extends, check_method, check_model_source, check_positions,
                     check_time_limit, check_training)
from .attention_checks import shifted_sparse_group
from .method_options import carries_adapter, check_long_context_method, check_options
from .micro_batch import choose_batch, packing_safe_micro
from .sp_checks import check_sequence_lengths
from .rope import addressable_length, inherited_theta, max_positions, rope_parameters
from .run_dir import RunDir, ds_config_name, sbatch_name, token_store_root

PLAN_VERSION = 4  # 2: the recipe's sections typed, derived numbers (dp, sp, world size) no longer stored;
# 3: each stage's optimizer and (effective) scheduler replace min_lr, warmup_steps and schedule; fine-tuning's
#    evaluation (metrics, samples, early_stopping) replaced early_stopping_patience
# 4: ranks read token stores: each stage's data.cache_dir is set (absolute)


@dataclass(frozen=True)
class StagePlan:
    index: int
    name: str
    phase: str  # "continued_pretraining" | "finetune"
    seq_len: int
    rope_parameters: dict[str, Any]
    max_position_embeddings: int
    method: str
    method_options: MethodOptions | None  # None: a continued-pretraining stage trains every weight
    data: Data
    data_format: str
    template: str | None
    micro_batch_size: int
    grad_accum: int
    global_batch_size: int
    tokens_per_step: int
    steps: int | None  # None: fine-tuning by epochs, counted from the data at run time
    epochs: float | None
    lr: float  # the peak
    optimizer: Optimizer
    scheduler: Scheduler  # the effective one (recipe.config.effective_scheduler): every default filled
    init_from: str | None
    eval_every: int | None
    early_stopping: EarlyStopping | None
    merge_adapter: bool
    memory: dict[str, float] | None
    ds_config: str
    sbatch: str
    extend_positions: str = "none"  # how a learned position table grows to max_position_embeddings
    metrics: list[str] = field(default_factory=lambda: ["loss"])  # on validation and test data (finetune.metrics)
    metric_rows: int | None = None
    samples: Samples | None = None
    attention: str = "full"  # training-time attention (long_context.attention)
    attention_group: int | None = None  # S²-Attn tokens per group
    carry_adapter: bool = False  # keeps training the previous stage's adapter, over its base


@dataclass(frozen=True)
class Plan:
    """The recipe's sections as the recipe typed them, plus what the planner computed. The same
    objects reach every rank: `from_json` rebuilds them through the recipe's strict loader."""
    version: int
    name: str
    seed: int
    run_dir: str
    model: Model
    model_shape: ModelShape | None
    stages: list[StagePlan]
    cluster: Cluster
    parallelism: Parallelism
    tracking: Tracking
    checkpointing: Checkpointing
    time_limit_s: int | None
    warnings: list[str] = field(default_factory=list)
    evaluation: Evaluation | None = None

    @property
    def run(self) -> RunDir:
        return RunDir(Path(self.run_dir))

    @property
    def device(self) -> str:
        return "cuda" if self.cluster.gpus_per_node else "cpu"

    @property
    def nodes(self) -> int:
        return self.cluster.nodes

    @property
    def ranks_per_node(self) -> int:
        return self.cluster.ranks_per_node

    @property
    def world_size(self) -> int:
        return self.cluster.world_size

    @property
    def sp(self) -> int:
        return self.parallelism.sequence_parallel

    @property
    def dp(self) -> int:
        return batching.data_parallel_size(self.world_size, self.sp)

    @property
    def wandb_dir(self) -> Path:
        """Where the ranks' W&B runs land: under `cluster.env`'s WANDB_DIR when the recipe moves them (the
        ranks only default WANDB_DIR to the run dir), else the run dir's. W&B adds `wandb/` to either."""
        return self.run.wandb_under(self.cluster.env.get("WANDB_DIR"))

    def rank_batch(self, stage: StagePlan, world_size: int, rank: int) -> batching.RankBatch:
        """`stage`'s batch on rank `rank` of a live world of `world_size` ranks (the planned one, or another on
        a resume). Raises ValueError when that world cannot keep the stage's global batch."""
        return batching.rank_batch(stage.micro_batch_size, stage.global_batch_size, world_size, rank, self.sp)

    def stage(self, name: str) -> StagePlan:
        for stage in self.stages:
            if stage.name == name:
                return stage
        raise KeyError(f"no stage {name!r} in plan (stages: {', '.join(s.name for s in self.stages)})")

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=False)

    @classmethod
    def from_json(cls, text: str) -> "Plan":
        """The plan, every section rebuilt and checked by the loader that read the recipe."""
        raw = json.loads(text)
        if raw.get("version") != PLAN_VERSION:
            raise ValueError(f"plan version {raw.get('version')} is not {PLAN_VERSION}: re-render the run dir")
        try:
            return build(cls, raw)
        except RecipeError as err:
            raise ValueError(f"not a valid plan: {err}") from None


def make_plan(recipe: Recipe, shape: ModelShape | None, run_dir: str, host_memory_gib: float | None = None) -> Plan:
    """Validate everything that spans sections and compute the numbers. Raises RecipeError.
    `host_memory_gib`: the planning machine's memory (preflight reads it), the budget of CPU ranks that
    `cluster.cpu_memory_gb` does not declare; None checks CPU ranks against nothing."""
    problems: list[Problem] = []
    warnings: list[str] = []
    c, par = recipe.cluster, recipe.parallelism
    check_cluster(recipe, shape, problems, warnings)
    check_model_source(recipe, shape, warnings)
    dp = batching.data_parallel_size(c.world_size, par.sequence_parallel)
    budget = oom_advice.rank_budget(recipe, host_memory_gib)
    stages = [_with_cache_dir(s, recipe.checkpointing.output_root) for s in
              _plan_stages(recipe, shape, dp, budget, problems, warnings)]
    check_sequence_lengths(par.sequence_parallel, [(s.name, s.seq_len) for s in stages], problems)
    time_limit = check_time_limit(recipe, problems)
    _check_evaluation(recipe, shape, stages, problems)
    if problems:  # progressive stages share one section: report each of its problems once
        raise RecipeError(list(dict.fromkeys(problems)))
    return Plan(
        version=PLAN_VERSION, name=recipe.name, seed=recipe.seed, run_dir=run_dir, model=recipe.model,
        model_shape=shape, stages=stages, cluster=c, parallelism=par, tracking=recipe.tracking,
        checkpointing=recipe.checkpointing, time_limit_s=time_limit, warnings=warnings,
        evaluation=recipe.evaluation,
    )


def _with_cache_dir(stage: StagePlan, output_root: str) -> StagePlan:
    """The stage's data.cache_dir made absolute (ranks start in any directory): by default
    token_store_root(output_root), resolved like the run dir against the working directory."""
    data = stage.data
    folder = Path(data.cache_dir) if data.cache_dir else token_store_root(output_root)
    return replace(stage, data=replace(data, cache_dir=str(folder.resolve())))


def _check_evaluation(recipe: Recipe, shape: ModelShape | None, stages: list[StagePlan],
                      problems: list[Problem]) -> None:
    """Eval lengths every evaluated stage's model can address (eval would refuse them hours later)."""
    ev = recipe.evaluation
    if ev is None or not ev.after_each_stage:
        return
    longest = max([*ev.lengths, *(ev.passkey_lengths or [])], default=0)
    for stage in stages:
        limit = addressable_length(stage.max_position_embeddings, bool(shape and shape.absolute_positions))
        if longest > limit:
            problems.append(Problem("evaluation.lengths", f"{longest} tokens is beyond what stage {stage.name} "
                                    f"can address ({limit} tokens with its context of "
                                    f"{stage.max_position_embeddings})",
                                    "evaluate shorter lengths, or evaluate only later stages with `dist-ft eval`"))
            return


def _plan_stages(recipe: Recipe, shape: ModelShape | None, dp: int, budget: oom_advice.Budget,
                 problems: list[Problem], warnings: list[str]) -> list[StagePlan]:
    out: list[StagePlan] = []
    long_stages = recipe.long_context.expanded() if recipe.long_context else []
    path = "long_context.progressive" if recipe.long_context and recipe.long_context.progressive else None
    for i, stage in enumerate(long_stages):
        spath = path or f"long_context.stages[{i}]"
        if i == 0:
            check_extends(stage, shape, spath, warnings)
        if out and stage.seq_len <= out[-1].seq_len:
            problems.append(Problem(f"{spath}.seq_len", f"{stage.seq_len} does not grow past the previous "
                                    f"stage's {out[-1].seq_len}", "make seq_len increase stage by stage"))
        out.append(_long_stage(recipe, shape, stage, i, spath, dp, budget, out[-1] if out else None,
                               inherited_theta([s.rope_parameters for s in out]), problems, warnings))
    if recipe.finetune:
        out.append(_finetune_stage(recipe, shape, len(out), out[-1] if out else None, dp, budget, problems,
                                   warnings))
    seen: set[str] = set()
    for stage in out:
        if stage.name in seen:
            problems.append(Problem("long_context.stages", f"stage name {stage.name!r} is used twice",
                                    "give every stage a unique name"))
        seen.add(stage.name)
    return out


def _long_stage(recipe: Recipe, shape: ModelShape | None, stage: Stage, index: int, path: str, dp: int,
                budget: oom_advice.Budget, previous: StagePlan | None, theta: float | None, problems: list[Problem],
                warnings: list[str]) -> StagePlan:
    lc = recipe.long_context
    rope = rope_parameters(stage.rope, stage.seq_len, shape, f"{path}.rope", problems, theta)
    check_positions(shape, stage.seq_len, _table_length(shape, previous), stage.extend_positions, path, problems)
    global_seqs = max(1, round(lc.tokens_per_step / stage.seq_len))
    micro = packing_safe_micro(recipe, lc.data, stage.micro_batch_size, f"{path}.micro_batch_size", problems)
    check_long_context_method(recipe, stage.method, stage.options, path, shape, problems, warnings)
    batch = choose_batch(recipe, shape, stage.method, lc.data.packing, stage.seq_len, global_seqs, micro, dp, budget,
                         (stage.name, f"{path}.micro_batch_size"), problems, warnings, stage.options)
    micro, accum, global_seqs, mem = batch
    tokens_per_step = batching.tokens_per_step(global_seqs, stage.seq_len)
    if tokens_per_step != lc.tokens_per_step:
        warnings.append(f"{stage.name}: {tokens_per_step} tokens per step (asked {lc.tokens_per_step}): "
                        f"{global_seqs} sequences of {stage.seq_len} over {dp} data-parallel ranks")
    steps = stage.steps or batching.steps_for_tokens(stage.tokens, tokens_per_step)
    check_training(recipe, stage, steps, path, problems, warnings)
    return StagePlan(
        index=index, name=stage.name, phase="continued_pretraining", seq_len=stage.seq_len,
        rope_parameters=rope, max_position_embeddings=max_positions(shape, stage.seq_len, rope),
        method=stage.method, method_options=None if stage.method == "full" else stage.options, data=lc.data,
        data_format="text", template=None,
        micro_batch_size=micro, grad_accum=accum, global_batch_size=global_seqs, tokens_per_step=tokens_per_step,
        steps=steps, epochs=None, lr=stage.lr, optimizer=stage.optimizer, scheduler=stage.schedule,
        init_from=previous.name if previous else None, eval_every=_long_eval_every(lc, steps),
        metrics=["loss", "perplexity"], early_stopping=None, merge_adapter=False, memory=mem,
        ds_config=ds_config_name(stage.name), sbatch=sbatch_name(stage.name), extend_positions=stage.extend_positions,
        attention=lc.attention, attention_group=shifted_sparse_group(recipe, shape, stage.seq_len, problems),
        carry_adapter=carries_adapter(recipe, stage.method, stage.options, previous, path, problems),
    )


def _long_eval_every(lc, steps: int) -> int | None:
    """The recipe's `long_context.eval_every`, else four validations per stage where there is validation data."""
    if not lc.data.has_validation:
        return None
    return lc.eval_every or max(1, steps // 4)


def _finetune_stage(recipe: Recipe, shape: ModelShape | None, index: int, last: StagePlan | None, dp: int,
                    budget: oom_advice.Budget, problems: list[Problem], warnings: list[str]) -> StagePlan:
    ft = recipe.finetune
    check_method(recipe, problems)
    check_options(recipe, shape, problems, warnings)
    seq_len = ft.seq_len or (last.seq_len if last else None)
    if seq_len is None:
        problems.append(Problem("finetune.seq_len", "is required when there is no long-context stage",
                                "set `finetune.seq_len: 2048`"))
        seq_len = 16
    if last and ft.rope is not None:
        problems.append(Problem("finetune.rope", "fine-tuning keeps the last long-context stage's RoPE",
                                "remove finetune.rope, or set the RoPE on the long-context stages"))
    rope = last.rope_parameters if last else rope_parameters(ft.rope or Rope(), seq_len, shape, "finetune.rope",
                                                             problems)
    check_positions(shape, seq_len, _table_length(shape, last), ft.extend_positions, "finetune", problems)
    micro = packing_safe_micro(recipe, ft.data, ft.micro_batch_size, "finetune.micro_batch_size", problems)
    micro, accum, global_seqs, mem = choose_batch(recipe, shape, ft.method, ft.data.packing, seq_len,
                                                  ft.global_batch_size, micro, dp, budget,
                                                  (ft.name, "finetune.micro_batch_size"), problems, warnings, ft.options)
    if global_seqs != ft.global_batch_size:  # dp does not divide it: said, as for long-context tokens_per_step
        warnings.append(f"{ft.name}: {global_seqs} sequences per step (asked {ft.global_batch_size}): {micro} x "
                        f"{accum} accumulation x {dp} data-parallel ranks")
    check_training(recipe, ft, ft.steps, "finetune", problems, warnings)
    return StagePlan(
        index=index, name=ft.name, phase="finetune", seq_len=seq_len, rope_parameters=rope,
        max_position_embeddings=max(max_positions(shape, seq_len, rope),
                                    last.max_position_embeddings if last else 0),
        method=ft.method, method_options=ft.options, data=ft.data, data_format=ft.format,
        template=stage_template(ft.format, ft.template), micro_batch_size=micro, grad_accum=accum, global_batch_size=global_seqs,
        tokens_per_step=batching.tokens_per_step(global_seqs, seq_len), steps=ft.steps, epochs=ft.epochs, lr=ft.lr,
        optimizer=ft.optimizer, scheduler=ft.schedule, init_from=last.name if last else None, eval_every=ft.eval_every,
        early_stopping=ft.early_stopping, merge_adapter=ft.merge_adapter, memory=mem,
        ds_config=ds_config_name(ft.name), sbatch=sbatch_name(ft.name), extend_positions=ft.extend_positions,
        metrics=list(ft.metrics), metric_rows=ft.metric_rows, samples=ft.samples,
    )




def _table_length(shape: ModelShape | None, previous: StagePlan | None) -> int | None:
    """The positions a stage's starting weights know: the previous stage's, or the model's own."""
    if previous is not None:
        return previous.max_position_embeddings
    return shape.max_position_embeddings if shape else None
