"""The planner's cross-field checks: each appends Problems (or warnings) for one concern and computes
no number. `plan.make_plan` runs them before it builds a Plan."""

from __future__ import annotations

from dist_ft.recipe.config import PEFT_ADAPTERS, VIRTUAL_TOKEN_METHODS, Finetune, Optimizer, Recipe, Stage
from dist_ft.recipe.model_shape import INLINE_MLP_TYPES, POSITION_TABLES, ModelShape
from dist_ft.recipe.strict import Problem
from dist_ft.recipe.timelimit import parse_time_limit

from . import schedule
from .sp_checks import check_sequence_parallel


def check_cluster(recipe: Recipe, shape: ModelShape | None, problems: list[Problem],
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


def check_time_limit(recipe: Recipe, problems: list[Problem]) -> int | None:
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


def check_training(recipe: Recipe, section: Stage | Finetune, steps: int | None, path: str,
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


def check_method(recipe: Recipe, problems: list[Problem]) -> None:
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


def check_positions(shape: ModelShape | None, seq_len: int, have: int | None, extend: str, path: str,
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


def check_extends(stage: Stage, shape: ModelShape | None, path: str, warnings: list[str]) -> None:
    """The first long-context stage at or below the model's native window stretches nothing (later stages must
    grow, a problem otherwise): its tokens buy plain continued pretraining, often a billion of them."""
    native = stage.rope.original_max_position_embeddings or (shape.max_position_embeddings if shape else None)
    if native and stage.seq_len <= native:
        warnings.append(f"{path}: stage {stage.name} trains at seq_len {stage.seq_len}, inside the model's native "
                        f"{native} tokens: it extends nothing (its tokens are continued pretraining at a length the "
                        f"model already has); start the schedule above {native} or drop the stage")


def check_model_source(recipe: Recipe, shape: ModelShape | None, warnings: list[str]) -> None:
    """A hub id still a hub id after planning is not in this machine's cache (preflight.resolve_hub_model):
    every rank would download it, which offline compute nodes cannot."""
    name = recipe.model.name_or_path
    if name is None or name.startswith("/"):
        return
    estimate = "" if shape else "; no memory estimate or trainable count without its config"
    warnings.append(f"model.name_or_path: {name} is not in this machine's Hugging Face cache{estimate}. Every rank "
                    "would download it at start-up: run `dist-ft prepare RECIPE` once (HF_HOME on the shared file "
                    "system; gated models need HF_TOKEN) and the plan reads the local copy, which offline compute "
                    "nodes (HF_HUB_OFFLINE=1) need")
