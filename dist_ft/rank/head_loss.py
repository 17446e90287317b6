"""The LM head and cross-entropy over chunks of rows: the kernels `loss.causal_lm_loss_sum` picks from.

`chunked_head_loss_sum` recomputes each chunk's logits in backward (activation checkpointing);
`fused_head_loss_sum` takes each chunk's gradients in forward while its logits exist (the fused linear
cross-entropy idea); `gathered_fused_head_loss_sum` does the same for a head ZeRO-3 partitions, inside
`loss.PartitionedHeadLoss`; `liger_head_loss_sum` hands the work to Liger's kernel (CUDA). Every one
returns (summed loss over the scored targets, their number). Split from loss.py, whose docstring tells
the whole story.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .labels import IGNORE_INDEX


def chunked_head_loss_sum(hidden: torch.Tensor, targets: torch.Tensor, logits_fn, chunk_tokens: int,
                          chunks: int | None = None) -> tuple[torch.Tensor, int]:
    """(summed cross-entropy over the scored targets, their number), chunk by chunk; `hidden` is
    (tokens, hidden size) and `targets` (tokens,), already shifted. `chunks` beyond what the scored
    tokens fill run on no rows (the same collectives as a rank with more to score)."""
    hidden, targets, chunks = _scored_rows(hidden, targets, chunk_tokens, chunks)
    if chunks == 1:  # the whole logits are one chunk's: keep them for backward rather than recompute
        return _chunk_loss_sum(logits_fn, hidden, targets), targets.numel()
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, chunks * chunk_tokens, chunk_tokens):
        end = start + chunk_tokens
        total = total + checkpoint(_chunk_loss_sum, logits_fn, hidden[start:end], targets[start:end],
                                   use_reentrant=False)
    return total, targets.numel()


def fused_head_loss_sum(hidden: torch.Tensor, targets: torch.Tensor, logits_fn, head_params: list[torch.nn.Parameter],
                        chunk_tokens: int, chunks: int | None = None) -> tuple[torch.Tensor, int]:
    """`chunked_head_loss_sum` without the recompute: each chunk's gradients (of the hidden rows and of
    the head's trainable parameters) are taken while its logits exist, then the logits are dropped.
    The head runs once per chunk instead of twice; its parameters must be whole tensors (not ZeRO-3's
    partitions) and are handed to autograd as inputs, so their gradients reach DeepSpeed as usual."""
    if not torch.is_grad_enabled():  # evaluation: nothing to differentiate
        return chunked_head_loss_sum(hidden, targets, logits_fn, chunk_tokens, chunks)
    hidden, targets, chunks = _scored_rows(hidden, targets, chunk_tokens, chunks)
    total = _FusedHeadLoss.apply(hidden, targets, logits_fn, chunk_tokens, chunks, *head_params)
    return total, targets.numel()


def _fused_chunks(hidden, targets, logits_fn, chunk_tokens: int, chunks: int, trainable: list[torch.Tensor]):
    """(summed loss, its gradient of `hidden` or None, fp32 gradients of `trainable`), chunk by chunk,
    each chunk's logits dropped as soon as its gradients are taken."""
    d_hidden = torch.zeros_like(hidden) if hidden.requires_grad else None
    d_params: list[torch.Tensor | None] = [None] * len(trainable)  # the first chunk's gradient, then the sum
    total = hidden.new_zeros((), dtype=torch.float32)
    # The chunk's graph lives only inside this loop: keep its saved tensors where they are even
    # under activation offload (whose hooks would copy every chunk's logits to the host and back).
    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(_kept, _kept):
        for start in range(0, chunks * chunk_tokens, chunk_tokens):
            rows = hidden[start:start + chunk_tokens].detach().requires_grad_(d_hidden is not None)
            loss = _chunk_loss_sum(logits_fn, rows, targets[start:start + chunk_tokens])
            wrt = ([rows] if d_hidden is not None else []) + trainable
            grads = torch.autograd.grad(loss, wrt, allow_unused=True) if wrt and loss.requires_grad else []
            if d_hidden is not None and grads and grads[0] is not None:
                d_hidden[start:start + chunk_tokens] = grads[0]
            for i, grad in enumerate(grads[1 if d_hidden is not None else 0:]):
                if grad is not None:
                    d_params[i] = grad.float() if d_params[i] is None else d_params[i].add_(grad)
            total = total + loss.detach()
    return total, d_hidden, [torch.zeros_like(p, dtype=torch.float32) if d is None else d
                             for p, d in zip(trainable, d_params)]


