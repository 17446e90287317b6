"""What DeepSpeed's Ulysses sequence parallelism (UlyssesSPAttentionHF) accepts: heads and KV heads it
can split, attention it can run, and sequences it can slice. Pure."""

from __future__ import annotations

from dist_ft.recipe.model_shape import ModelShape
from dist_ft.recipe.strict import Problem


def check_sequence_parallel(sp: int, shape: ModelShape | None, attn: str, problems: list[Problem]) -> None:
    """What DeepSpeed's Ulysses attention (UlyssesSPAttentionHF) accepts."""
    if attn == "eager":
        problems.append(Problem("parallelism.sequence_parallel",
                                "Ulysses sequence parallelism does not run eager attention (it would need the "
                                "full-sequence 4D mask)",
                                "set `model.attn_implementation: auto` (or sdpa, or flash_attention_2 on GPUs)"))
    if shape is None:
        return
    if shape.num_heads % sp:
        problems.append(Problem("parallelism.sequence_parallel",
                                f"{sp} does not divide the model's {shape.num_heads} attention heads "
                                "(Ulysses splits heads across ranks)",
                                f"use a divisor of {shape.num_heads}"))
    kv = shape.num_kv_heads
    if kv % sp and sp % kv:  # fewer KV heads than ranks are replicated, but only a whole number of times
        problems.append(Problem("parallelism.sequence_parallel",
                                f"{sp} neither divides nor is a multiple of the model's {kv} key/value heads "
                                "(Ulysses splits or replicates them across ranks)",
                                f"use a divisor or a multiple of {kv} that divides {shape.num_heads}"))


def check_sequence_lengths(sp: int, lengths: list[tuple[str, int]], problems: list[Problem]) -> None:
    """Ulysses splits each sequence into sp slices: one problem naming every stage (name, seq_len) it does
    not divide."""
    bad = [f"{name} ({seq_len})" for name, seq_len in lengths if seq_len % sp]
    if bad:
        problems.append(Problem("parallelism.sequence_parallel", f"{sp} does not divide the seq_len of stage(s) "
                                f"{', '.join(bad)}", "use a degree that divides every stage's seq_len"))
