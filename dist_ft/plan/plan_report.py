"""The plan as a person reads it: one block per stage, memory with its parts."""

from __future__ import annotations

import shlex

from dist_ft.recipe.config import LORA_FAMILY, VIRTUAL_TOKEN_METHODS, Model
from . import batching, schedule
from .loss_path import loss_path
from .method_options import trainable_params
from .plan import Plan, StagePlan


def format_plan(plan: Plan, python: str) -> str:
    """What `dist-ft plan` prints; `python`: the training interpreter (`launch_script.training_python`)."""
    head = [
        f"run {plan.name}  ->  {plan.run_dir}",
        f"cluster: {plan.nodes} node(s) x {plan.ranks_per_node} {'GPU' if plan.device == 'cuda' else 'CPU rank'}(s)"
        f" = world {plan.world_size}; data-parallel {plan.dp} x sequence-parallel {plan.sp}",
        f"model: {_model_line(plan)}",
        f"ranks run: {_python_line(plan, python)}",
    ]
    blocks = [_stage_block(plan, s) for s in plan.stages]
    tail = [f"warning: {w}" for w in plan.warnings]
    return "\n".join(head + [""] + blocks + tail)


def _python_line(plan: Plan, python: str) -> str:
    source = "cluster.python" if plan.cluster.python else "the interpreter rendering this plan"
    return f"{shlex.quote(python)} -m torch.distributed.run ({source})"


def _model_line(plan: Plan) -> str:
    m, shape = plan.model, plan.model_shape
    source = m.name_or_path or "random init from recipe config"
    if m.gguf_file:
        source += f" ({m.gguf_file})"
    if not shape:
        return f"{source}; config not readable: memory estimate unavailable"
    return (f"{source}; {shape.model_type} {_params(shape.num_params)}, {shape.num_layers} layers, hidden "
            f"{shape.hidden_size}, {shape.num_heads}/{shape.num_kv_heads} heads, native context "
            f"{shape.max_position_embeddings}; {m.dtype}, attention {m.attn_implementation}, "
            f"checkpointing {_checkpointing(m)}{_tiling(m)}")


def _checkpointing(m: Model) -> str:
    if not m.gradient_checkpointing:
        return "off"
    return "on, offloaded to host" if m.offload_activations else "on"


def _tiling(m: Model) -> str:
    tile = m.tiled_mlp_tokens
    return f", MLP tiles of {tile} tokens" if tile else ""


def _params(n: int) -> str:
    return f"{n / 1e9:.2f}B params" if n >= 1e9 else f"{n / 1e6:.1f}M params"


def _attention(s: StagePlan) -> str:
    return f"   attention S²-Attn (groups of {s.attention_group}, half the heads shifted)" \
        if s.attention == "shifted_sparse" else ""


def _stage_block(plan: Plan, s: StagePlan) -> str:
    phase = "continued pretraining" if s.phase == "continued_pretraining" else "fine-tuning"
    steps = f"{s.steps} steps" if s.steps is not None else f"{s.epochs:g} epochs (steps counted from the data)"
    par = plan.parallelism
    offload = "/".join(x for x in (par.offload_optimizer, par.offload_params) if x != "none") or "no offload"
    lines = [
        f"[{s.index}] {s.name}  ({phase}{', from ' + s.init_from if s.init_from else ''})",
        f"    seq_len {s.seq_len}   rope {_rope(s.rope_parameters)}{_positions(s)}{_attention(s)}",
        f"    method {s.method}{_options(s)}",
        f"    trainable: {_trainable(plan, s)}",
        f"    micro-batch {s.micro_batch_size} x grad-accum {s.grad_accum} x dp {plan.dp} = {s.global_batch_size}"
        f" sequences = {s.tokens_per_step:,} tokens/step",
        f"    {steps}; {_optimizer(s)}",
        f"    {_schedule(s)}",
        f"    ZeRO-{par.zero_stage}, {offload}, sequence-parallel {par.sequence_parallel}",
        f"    memory/rank: {_memory(s.memory)}",
        f"    loss: {stage_loss_path(plan, s)}",
    ]
    return "\n".join(lines) + "\n"