class _FusedHeadLoss(torch.autograd.Function):
    """Forward computes the summed loss and, chunk by chunk, its gradients; backward only scales them."""

    @staticmethod
    def forward(ctx, hidden, targets, logits_fn, chunk_tokens, chunks, *params):
        trainable = [p for p in params if p.requires_grad]
        total, d_hidden, d_params = _fused_chunks(hidden, targets, logits_fn, chunk_tokens, chunks, trainable)
        ctx.trainable = [p.requires_grad for p in params]
        # d_hidden is an activation (activation offload may move it to the host); the weights' gradients
        # stay where gradients live: kept on ctx, not through the saved-tensor hooks.
        ctx.save_for_backward(*([d_hidden] if d_hidden is not None else []))
        ctx.d_params, ctx.param_dtypes = d_params, [p.dtype for p in trainable]
        ctx.has_hidden, ctx.hidden_dtype = d_hidden is not None, hidden.dtype
        return total

    @staticmethod
    def backward(ctx, grad_total):
        d_hidden = _scaled(ctx.saved_tensors[0], grad_total, ctx.hidden_dtype) if ctx.has_hidden else None
        scaled = iter([_scaled(g, grad_total, dtype) for g, dtype in zip(ctx.d_params, ctx.param_dtypes)])
        ctx.d_params = None
        return (d_hidden, None, None, None, None, *(next(scaled) if trains else None for trains in ctx.trainable))


def carried_linears(head: torch.nn.Module) -> list[torch.nn.Linear] | None:
    """The bias-free Linears whose weights are the head's trainable parameters (the head itself, or a LoRA
    adapter's A and B; none for a frozen head), or None when some trainable parameter is not such a
    weight (a bias, DoRA's magnitude): its gradient could not be carried (`gathered_fused_head_loss_sum`)."""
    linears = []
    for module in head.modules():
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad:
                continue
            if type(module) is not torch.nn.Linear or name != "weight" or module.bias is not None:
                return None
            linears.append(module)
    return linears


def gathered_fused_head_loss_sum(hidden: torch.Tensor, targets: torch.Tensor, model: torch.nn.Module,
                                 chunk_tokens: int, chunks: int, carriers: list[torch.nn.Linear]) -> torch.Tensor:
    """`fused_head_loss_sum` for a head that ZeRO-3 partitions, whose trainable weights are `carriers`
    (`carried_linears`); runs inside `PartitionedHeadLoss`, where the head's weights are whole (every rank
    runs the same `chunks`, agreed beforehand, so the gathers match). Returns the summed loss.

    A weight's gradient cannot be handed to a partitioned parameter directly, so it goes back through one
    ordinary call of its Linear on the identity (in_features rows): for y = x·Wᵀ, backward gives
    dW = dyᵀ·x, so dy = dWᵀ makes DeepSpeed's own backward of that call deliver exactly the fused gradient
    to the partitioned weight, reduced and partitioned as any other. A carrier costs one pass of its Linear
    over in_features rows, against a recompute of every chunk."""
    hidden, targets, chunks = _scored_rows(hidden, targets, chunk_tokens, chunks)
    # The weights are gathered already: these calls add no all-gather.
    identities = [linear(torch.eye(linear.in_features, dtype=linear.weight.dtype, device=hidden.device))
                  for linear in carriers]
    return _GatheredHeadLoss.apply(hidden, targets, model, carriers, chunk_tokens, chunks, *identities)


class _GatheredHeadLoss(torch.autograd.Function):
    """`_FusedHeadLoss` over the gathered head; backward sends each weight's gradient through its carrier."""

    @staticmethod
    def forward(ctx, hidden, targets, model, carriers, chunk_tokens, chunks, *identities):
        if any(p.numel() != getattr(p, "ds_numel", p.numel()) for p in model.get_output_embeddings().parameters()):
            raise RuntimeError("the LM head's weights are not gathered: run this inside PartitionedHeadLoss")
        total, d_hidden, d_weights = _fused_chunks(hidden, targets, head_logits(model), chunk_tokens, chunks,
                                                   [linear.weight for linear in carriers])
        ctx.save_for_backward(*([d_hidden] if d_hidden is not None else []))
        ctx.has_hidden, ctx.hidden_dtype = d_hidden is not None, hidden.dtype
        ctx.d_carriers = [d.t() for d in d_weights]
        ctx.carrier_dtypes = [identity.dtype for identity in identities]
        return total

    @staticmethod
    def backward(ctx, grad_total):
        d_hidden = _scaled(ctx.saved_tensors[0], grad_total, ctx.hidden_dtype) if ctx.has_hidden else None
        d_carriers = [_scaled(d, grad_total, dtype) for d, dtype in zip(ctx.d_carriers, ctx.carrier_dtypes)]
        ctx.d_carriers = None
        return d_hidden, None, None, None, None, None, *d_carriers


