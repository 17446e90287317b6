"""Per-rank memory estimate with its parts. Pure arithmetic, documented assumptions.

Activations follow Korthikanti et al. (2022): per token and layer a 16-bit run keeps
about 11·h + 5·i values (q/k/v/o inputs, norms, the SwiGLU branches). Activation
checkpointing keeps one h-vector per layer plus one layer being recomputed; with
`offload_activations` those checkpoints wait in host memory (`host_gib`, not on the
device). A tiled MLP (DeepSpeed TiledMLP) keeps only its input; its intermediates
exist for one tile at a time.
Attention is linear in L with flash and sdpa_varlen. Quadratic terms: eager keeps
scores and probabilities per head; transformers' sdpa on packed rows builds an
L×L boolean mask once (1 B per element) and each layer converts it to an additive mask in the
training dtype that backward keeps (measured on CPU, fp32: 0.8 B/element shared
plus 4.0 B/element per layer kept).
The loss runs the LM head over `loss_chunk_tokens` tokens at a time (dist_ft.rank.loss): the
peak is one chunk's logits in the training dtype, their fp32 copy and its gradient; with more than
one chunk the fused path also holds a trainable head's gradient in fp32 from forward to backward
(full fine-tuning: vocab × hidden × 4 B; under ZeRO-3 too, where it goes back through one call of the head).
Prompt-learning methods (prefix/prompt/ptuning) go through transformers' own loss,
which holds those for every token of the micro-batch.
"""

from __future__ import annotations

from dataclasses import dataclass

from dist_ft.recipe.model_shape import ModelShape

from .method_options import trainable_params  # noqa: F401  (the plan's entry point for it)

GIB = 1024**3
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


@dataclass(frozen=True)
class MemoryEstimate:
    weights_gib: float
    gradients_gib: float
    optimizer_gib: float
    activations_gib: float
    logits_gib: float
    overhead_gib: float
    host_gib: float = 0.0  # activation checkpoints offloaded to host memory: not part of the total

    @property
    def total_gib(self) -> float:
        return (self.weights_gib + self.gradients_gib + self.optimizer_gib + self.activations_gib
                + self.logits_gib + self.overhead_gib)

    def as_dict(self) -> dict[str, float]:
        parts = {k: round(v, 3) for k, v in vars(self).items()}
        return {**parts, "total_gib": round(self.total_gib, 3)}


@dataclass(frozen=True)
class MemoryInputs:
    shape: ModelShape
    trainable_params: int
    dtype: str
    quantized_4bit: bool
    zero_stage: int
    offload_optimizer: bool
    offload_params: bool
    dp: int  # data-parallel ranks (distinct batches)
    sp: int  # sequence-parallel degree (ranks sharing one batch)
    micro_batch: int
    seq_len: int
    checkpointing: bool
    attention: str  # the attention implementation the stage runs (auto counts as linear)
    on_gpu: bool
    loss_chunk_tokens: int | None = None  # None: full-vocabulary logits for every token
    packed: bool = False  # rows hold several documents (sdpa then builds an L×L mask)
    offload_activations: bool = False
    mlp_tile_tokens: int | None = None
    head_gradient_buffer: bool = False  # the fused loss accumulates a trainable head's gradient in fp32


def zero_shards(m: MemoryInputs) -> int:
    """Ranks ZeRO partitions over: DeepSpeed's sequence-data-parallel group, i.e. every rank (dp x sp),
    not the data-parallel ranks alone (deepspeed/utils/groups.py, _get_sequence_data_parallel_group)."""
    return m.dp * m.sp


def estimate(m: MemoryInputs) -> MemoryEstimate:
    b = DTYPE_BYTES[m.dtype]
    grad_shards = zero_shards(m) if m.zero_stage >= 2 else 1
    weights = _weights(m, b)
    gradients = m.trainable_params * b / grad_shards
    master = 4 if m.dtype != "fp32" else 0  # fp32 master copy under mixed precision
    optimizer = 0.0 if m.offload_optimizer else m.trainable_params * (8 + master) / zero_shards(m)
    tokens = m.micro_batch * m.seq_len / m.sp
    activations = _activations(m, b, tokens)
    logit_rows = tokens if m.loss_chunk_tokens is None else min(tokens, m.loss_chunk_tokens)
    logits = logit_rows * m.shape.vocab_size * (b + 4 + 4)
    if m.head_gradient_buffer:
        logits += m.shape.vocab_size * m.shape.hidden_size * 4
    overhead = 1.5 * GIB if m.on_gpu else 0.5 * GIB
    host = _checkpoints(m, b, tokens) if m.offload_activations else 0.0
    return MemoryEstimate(*(x / GIB for x in (weights, gradients, optimizer, activations, logits, overhead, host)))


def _weights(m: MemoryInputs, b: int) -> float:
    per_param = 0.5 if m.quantized_4bit else b
    full = m.shape.num_params * per_param
    if m.zero_stage < 3:
        return full
    gathered_layers = 2 * full / max(m.shape.num_layers, 1)  # current and prefetched layer
    resident = 0.0 if m.offload_params else full / zero_shards(m)
    return resident + gathered_layers


def _activations(m: MemoryInputs, b: int, tokens: float) -> float:
    h, i, layers = m.shape.hidden_size, m.shape.intermediate_size, m.shape.num_layers
    mlp = tokens * b * 5 * i
    tiled = m.mlp_tile_tokens is not None
    per_layer = tokens * b * 11 * h + (0 if tiled else mlp) + _scores_per_layer(m, b)
    one_tile = mlp * min(1.0, m.mlp_tile_tokens / (m.seq_len / m.sp)) if tiled else 0.0
    shared = _shared_mask(m)
    if m.checkpointing:
        on_device = 0.0 if m.offload_activations else _checkpoints(m, b, tokens)
        return on_device + per_layer + one_tile + shared
    return layers * per_layer + one_tile + shared


def _checkpoints(m: MemoryInputs, b: int, tokens: float) -> float:
    return m.shape.num_layers * tokens * b * m.shape.hidden_size


def _scores_per_layer(m: MemoryInputs, b: int) -> float:
    square = m.micro_batch * m.seq_len**2
    if m.attention == "eager":  # scores and probabilities per head
        return square * m.shape.num_heads / m.sp * b * 2
    return square * b if _masked_sdpa(m) else 0.0  # the additive mask in the training dtype


def _shared_mask(m: MemoryInputs) -> float:
    return m.micro_batch * m.seq_len**2 if m.attention == "eager" or _masked_sdpa(m) else 0.0


def _masked_sdpa(m: MemoryInputs) -> bool:
    """transformers' sdpa keeping packed documents apart with an L×L mask (under SP it runs per document)."""
    return m.attention == "sdpa" and m.packed and m.sp == 1
