"""Causal-LM loss that never holds full-vocabulary fp32 logits for the whole sequence.

transformers computes `lm_head(hidden)` for every token, upcasts it to fp32 and keeps it (and its
gradient) through backward: tokens × vocab × 4 B × 2, e.g. 16 GiB at 64k tokens and a 32k vocab.
Here the decoder body runs once, then the LM head and the cross-entropy run over `chunk_tokens`
rows at a time. Each chunk's gradients (of its hidden rows and of the head's trainable weights) are
taken in forward while its logits exist, then the logits are dropped (`fused_head_loss_sum`, the
fused linear cross-entropy idea): the head runs once per chunk and backward only scales the stored
gradients. Peak logits memory is one chunk's fp32 logits and their gradient. Under ZeRO-3 the head's
weights (a LoRA adapter's too) are gathered once for all chunks (`PartitionedHeadLoss`) and each trainable
weight's gradient goes back to DeepSpeed through one ordinary call of its Linear
(`gathered_fused_head_loss_sum`); a head with another trainable parameter (a bias, DoRA's magnitude) runs
each chunk under activation checkpointing instead and backward recomputes its logits (`chunked_head_loss_sum`).
A micro-batch that fits one chunk keeps its logits for backward on every path: nothing is recomputed.

The objective is transformers' `ForCausalLMLoss` exactly: labels are shifted inside (position i is
scored against labels[i + 1], the last position against nothing), -100 is ignored, the loss is the
mean over the scored tokens (NaN when there are none, as there). Under sequence parallelism each rank
holds a slice of the sequence with labels shifted beforehand (`shift_labels`), and the mean is the
whole group's (see sequence_parallel.py).

Every module is reached through `__call__`, so ZeRO-3's hooks gather the decoder's and the LM
head's partitioned weights as they run (the head again for each chunk recomputed in backward);
`PartitionedHeadLoss` declares the head's weights as its external parameters, DeepSpeed's public API
for a weight used outside its own module.
dist_ft.plan.loss_path says in the plan which path each stage takes; the head kernels live in
head_loss.py.

`LanguageModelLoss` is what DeepSpeed wraps: `engine(**batch)` returns this loss through DeepSpeed's
own forward (its backward bookkeeping hooks the returned loss), so no DeepSpeed internals are used.
With `head_kernel="liger"` the LM head and cross-entropy run as Liger's fused linear cross-entropy
(CUDA, Triton: it never holds more than a block of logits either, and skips the recompute). With
`offload_activations` its forward runs inside `HostActivations` (activation_offload.py): the
activation checkpoints wait for backward in host memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from .activation_offload import HostActivations
from .head_loss import (carried_linears, chunked_head_loss_sum, fused_head_loss_sum, gathered_fused_head_loss_sum,
                        head_logits, head_partitioned, liger_head_loss_sum)
from .labels import IGNORE_INDEX, SHIFT_LABELS

if TYPE_CHECKING:
    from .sequence_parallel import SequenceParallel

HEAD_KERNELS = ("chunked", "liger")


@dataclass(frozen=True)
class TokenMean:
    """The mean loss over every scored token of every rank's micro-batch, the same value on all ranks.

    A rank's gradient share is `gradient_factor` x (its tokens' loss sum / all ranks' count); the
    factor undoes DeepSpeed's averaging over ranks (`engine.token_mean_gradient_factor`), so the update
    does not depend on how scored tokens fall on ranks, and a rank that scores none (an all-prompt SFT
    batch, a sequence-parallel slice of padding) contributes zero instead of NaN."""
    gradient_factor: float

    def __call__(self, local_sum: torch.Tensor, local_count: int) -> torch.Tensor:
        return group_mean(local_sum, local_count, None, self.gradient_factor)


def group_mean(local_sum: torch.Tensor, local_count: int, group, gradient_factor: float = 1.0) -> torch.Tensor:
    """The group's mean token loss, the same value on every rank of `group` (None: all ranks), whose
    gradient is `gradient_factor` x this rank's share (its tokens' loss sum / the group's count).

    Under sequence parallelism the all-to-alls in attention already route every token's gradient to
    the rank that holds its inputs, so the shares add up to the whole sequence's gradient."""
    stats = torch.stack([local_sum.detach().float(),
                         torch.tensor(float(local_count), device=local_sum.device)])
    torch.distributed.all_reduce(stats, group=group)
    group_sum, group_count = stats[0], stats[1]
    share = local_sum * gradient_factor
    return (share + (group_sum - share.detach())) / group_count