def _scaled(gradient: torch.Tensor, grad_total: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A gradient taken in forward (of the summed loss), times the loss's incoming gradient, in `dtype`."""
    return (gradient * grad_total).to(dtype)


def _kept(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


def head_partitioned(head: torch.nn.Module) -> bool:
    """Whether ZeRO-3 partitions the head's parameters (DeepSpeed marks them with `ds_id`)."""
    return any(hasattr(p, "ds_id") for p in head.parameters())


def _scored_rows(hidden: torch.Tensor, targets: torch.Tensor, chunk_tokens: int,
                 chunks: int | None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The rows that are scored (unscored rows never reach the head), and the chunk count for them."""
    scored = (targets != IGNORE_INDEX).nonzero().squeeze(-1)
    hidden, targets = hidden.index_select(0, scored), targets.index_select(0, scored)
    return hidden, targets, max(1, -(-scored.numel() // chunk_tokens)) if chunks is None else chunks


def _chunk_loss_sum(logits_fn, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = logits_fn(hidden).float()
    return F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum")


def liger_head_loss_sum(hidden: torch.Tensor, targets: torch.Tensor,
                        model: torch.nn.Module) -> tuple[torch.Tensor, int]:
    """(summed cross-entropy, scored tokens) through Liger's fused linear cross-entropy (CUDA only),
    for a head `choose_head_kernel` accepted; shapes as in `chunked_head_loss_sum`."""
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    head = model.get_output_embeddings()
    softcap = getattr(_causal_lm(model).config, "final_logit_softcapping", None)
    fused = LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE_INDEX, reduction="sum", softcap=softcap)
    total = fused(head.weight, hidden, targets, head.bias)
    return total.float(), int((targets != IGNORE_INDEX).sum())


def choose_head_kernel(requested: str, model: torch.nn.Module, on_cuda: bool) -> str:
    """The recipe's `model.loss_kernel` for this model, decided once when the model is built: auto takes
    Liger where it is installed and applies; an explicit liger the head cannot take is an error here."""
    problem = fused_head_problem(model) if requested != "chunked" else None
    if requested == "liger" and problem:
        raise ValueError(f"model.loss_kernel liger: {problem}; use loss_kernel: chunked")
    if requested != "auto":
        return requested
    import importlib.util

    usable = on_cuda and importlib.util.find_spec("liger_kernel") is not None and problem is None
    return "liger" if usable else "chunked"


def fused_head_problem(model: torch.nn.Module) -> str | None:
    """Why Liger's fused head cannot stand in for this model's LM head, or None. (The kernel reads the
    head's weight directly: a plain, unpartitioned Linear is needed.)"""
    head = model.get_output_embeddings()
    if type(head) is not torch.nn.Linear:
        return f"the LM head is a {type(head).__name__}, not a plain Linear (an adapter on it?)"
    if isinstance(getattr(_causal_lm(model), "logit_scale", None), (int, float)):
        return "the model scales its logits (Cohere), which the fused kernel does not"
    if hasattr(head.weight, "ds_id"):
        return "ZeRO-3 partitions the LM head's weight, which the fused kernel reads directly"
    return None


def head_logits(model: torch.nn.Module):
    """The LM head as the model's own forward applies it (tied weights are the same module)."""
    head = model.get_output_embeddings()
    inner = _causal_lm(model)
    scale = getattr(inner, "logit_scale", None)  # Cohere multiplies the logits by a constant
    softcap = getattr(inner.config, "final_logit_softcapping", None)  # Gemma 2

    def logits(hidden: torch.Tensor) -> torch.Tensor:
        out = head(hidden)
        if isinstance(scale, (int, float)):
            out = out * scale
        if softcap:
            out = torch.tanh(out / softcap) * softcap
        return out

    return logits


def _causal_lm(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model under peft's wrappers (PeftModel → LoraModel → CausalLM)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model