def stage_loss_path(plan: Plan, s: StagePlan) -> str:
    micro_tokens = batching.tokens_per_rank_micro_batch(s.micro_batch_size, s.seq_len, plan.sp)
    return loss_path(s.method, plan.parallelism.zero_stage, plan.model.loss_kernel, plan.device == "cuda",
                     micro_tokens, plan.model.loss_chunk_tokens)


def _optimizer(s: StagePlan) -> str:
    """`optimizer adamw (lr 2e-05, weight decay 0.1 on weight matrices, betas 0.9/0.95, eps 1e-08), clip 1`"""
    o = s.optimizer
    parts = [f"lr {s.lr:g}", f"weight decay {o.weight_decay:g}" + (" on weight matrices" if o.weight_decay else "")]
    if o.option("betas") is not None:
        parts.append("betas " + "/".join(f"{b:g}" for b in o.option("betas")))
    if o.option("eps") is not None:
        parts.append(f"eps {o.option('eps'):g}")
    if o.option("momentum") is not None:
        parts.append(f"momentum {o.option('momentum'):g}")
    clip = f"clip {o.max_grad_norm:g}" if o.max_grad_norm else "no clipping"
    return f"optimizer {o.name} ({', '.join(parts)}), {clip}"


FRACTIONS = (0.0, 0.25, 0.5, 0.75, 1.0)


def _schedule(s: StagePlan) -> str:
    """`schedule cosine (warmup 2, floor 0.1): lr 1e-05 2e-05 1.5e-05 ... at 0/25/50/75/100 % ▅█▇▅▃▂▁`"""
    sc = s.scheduler
    parts = [f"warmup {sc.warmup_steps}" if sc.warmup_ratio is None else f"warmup {sc.warmup_ratio:g} of the steps"]
    if sc.min_lr_ratio is not None:
        parts.append(f"floor {sc.min_lr_ratio:g}")
    if sc.decay_ratio is not None:
        parts.append(f"decay over the last {sc.decay_ratio:.0%}")
    if sc.power is not None:
        parts.append(f"power {sc.power:g}")
    head = f"schedule {sc.name} ({', '.join(parts)})"
    if s.steps is None:
        return f"{head}: the lr curve follows from the steps counted at run time"
    points = " ".join(f"{lr:.3g}" for lr in schedule.lr_at(sc, s.lr, s.steps, FRACTIONS))
    return f"{head}: lr at 0/25/50/75/100 % {points}  {schedule.sparkline(sc, s.steps, min(24, s.steps))}"


def _positions(s: StagePlan) -> str:
    return "" if s.extend_positions == "none" else \
        f"   position table {s.max_position_embeddings} rows (grown by {s.extend_positions} where needed)"


def _rope(params: dict) -> str:
    if not params:
        return "the model's own"
    return ", ".join(f"{k}={v}" for k, v in params.items() if k not in ("short_factor", "long_factor")) + \
        (" (+ LongRoPE factor lists)" if "short_factor" in params else "")


def _options(s: StagePlan) -> str:
    o = s.method_options
    if s.method in LORA_FAMILY:
        return f" (r {o.r}, alpha {o.alpha:g}, dropout {o.dropout:g}, targets {o.target_modules or 'all-linear'})"
    if s.method in VIRTUAL_TOKEN_METHODS:
        return f" ({o.num_virtual_tokens} virtual tokens)"
    if s.method == "freeze":
        return f" (last {o.trainable_layers} layers train)"
    return ""


def _trainable(plan: Plan, s: StagePlan) -> str:
    shape = plan.model_shape
    if shape is None:
        return "unknown (model config not readable)"
    count, total = trainable_params(shape, s.method, s.method_options), shape.num_params
    estimate = "" if shape.exact_layout else f"; estimated on a Llama-shaped {shape.model_type}"
    return f"{count:,} parameters ({100 * count / total:.3g}% of the model's {total:,}){estimate}"


def _memory(mem: dict | None) -> str:
    if not mem:
        return "unknown (model config not readable)"
    parts = ("weights", "gradients", "optimizer", "activations", "logits", "overhead")
    line = f"~{mem['total_gib']:.2f} GiB = " + " + ".join(f"{p} {mem[p + '_gib']:.2f}" for p in parts)
    host = mem.get("host_gib", 0.0)
    return f"{line}; activation checkpoints in host memory {host:.2f} GiB" if host else line
