"""Per-rank memory estimate with its parts. Pure arithmetic, documented assumptions.

Activations follow Korthikanti et al. (2022) without the attention score term
(SDPA/flash keep it linear): per token and layer a 16-bit run keeps about
11·h + 5·i values (q/k/v/o inputs, norms, the SwiGLU branches). Activation
checkpointing keeps one h-vector per layer plus one layer being recomputed.
The loss runs the LM head over `loss_chunk_tokens` tokens at a time (dist_ft.loss): the
peak is one chunk's logits in the training dtype, their fp32 copy and its gradient.
Prompt-learning methods (prefix/prompt/ptuning) go through transformers' own loss,
which holds those for every token of the micro-batch.
"""

from __future__ import annotations

from dataclasses import dataclass

from .config import MethodOptions
from .model_shape import ModelShape

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
    dp: int
    sp: int
    micro_batch: int
    seq_len: int
    checkpointing: bool
    eager_attention: bool
    on_gpu: bool
    loss_chunk_tokens: int | None = None  # None: full-vocabulary logits for every token


def trainable_params(shape: ModelShape, method: str, opts: MethodOptions) -> int:
    """How many parameters a method trains (estimates for adapters)."""
    total = shape.num_params
    layers, h = shape.num_layers, shape.hidden_size
    lora = layers * sum(opts.r * (i + o) for i, o in shape.linear_shapes())
    return {
        "full": total,
        "lora": lora, "qlora": lora, "dora": lora + layers * sum(o for _, o in shape.linear_shapes()),
        "longlora": lora + shape.vocab_size * h + (2 * layers + 1) * h,
        "prefix": opts.num_virtual_tokens * layers * 2 * h,
        "prompt": opts.num_virtual_tokens * h,
        "ptuning": opts.num_virtual_tokens * h + 3 * opts.encoder_hidden_size * h,
        "ia3": layers * (2 * shape.num_kv_heads * shape.head_dim + shape.intermediate_size),
        "bitfit": layers * sum(o for _, o in shape.linear_shapes()) if shape.attention_bias else 0,
        "freeze": total * min(opts.trainable_layers, layers) // max(layers, 1),
    }[method]


def estimate(m: MemoryInputs) -> MemoryEstimate:
    b = DTYPE_BYTES[m.dtype]
    grad_shards = m.dp if m.zero_stage >= 2 else 1
    weights = _weights(m, b)
    gradients = m.trainable_params * b / grad_shards
    master = 4 if m.dtype != "fp32" else 0  # fp32 master copy under mixed precision
    optimizer = 0.0 if m.offload_optimizer else m.trainable_params * (8 + master) / m.dp
    tokens = m.micro_batch * m.seq_len / m.sp
    activations = _activations(m, b, tokens)
    logit_rows = tokens if m.loss_chunk_tokens is None else min(tokens, m.loss_chunk_tokens)
    logits = logit_rows * m.shape.vocab_size * (b + 4 + 4)
    overhead = 1.5 * GIB if m.on_gpu else 0.5 * GIB
    return MemoryEstimate(*(x / GIB for x in (weights, gradients, optimizer, activations, logits, overhead)))


def _weights(m: MemoryInputs, b: int) -> float:
    per_param = 0.5 if m.quantized_4bit else b
    full = m.shape.num_params * per_param
    if m.zero_stage < 3:
        return full
    gathered_layers = 2 * full / max(m.shape.num_layers, 1)  # current and prefetched layer
    resident = 0.0 if m.offload_params else full / m.dp
    return resident + gathered_layers


def _activations(m: MemoryInputs, b: int, tokens: float) -> float:
    h, i, layers = m.shape.hidden_size, m.shape.intermediate_size, m.shape.num_layers
    per_layer = tokens * b * (11 * h + 5 * i)
    if m.eager_attention:  # eager materialises scores and probabilities per head
        per_layer += m.micro_batch * m.shape.num_heads / m.sp * m.seq_len**2 * b * 2
    if m.checkpointing:
        return layers * tokens * b * h + per_layer
    return layers * per_layer
