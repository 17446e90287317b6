"""Recipe + model shape → Plan: every number a run needs. Pure: no I/O, no environment.

The launcher writes the plan to `plan.json`; every rank reads the same file, so
the two sides can never disagree about batch sizes, RoPE or schedules.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from pathlib import Path

from dist_ft.recipe.config import (PEFT_ADAPTERS, VIRTUAL_TOKEN_METHODS, Checkpointing, Cluster, Data, EarlyStopping,
                                   Evaluation, Finetune, MethodOptions, Model, Optimizer, Parallelism, Recipe, Rope,
                                   Samples, Scheduler, Stage, Tracking)
from dist_ft.recipe.model_shape import INLINE_MLP_TYPES, POSITION_TABLES, ModelShape
from dist_ft.recipe.prompts import stage_template
from dist_ft.recipe.strict import Problem, RecipeError, build
from dist_ft.recipe.timelimit import parse_time_limit

from . import batching, memory, oom_advice, schedule
from .attention_checks import shifted_sparse_group
from .method_options import carries_adapter, check_long_context_method, check_options
from .sp_checks import check_sequence_lengths, check_sequence_parallel
from .rope import addressable_length, rope_parameters, scaled_context
from .run_dir import RunDir, ds_config_name, sbatch_name, token_store_root

PLAN_VERSION = 4  # 2: the recipe's sections typed, derived numbers (dp, sp, world size) no longer stored;
# 3: each stage's optimizer and (effective) scheduler replace min_lr, warmup_steps and schedule; fine-tuning's
#    evaluation (metrics, samples, early_stopping) replaced early_stopping_patience
# 4: ranks read token stores: each stage's data.cache_dir is set (absolute)
MAX_MICRO_TOKENS = 32768  # beyond this a bigger micro-batch buys no throughput, only memory


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
    _check_cluster(recipe, shape, problems, warnings)
    dp = batching.data_parallel_size(c.world_size, par.sequence_parallel)
    budget = oom_advice.rank_budget(recipe, host_memory_gib)
    stages = [_with_cache_dir(s, recipe.checkpointing.output_root) for s in
              _plan_stages(recipe, shape, dp, budget, problems, warnings)]
    check_sequence_lengths(par.sequence_parallel, [(s.name, s.seq_len) for s in stages], problems)
    time_limit = _time_limit(recipe, problems)
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


def _check_cluster(recipe: Recipe, shape: ModelShape | None, problems: list[Problem],
                   warnings: list[str]) -> None:
    c, par, model = recipe.cluster, recipe.parallelism, recipe.model
    sp = par.sequence_parallel
    if c.world_size % sp:
        problems.append(Problem("parallelism.sequence_parallel",
                                f"{sp} does not divide the world size {c.world_size} "
                                f"({c.nodes} nodes x {c.ranks_per_node} ranks)",
                                f"use a divisor of {c.world_size}"))
    if c.hosts and len(c.hosts) != c.nodes:
        problems.append(Problem("cluster.nodes", f"{c.nodes} node(s), but the {'hostfile' if c.hostfile else 'hosts'} "
                                f"list(s) {len(c.hosts)} host(s) (one node per host)",
                                f"set cluster.nodes: {len(c.hosts)}, or list {c.nodes} host(s)"))
    if sp > 1:
        check_sequence_parallel(sp, shape, model.attn_implementation, problems)
    _check_tiled_mlp(model.tiled_mlp_tokens, shape, problems)
    _check_loss_kernel(recipe, problems)
    if not c.gpus_per_node:
        if model.offload_activations:
            warnings.append("model.offload_activations on CPU ranks saves nothing (the checkpoints already "
                            "live in host memory)")
        if model.attn_implementation == "flash_attention_2":
            problems.append(Problem("model.attn_implementation", "flash_attention_2 needs GPUs; these are CPU ranks",
                                    "use `sdpa` (or `auto`), or set `cluster.gpus_per_node`"))
        if model.dtype == "fp16":
            problems.append(Problem("model.dtype", "fp16 training needs GPUs; these are CPU ranks",
                                    "use `bf16` or `fp32` on CPU"))
        if "cpu" in (par.offload_optimizer, par.offload_params):
            warnings.append("offload to CPU on CPU ranks saves nothing")


def _check_loss_kernel(recipe: Recipe, problems: list[Problem]) -> None:
    if recipe.model.loss_kernel != "liger":
        return
    if recipe.parallelism.zero_stage == 3:
        problems.append(Problem("model.loss_kernel", "Liger's fused cross-entropy reads the LM head's weight "
                                "directly, which ZeRO-3 partitions", "use `loss_kernel: auto` (chunked under "
                                "ZeRO-3) or zero_stage 2"))
    if not recipe.cluster.gpus_per_node:
        problems.append(Problem("model.loss_kernel", "Liger's kernels are Triton, CUDA only; these are CPU ranks",
                                "use `loss_kernel: auto` or `chunked`"))


def _check_tiled_mlp(tile_tokens: int | None, shape: ModelShape | None, problems: list[Problem]) -> None:
    if tile_tokens is None or shape is None:
        return
    if shape.mixture_of_experts:
        problems.append(Problem("model.tiled_mlp_tokens", "TiledMLP tiles dense MLPs; this model routes tokens to "
                                "experts", "unset model.tiled_mlp_tokens"))
    if shape.model_type in INLINE_MLP_TYPES:
        problems.append(Problem("model.tiled_mlp_tokens", f"{shape.model_type} layers have no MLP module to tile",
                                "unset model.tiled_mlp_tokens"))


def _time_limit(recipe: Recipe, problems: list[Problem]) -> int | None:
    c = recipe.cluster
    if c.time_limit is None:
        return None
    try:
        seconds = parse_time_limit(c.time_limit)
    except ValueError as err:
        problems.append(Problem("cluster.time_limit", str(err),
                                "write minutes (`time_limit: 90`) or e.g. `time_limit: \"1-12:00:00\"`"))
        return None
    if seconds is not None and c.signal_grace_s >= seconds:
        problems.append(Problem("cluster.signal_grace_s",
                                f"{c.signal_grace_s} s is not shorter than the time limit ({seconds} s)",
                                "lower signal_grace_s or raise time_limit"))
    return seconds


def _plan_stages(recipe: Recipe, shape: ModelShape | None, dp: int, budget: oom_advice.Budget,
                 problems: list[Problem], warnings: list[str]) -> list[StagePlan]:
    out: list[StagePlan] = []
    long_stages = recipe.long_context.expanded() if recipe.long_context else []
    path = "long_context.progressive" if recipe.long_context and recipe.long_context.progressive else None
    for i, stage in enumerate(long_stages):
        spath = path or f"long_context.stages[{i}]"
        if out and stage.seq_len <= out[-1].seq_len:
            problems.append(Problem(f"{spath}.seq_len", f"{stage.seq_len} does not grow past the previous "
                                    f"stage's {out[-1].seq_len}", "make seq_len increase stage by stage"))
        out.append(_long_stage(recipe, shape, stage, i, spath, dp, budget, out[-1] if out else None,
                               _inherited_theta(out), problems, warnings))
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
    _check_positions(shape, stage.seq_len, _table_length(shape, previous), stage.extend_positions, path, problems)
    global_seqs = max(1, round(lc.tokens_per_step / stage.seq_len))
    micro = _packing_safe_micro(recipe, lc.data, stage.micro_batch_size, f"{path}.micro_batch_size", problems)
    check_long_context_method(recipe, stage.method, stage.options, path, shape, problems, warnings)
    batch = _batch(recipe, shape, stage.method, lc.data.packing, stage.seq_len, global_seqs, micro, dp, budget,
                   (stage.name, f"{path}.micro_batch_size"), problems, warnings, stage.options)
    micro, accum, global_seqs, mem = batch
    tokens_per_step = batching.tokens_per_step(global_seqs, stage.seq_len)
    if tokens_per_step != lc.tokens_per_step:
        warnings.append(f"{stage.name}: {tokens_per_step} tokens per step (asked {lc.tokens_per_step}): "
                        f"{global_seqs} sequences of {stage.seq_len} over {dp} data-parallel ranks")
    steps = stage.steps or batching.steps_for_tokens(stage.tokens, tokens_per_step)
    _check_training(recipe, stage, steps, path, problems, warnings)
    return StagePlan(
        index=index, name=stage.name, phase="continued_pretraining", seq_len=stage.seq_len,
        rope_parameters=rope, max_position_embeddings=_max_positions(shape, stage.seq_len, rope),
        method=stage.method, method_options=None if stage.method == "full" else stage.options, data=lc.data, data_format="text", template=None,
        micro_batch_size=micro, grad_accum=accum, global_batch_size=global_seqs, tokens_per_step=tokens_per_step,
        steps=steps, epochs=None, lr=stage.lr, optimizer=stage.optimizer, scheduler=stage.schedule,
        init_from=previous.name if previous else None, eval_every=None,
        early_stopping=None, merge_adapter=False, memory=mem, ds_config=ds_config_name(stage.name),
        sbatch=sbatch_name(stage.name), extend_positions=stage.extend_positions, attention=lc.attention,
        attention_group=shifted_sparse_group(recipe, shape, stage.seq_len, problems),
        carry_adapter=carries_adapter(recipe, stage.method, stage.options, previous, path, problems),
    )


def _finetune_stage(recipe: Recipe, shape: ModelShape | None, index: int, last: StagePlan | None, dp: int,
                    budget: oom_advice.Budget, problems: list[Problem], warnings: list[str]) -> StagePlan:
    ft = recipe.finetune
    _check_method(recipe, problems)
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
    _check_positions(shape, seq_len, _table_length(shape, last), ft.extend_positions, "finetune", problems)
    micro = _packing_safe_micro(recipe, ft.data, ft.micro_batch_size, "finetune.micro_batch_size", problems)
    micro, accum, global_seqs, mem = _batch(recipe, shape, ft.method, ft.data.packing, seq_len, ft.global_batch_size,
                                            micro, dp, budget, (ft.name, "finetune.micro_batch_size"), problems,
                                            warnings, ft.options)
    if global_seqs != ft.global_batch_size:  # dp does not divide it: said, as for long-context tokens_per_step
        warnings.append(f"{ft.name}: {global_seqs} sequences per step (asked {ft.global_batch_size}): {micro} x "
                        f"{accum} accumulation x {dp} data-parallel ranks")
    _check_training(recipe, ft, ft.steps, "finetune", problems, warnings)
    return StagePlan(
        index=index, name=ft.name, phase="finetune", seq_len=seq_len, rope_parameters=rope,
        max_position_embeddings=max(_max_positions(shape, seq_len, rope),
                                    last.max_position_embeddings if last else 0),
        method=ft.method, method_options=ft.options, data=ft.data, data_format=ft.format,
        template=stage_template(ft.format, ft.template), micro_batch_size=micro, grad_accum=accum, global_batch_size=global_seqs,
        tokens_per_step=batching.tokens_per_step(global_seqs, seq_len), steps=ft.steps, epochs=ft.epochs, lr=ft.lr,
        optimizer=ft.optimizer, scheduler=ft.schedule, init_from=last.name if last else None, eval_every=ft.eval_every,
        early_stopping=ft.early_stopping, merge_adapter=ft.merge_adapter, memory=mem,
        ds_config=ds_config_name(ft.name), sbatch=sbatch_name(ft.name), extend_positions=ft.extend_positions,
        metrics=list(ft.metrics), metric_rows=ft.metric_rows, samples=ft.samples,
    )


def _check_training(recipe: Recipe, section: Stage | Finetune, steps: int | None, path: str,
                    problems: list[Problem], warnings: list[str]) -> None:
    """The stage's optimizer where it runs, and its schedule against its step count (when the steps are
    known at plan time: by epochs, they are counted from the data at run time)."""
    _check_optimizer(recipe, section.optimizer, f"{path}.optimizer", problems)
    if section.lr == 0:  # allowed (a dry run of the pipeline), but never what a training run means
        warnings.append(f"{path}.lr is 0: stage {section.name} will not change the weights")
    sched = section.schedule
    if steps is None:
        return
    warmup = schedule.warmup_steps(sched, steps)
    if warmup and warmup >= steps:
        given = "warmup_steps" if section.warmup_steps is not None else \
            "scheduler.warmup_ratio" if sched.warmup_ratio is not None else "scheduler.warmup_steps"
        problems.append(Problem(f"{path}.{given}", f"{warmup} warmup steps leave none of the stage's {steps} steps "
                                "to decay the learning rate", f"use fewer than {steps} warmup steps"))
    elif sched.name == "warmup_stable_decay" and warmup + schedule.decay_steps(sched, steps) > steps:
        problems.append(Problem(f"{path}.scheduler.decay_ratio", f"{warmup} warmup and "
                                f"{schedule.decay_steps(sched, steps)} decay steps are more than the stage's {steps}",
                                "lower decay_ratio or the warmup (the stable phase takes the steps between)"))


def _check_method(recipe: Recipe, problems: list[Problem]) -> None:
    ft, model, c = recipe.finetune, recipe.model, recipe.cluster
    if ft.method == "prefix" and model.gradient_checkpointing:
        problems.append(Problem("finetune.method", "prefix tuning does not work with gradient checkpointing "
                                "(peft refuses the combination)",
                                "set `model.gradient_checkpointing: false` or use `prompt`/`lora`"))
    if ft.method in VIRTUAL_TOKEN_METHODS and recipe.parallelism.sequence_parallel > 1:
        problems.append(Problem("finetune.method", f"{ft.method} tuning prepends virtual tokens, which "
                                "sequence parallelism cannot split", "use `lora` or set sequence_parallel: 1"))
    if ft.method in VIRTUAL_TOKEN_METHODS and ft.data.packing:
        problems.append(Problem("finetune.data.packing", f"{ft.method} tuning cannot isolate packed examples "
                                "(peft drops position_ids for prompt learning), so they would attend to each other",
                                "set `finetune.data.packing: false`"))
    if ft.method == "qlora" and not c.gpus_per_node:
        problems.append(Problem("finetune.method", "qlora needs GPUs (bitsandbytes 4-bit training on CPU "
                                "ranks is impractically slow and unsupported by ZeRO)",
                                "use `lora` on CPU ranks, or set `cluster.gpus_per_node`"))
    if ft.method == "qlora" and recipe.parallelism.zero_stage == 3:
        problems.append(Problem("parallelism.zero_stage", "qlora keeps 4-bit weights that ZeRO-3 cannot "
                                "partition here", "use `zero_stage: 2` with qlora"))
    if ft.merge_adapter and ft.method not in PEFT_ADAPTERS:
        problems.append(Problem("finetune.merge_adapter", f"{ft.method} has no adapter to merge",
                                "remove merge_adapter"))


# Optimizers a rank hands DeepSpeed (no config entry): with optimizer offload DeepSpeed refuses them
# (ZeRORuntimeException: an offloaded optimizer must be its CPU Adam or CPU Lion, or a config one).
CLIENT_OPTIMIZERS = ("adafactor", "paged_adamw_8bit")


def _check_optimizer(recipe: Recipe, opt: Optimizer, path: str, problems: list[Problem]) -> None:
    on_gpu, offload = bool(recipe.cluster.gpus_per_node), recipe.parallelism.offload_optimizer
    if opt.name == "paged_adamw_8bit" and not on_gpu:
        problems.append(Problem(f"{path}.name", "paged_adamw_8bit is bitsandbytes' CUDA optimizer; these are CPU "
                                "ranks", "use `adamw` on CPU ranks, or set `cluster.gpus_per_node`"))
    if opt.name in CLIENT_OPTIMIZERS and offload != "none":
        problems.append(Problem(f"{path}.name", f"DeepSpeed offloads only its own optimizers (CPU Adam, CPU Lion, "
                                f"torch's from its config), not {opt.name}", "use `adamw`, `adam`, `lion` or `sgd` "
                                "with offload, or set `parallelism.offload_optimizer: none`"))


def _batch(recipe: Recipe, shape: ModelShape | None, method: str, packed: bool, seq_len: int, global_seqs: int,
           micro_override: int | None, dp: int, budget: oom_advice.Budget, where: tuple[str, str],
           problems: list[Problem], warnings: list[str],
           opts: MethodOptions | None = None) -> tuple[int, int, int, dict | None]:
    """(micro, accum, global sequences, memory) with global = micro x accum x dp. `where`: the stage's
    name and its micro-batch field."""
    name, path = where
    sp = recipe.parallelism.sequence_parallel
    per_rank = batching.per_rank_batch(global_seqs, dp)
    if micro_override and per_rank % micro_override:
        problems.append(_micro_changes_batch(micro_override, per_rank, dp, path))
    candidates = [micro_override] if micro_override else \
        _divisors_desc(per_rank, max(1, MAX_MICRO_TOKENS * sp // seq_len))
    for micro in candidates:
        mem = _memory(recipe, shape, method, packed, seq_len, micro, opts)
        if mem is None or mem.total_gib <= oom_advice.TIGHT_FRACTION * budget.gib:
            break
    accum = batching.grad_accum_for(global_seqs, micro, dp)
    stage = oom_advice.Stage(name, path.rsplit(".", 1)[0], seq_len, method, micro, path, bool(micro_override))
    oom_advice.check_fit(recipe, shape, stage, mem, budget,
                         lambda r, m: _memory(r, shape, method, packed, seq_len, m, opts), problems, warnings)
    return micro, accum, batching.train_batch_size(micro, accum, dp), mem.as_dict() if mem else None


def _micro_changes_batch(micro: int, per_rank: int, dp: int, path: str) -> Problem:
    """An explicit micro-batch that does not divide a rank's share would silently change the global batch."""
    accum = batching.grad_accum_for(per_rank * dp, micro, dp)
    return Problem(path, f"{micro} sequences per micro-step do not divide the {per_rank} each of the {dp} "
                   f"data-parallel ranks takes per step: the step would grow to "
                   f"{batching.train_batch_size(micro, accum, dp)} sequences "
                   f"(from {per_rank * dp})", f"use a divisor of {per_rank} (gradient accumulation keeps the "
                   "batch), or unset it to let the plan choose, or change the global batch")


