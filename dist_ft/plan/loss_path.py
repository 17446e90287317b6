"""How a stage's loss runs the LM head, and why: the line the plan prints for each stage.

The ranks take the same branches in dist_ft.rank.loss (`causal_lm_loss_sum`), from what they see
at run time (a partitioned head, Liger installed); this is the plan's reading of the recipe.
"""

from __future__ import annotations

from dist_ft.recipe.config import VIRTUAL_TOKEN_METHODS


def loss_path(method: str, zero_stage: int, loss_kernel: str, on_gpu: bool, micro_tokens: int,
              chunk_tokens: int) -> str:
    """One line: which path, then why (`micro_tokens`: one rank's tokens per micro-batch)."""
    if method in VIRTUAL_TOKEN_METHODS:
        return "transformers' own loss (the method prepends virtual tokens): full logits for the micro-batch"
    if loss_kernel == "liger" or (loss_kernel == "auto" and on_gpu and zero_stage != 3):
        liger = "Liger's fused linear cross-entropy"
        if loss_kernel == "liger":
            return liger
        return f"{liger} where liger-kernel is installed, else {_chunked(zero_stage, micro_tokens, chunk_tokens)}"
    return _chunked(zero_stage, micro_tokens, chunk_tokens)


def _chunked(zero_stage: int, micro_tokens: int, chunk_tokens: int) -> str:
    chunks = -(-micro_tokens // chunk_tokens)
    if chunks == 1:
        return (f"one chunk, no recompute: {micro_tokens} tokens per micro-batch fit in loss_chunk_tokens "
                f"{chunk_tokens}, so the whole logits are small enough to keep")
    if zero_stage == 3:
        return (f"{chunks} fused chunks of {chunk_tokens} tokens, no recompute: ZeRO-3 gathers the LM head (and "
                "a LoRA adapter on it) once for all chunks and each trainable weight's gradient goes back through "
                "one call of its Linear (a trainable bias or DoRA magnitude on the head: each chunk recomputed in "
                "backward instead)")
    return (f"{chunks} fused chunks of {chunk_tokens} tokens: each chunk's gradients are taken while its logits "
            "exist, no recompute")
