"""The micro-batch search: the largest micro-batch that divides a rank's share of the global batch and
fits the memory budget, or the recipe's own, checked; and the one-row micro-batch packed documents need
under flash-attn. The arithmetic is `batching`'s."""

from __future__ import annotations

import math

from dist_ft.recipe.config import VIRTUAL_TOKEN_METHODS, Data, MethodOptions, Recipe
from dist_ft.recipe.model_shape import ModelShape
from dist_ft.recipe.strict import Problem

from . import batching, memory, oom_advice

MAX_MICRO_TOKENS = 32768  # beyond this a bigger micro-batch buys no throughput, only memory


def choose_batch(recipe: Recipe, shape: ModelShape | None, method: str, packed: bool, seq_len: int,
                 global_seqs: int, micro_override: int | None, dp: int, budget: oom_advice.Budget,
                 where: tuple[str, str], problems: list[Problem], warnings: list[str],
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


def packing_safe_micro(recipe: Recipe, data: Data, asked: int | None, path: str,
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