def _divisors_desc(n: int, limit: int) -> list[int]:
    """Divisors of n up to limit, largest first; O(sqrt n), so a huge batch cannot stall the planner."""
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return sorted({d for d in small + [n // d for d in small] if d <= limit}, reverse=True) or [1]


def _memory(recipe: Recipe, shape: ModelShape | None, method: str, packed: bool, seq_len: int,
            micro: int, opts: MethodOptions | None = None) -> memory.MemoryEstimate | None:
    if shape is None:
        return None
    par, opts, model = recipe.parallelism, opts or MethodOptions(), recipe.model
    dp = batching.data_parallel_size(recipe.cluster.world_size, par.sequence_parallel)
    return memory.estimate(memory.MemoryInputs(
        shape=shape, trainable_params=memory.trainable_params(shape, method, opts), dtype=recipe.model.dtype,
        quantized_4bit=method == "qlora", zero_stage=par.zero_stage,
        offload_optimizer=par.offload_optimizer != "none", offload_params=par.offload_params != "none",
        dp=dp, sp=par.sequence_parallel, micro_batch=micro, seq_len=seq_len,
        checkpointing=model.gradient_checkpointing, attention=model.attn_implementation,
        on_gpu=bool(recipe.cluster.gpus_per_node),
        loss_chunk_tokens=None if method in VIRTUAL_TOKEN_METHODS else model.loss_chunk_tokens, packed=packed,
        offload_activations=model.offload_activations, mlp_tile_tokens=model.tiled_mlp_tokens,
        head_gradient_buffer=method == "full" and model.loss_chunk_tokens
        < batching.tokens_per_rank_micro_batch(micro, seq_len, par.sequence_parallel)))


def _max_positions(shape: ModelShape | None, seq_len: int, rope: dict[str, Any]) -> int:
    """The context the stage's model declares: what it trains on, and what its RoPE scaling addresses."""
    return max(seq_len, shape.max_position_embeddings if shape else 0, scaled_context(rope) or 0)


def _inherited_theta(earlier: list[StagePlan]) -> float | None:
    """The RoPE base the stages so far leave the model with (None: the model's own)."""
    return next((s.rope_parameters["rope_theta"] for s in reversed(earlier) if "rope_theta" in s.rope_parameters),
                None)


def _table_length(shape: ModelShape | None, previous: StagePlan | None) -> int | None:
    """The positions a stage's starting weights know: the previous stage's, or the model's own."""
    if previous is not None:
        return previous.max_position_embeddings
    return shape.max_position_embeddings if shape else None


def _check_positions(shape: ModelShape | None, seq_len: int, have: int | None, extend: str, path: str,
                     problems: list[Problem]) -> None:
    """A learned position table (GPT-2 style) reaches seq_len only if the recipe says how to grow it."""
    if shape is None or have is None:
        return
    field = f"{path}.extend_positions"
    if not shape.learned_position_table:
        if extend != "none":
            problems.append(Problem(field, f"{shape.model_type} has no learned position table to grow",
                                    "remove extend_positions (RoPE models reach further with `rope`)"))
        return
    if seq_len <= have:
        return
    if extend == "none":
        problems.append(Problem(field, f"{shape.model_type} has a learned table of {have} positions: seq_len "
                                f"{seq_len} would index past its end",
                                "set `extend_positions: interpolate` (or copy, init) to grow the table"))
    elif shape.model_type not in POSITION_TABLES:
        problems.append(Problem(field, f"growing {shape.model_type}'s position table is not supported",
                                f"keep seq_len <= {have}, or use a {'/'.join(POSITION_TABLES)} model"))


def _packing_safe_micro(recipe: Recipe, data: Data, asked: int | None, path: str,
                        problems: list[Problem]) -> int | None:
    """The micro-batch that keeps packed documents apart.

    sdpa and eager build their mask from the restarting position_ids, at any batch size;
    transformers 5 hands flash-attn the document boundaries only for a batch of one row.
    """
    if not (data.packing and _may_use_flash_attention(recipe)):
        return asked
    if asked is not None and asked > 1:
        problems.append(Problem(path, f"{asked} packed rows per micro-batch would attend across documents under "
                                "flash_attention_2 (transformers splits packed documents for flash-attn only in a "
                                "one-row batch)", "set `micro_batch_size: 1` (gradient accumulation keeps the "
                                "tokens per step), use `attn_implementation: sdpa`, or set `packing: false`"))
        return asked
    return 1


def _may_use_flash_attention(recipe: Recipe) -> bool:
    attn = recipe.model.attn_implementation
    return attn == "flash_attention_2" or (attn == "auto" and recipe.cluster.gpus_per_node > 0)