class LanguageModelLoss(torch.nn.Module):
    """A causal LM whose forward returns its chunked loss; the LM is `.lm` (state-dict prefix `lm.`).

    With `token_mean` (every multi-rank run) the loss is the mean over all ranks' scored tokens;
    without it, this rank's own mean (one process)."""

    def __init__(self, lm: torch.nn.Module, chunk_tokens: int = 4096,
                 sequence_parallel: SequenceParallel | None = None, offload_activations: bool = False,
                 head_kernel: str = "chunked", token_mean: TokenMean | None = None) -> None:
        super().__init__()
        if head_kernel not in HEAD_KERNELS:
            raise ValueError(f"head_kernel must be one of {HEAD_KERNELS}, got {head_kernel!r}")
        self.lm = lm
        self.chunk_tokens = chunk_tokens
        self.head_kernel = head_kernel
        self.sequence_parallel = sequence_parallel
        if sequence_parallel is not None and token_mean is None:
            raise ValueError("sequence parallelism needs a token_mean over the ranks that share a sequence")
        self.token_mean = token_mean
        self.offload_activations = offload_activations
        self.offloaded_bytes = 0  # what the last forward kept in host memory
        self.partitioned_head = PartitionedHeadLoss()

    def forward(self, **batch: torch.Tensor) -> torch.Tensor:
        """The mean loss of the whole batch; under sequence parallelism every rank of the group gets
        the whole batch, runs its slice of it and returns the group's mean."""
        if not self.offload_activations:
            return self._loss(batch)
        with HostActivations() as held:
            loss = self._loss(batch)
        self.offloaded_bytes = held.bytes
        return loss

    def _loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        sp = self.sequence_parallel
        if sp is None and (self.token_mean is None or _adds_virtual_tokens(self.lm)):
            return causal_lm_loss(self.lm, batch, self.chunk_tokens, self.head_kernel, self.partitioned_head)
        if _adds_virtual_tokens(self.lm):
            raise ValueError("prompt-learning methods prepend virtual tokens, which sequence parallelism cannot split")
        total, count = causal_lm_loss_sum(self.lm, sp.shard(batch) if sp else batch, self.chunk_tokens,
                                          self.head_kernel, self.partitioned_head)
        return self.token_mean(total, count)


class PartitionedHeadLoss(torch.nn.Module):
    """The fused head loss under ZeRO-3, as a module of its own: the head's weights are registered as its
    external parameters (deepspeed.zero.register_external_parameter, DeepSpeed's public hook for a weight
    used outside its module), so DeepSpeed gathers them once when this module starts and releases them when
    it ends, for every chunk together. The registration happens on first use, just before the module is
    called, so a model ZeRO-3 does not partition never imports DeepSpeed for it."""

    def declare(self, head: torch.nn.Module) -> None:
        """Register every parameter of the partitioned head as this module's external parameter. DeepSpeed
        keys them by id, so registering a parameter again changes nothing."""
        from deepspeed.runtime.zero.partition_parameters import register_external_parameter

        for param in head.parameters():
            register_external_parameter(self, param)

    def forward(self, hidden: torch.Tensor, targets: torch.Tensor, model: torch.nn.Module, chunk_tokens: int,
                chunks: int, carriers: list[torch.nn.Linear]) -> torch.Tensor:
        return gathered_fused_head_loss_sum(hidden, targets, model, chunk_tokens, chunks, carriers)


STATE_PREFIX = "lm."


def unwrapped_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A LanguageModelLoss state dict with the LM's own keys (what save_pretrained expects)."""
    return {k.removeprefix(STATE_PREFIX): v for k, v in state.items()}


