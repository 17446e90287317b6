"""The batch arithmetic of a run: the one place each derived number is computed.

The plan, the DeepSpeed config, each rank's data stream and the trainer's world-size change on
resume all call these functions, so no two of them can disagree (tests/unit/test_plan_contract.py
spies on them). On a rank they arrive as one `RankBatch` (`rank_batch`, through `Plan.rank_batch`):
the loop, the batch stream and the DeepSpeed config take their numbers from it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


def data_parallel_size(world_size: int, sequence_parallel: int) -> int:
    """Ranks that read different batches: a sequence-parallel group shares one. A degree that does
    not divide the world is a plan error; 1 keeps the planner's arithmetic going until it is reported."""
    return world_size // sequence_parallel if world_size % sequence_parallel == 0 else 1


def data_parallel_rank(rank: int, sequence_parallel: int) -> int:
    """The batch stream a rank reads: contiguous ranks form a sequence-parallel group."""
    return rank // sequence_parallel


def train_batch_size(micro_batch_size: int, grad_accum: int, data_parallel: int) -> int:
    """Sequences per optimizer step (DeepSpeed's train_batch_size)."""
    return micro_batch_size * grad_accum * data_parallel


def per_rank_batch(global_batch: int, data_parallel: int) -> int:
    """Sequences each data-parallel rank takes per step (rounded up: never fewer than asked)."""
    return max(1, -(-global_batch // data_parallel))


def grad_accum_for(global_batch: int, micro_batch_size: int, data_parallel: int) -> int:
    """Micro-steps that reach (at least) `global_batch` sequences per step."""
    return max(1, -(-per_rank_batch(global_batch, data_parallel) // micro_batch_size))


def exact_grad_accum(global_batch: int, micro_batch_size: int, data_parallel: int) -> int | None:
    """Micro-steps that keep exactly `global_batch` sequences per step at another data-parallel size
    (a resume on fewer or more ranks), or None when no whole number does."""
    if global_batch % (micro_batch_size * data_parallel):
        return None
    return global_batch // (micro_batch_size * data_parallel)


def tokens_per_step(global_batch: int, seq_len: int) -> int:
    return global_batch * seq_len


def tokens_per_rank_micro_batch(micro_batch_size: int, seq_len: int, sequence_parallel: int) -> int:
    """Tokens one rank runs per micro-step: a sequence-parallel rank holds a slice of each sequence."""
    return micro_batch_size * seq_len // sequence_parallel


def steps_for_tokens(tokens: int, tokens_per_step: int) -> int:
    """Optimizer steps of a stage given in tokens (the last step may overshoot a little)."""
    return math.ceil(tokens / tokens_per_step)


def steps_per_epoch(rows: int, global_batch: int) -> int:
    """Optimizer steps in one pass over `rows` training rows (a partial last batch waits for the next epoch)."""
    return max(1, rows // global_batch)


def steps_for_epochs(epochs: float, steps_in_epoch: int) -> int:
    """Optimizer steps of a stage given in epochs: known only once the data is read, on the ranks."""
    return max(1, math.ceil(epochs * steps_in_epoch))


@dataclass(frozen=True)
class RankBatch:
    """A stage's batch as one rank of the live world runs it (a resume may run on more or fewer ranks
    than planned: the global batch stays, gradient accumulation changes)."""
    micro: int  # sequences per micro-step on this rank (the plan's micro_batch_size)
    accum: int  # micro-steps per optimizer step
    dp: int  # data-parallel ranks: batch streams
    dp_rank: int  # the stream this rank reads

    @property
    def global_batch(self) -> int:
        """Sequences per optimizer step (DeepSpeed's train_batch_size)."""
        return train_batch_size(self.micro, self.accum, self.dp)


def rank_batch(micro_batch_size: int, global_batch: int, world_size: int, rank: int,
               sequence_parallel: int) -> RankBatch:
    """Rank `rank`'s batch in a world of `world_size` ranks that keeps `global_batch` sequences per step
    at `micro_batch_size`. Raises ValueError when no whole accumulation does, or the sequence-parallel
    degree does not divide the world."""
    dp = data_parallel_size(world_size, sequence_parallel)
    accum = exact_grad_accum(global_batch, micro_batch_size, dp)
    if accum is None or world_size % sequence_parallel:
        raise ValueError(f"world size {world_size} cannot keep the planned {global_batch} sequences per step "
                         f"with micro-batch {micro_batch_size}")
    return RankBatch(micro_batch_size, accum, dp, data_parallel_rank(rank, sequence_parallel))