def causal_lm_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor], chunk_tokens: int = 4096,
                   head_kernel: str = "chunked", partitioned_head: PartitionedHeadLoss | None = None) -> torch.Tensor:
    """Mean next-token cross-entropy of `batch` (input_ids, labels or shift_labels, optional position_ids).

    `model` is a transformers causal LM, a peft model around one, or a DeepSpeed engine's `.module`.
    """
    _check_chunk_tokens(chunk_tokens)
    if _adds_virtual_tokens(model):
        # Prefix/prompt/P-tuning prepend virtual tokens (or past key values) inside peft's own
        # forward and realign the labels there; re-implementing that is not worth it for methods
        # whose sequences are short fine-tuning rows. Their loss goes through transformers as is.
        return model(**batch, use_cache=False).loss
    total, count = causal_lm_loss_sum(model, batch, chunk_tokens, head_kernel, partitioned_head)
    return total / count


def causal_lm_loss_sum(model: torch.nn.Module, batch: dict[str, torch.Tensor],
                       chunk_tokens: int = 4096, head_kernel: str = "chunked",
                       partitioned_head: PartitionedHeadLoss | None = None) -> tuple[torch.Tensor, int]:
    """(sum of the token losses, number of scored tokens). `labels` are shifted here (position i is
    scored against labels[i + 1]); `shift_labels`, as transformers names them, already are: a
    sequence-parallel slice needs the label of the token that starts the next rank's slice.
    `partitioned_head`: LanguageModelLoss's module for the fused loss under ZeRO-3 (without it a
    partitioned head recomputes its chunks in backward)."""
    _check_chunk_tokens(chunk_tokens)
    inputs = {k: v for k, v in batch.items() if k not in ("labels", SHIFT_LABELS)}
    # The whole model runs (not just its decoder) so that hooks on the root module fire: DeepSpeed's
    # forward prologue/epilogue and ZeRO-3's per-step parameter trace reset live there. An empty
    # `logits_to_keep` makes transformers skip the LM head; the last hidden state is the normed one.
    no_positions = torch.empty(0, dtype=torch.long, device=batch["input_ids"].device)
    out = model(**inputs, use_cache=False, output_hidden_states=True, logits_to_keep=no_positions)
    hidden = out.hidden_states[-1]
    targets = batch.get(SHIFT_LABELS)
    if targets is None:
        targets = F.pad(batch["labels"], (0, 1), value=IGNORE_INDEX)[..., 1:]  # shifted as in ForCausalLMLoss
    hidden = hidden.reshape(-1, hidden.shape[-1])
    targets = targets.reshape(-1).to(hidden.device)
    if head_kernel == "liger":
        return liger_head_loss_sum(hidden, targets, model)
    head = model.get_output_embeddings()
    partitioned = head_partitioned(head)
    scored = int((targets != IGNORE_INDEX).sum())
    chunks = _chunk_count(scored, chunk_tokens, head, partitioned)
    if not partitioned:
        return fused_head_loss_sum(hidden, targets, head_logits(model), list(head.parameters()), chunk_tokens,
                                   chunks)
    carriers = carried_linears(head)
    if chunks > 1 and partitioned_head is not None and carriers is not None and torch.is_grad_enabled():
        partitioned_head.declare(head)
        return partitioned_head(hidden, targets, model, chunk_tokens, chunks, carriers), scored
    # One chunk keeps its logits (nothing to recompute); a trainable bias or DoRA magnitude recomputes.
    return chunked_head_loss_sum(hidden, targets, head_logits(model), chunk_tokens, chunks)


def _check_chunk_tokens(chunk_tokens: int) -> None:
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")


def _chunk_count(scored: int, chunk_tokens: int, head: torch.nn.Module, partitioned: bool) -> int:
    """How many chunks this rank runs the head over. Under ZeRO-3 every call of the head all-gathers
    its weight, a collective: all ranks must make the same number of calls whatever they score, so
    they agree on the largest count and the ranks with less run empty chunks. At least one chunk
    runs, even empty, so that the loss stays connected to every trainable parameter: each rank's
    backward must produce (zero) gradients for DeepSpeed's reductions to match."""
    chunks = max(1, -(-scored // chunk_tokens))
    if not partitioned:
        return chunks
    agreed = torch.tensor([chunks], dtype=torch.int64, device=next(head.parameters()).device)
    torch.distributed.all_reduce(agreed, op=torch.distributed.ReduceOp.MAX)
    return int(agreed.item())


def _adds_virtual_tokens(model: torch.nn.Module) -> bool:
    config = getattr(model, "active_peft_config", None)
    return bool(getattr(config, "is_prompt_learning", False))
