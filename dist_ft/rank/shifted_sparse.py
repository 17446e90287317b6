"""S²-Attn (shifted sparse attention, LongLoRA): a training-time attention for long-context stages.

Each packed document is cut into groups of `group` tokens (by its own positions, which restart at 0 per
document); half of the heads attend causally within those groups, the other half within groups shifted by
half a group, so information flows between neighbouring groups across layers. No token ever attends across
documents. The shifted half's first group is the half group [0, group/2): LongLoRA's reference rolls the
sequence instead, which puts a document's first tokens in one group with its last ones (they would see the
future); here no group wraps around.

Registered through transformers' public `AttentionInterface` under `shifted_sparse_<group>` (no mask
function: transformers builds no mask). Only training uses it: exports and evaluation load the model with
its ordinary attention (transformers does not write the attention implementation to config.json).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

SHIFTED_SPARSE = "shifted_sparse"


def register(group: int) -> str:
    """Register S²-Attn with `group` tokens per group; returns the attention name to set on the model."""
    from transformers import AttentionInterface

    name = f"{SHIFTED_SPARSE}_{group}"
    AttentionInterface.register(name, functools.partial(shifted_sparse_attention, group=group))
    return name


def group_bounds(position_ids: torch.Tensor, group: int, shift: int) -> list[tuple[int, int]]:
    """(start, end) of each run of one row whose tokens share a document (consecutive positions) and a group
    (position + shift) // group."""
    positions = position_ids.tolist()
    starts = [0] + [i for i in range(1, len(positions)) if positions[i] != positions[i - 1] + 1
                    or (positions[i] + shift) // group != (positions[i - 1] + shift) // group]
    return list(zip(starts, starts[1:] + [len(positions)]))


def shifted_sparse_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                             position_ids: torch.Tensor | None = None, *, group: int,
                             **_: object) -> tuple[torch.Tensor, None]:
    """query (B, H, L, D), key/value (B, H_kv, L, D) → output (B, L, H, D), as transformers expects."""
    heads, length = query.shape[1], query.shape[2]
    if attention_mask is not None or key.shape[2] != length:
        raise ValueError("shifted_sparse takes no attention mask and no cached keys: it is for training on "
                         "packed rows (documents delimited by position_ids)")
    if heads % 2:
        raise ValueError(f"shifted_sparse shifts half of the heads: {heads} heads do not halve")
    if key.shape[1] % 2:  # an odd number of KV heads cannot be split between the halves: expand them
        key, value = (t.repeat_interleave(heads // t.shape[1], dim=1) for t in (key, value))
    if position_ids is None:
        position_ids = torch.arange(length, device=query.device)[None]
    position_ids = position_ids.expand(query.shape[0], length)
    q_half, kv_half = heads // 2, key.shape[1] // 2
    halves = ((slice(0, q_half), slice(0, kv_half), 0), (slice(q_half, heads), slice(kv_half, None), group // 2))
    rows = []
    for row in range(query.shape[0]):
        outs = []
        for q_heads, kv_heads, shift in halves:
            q, k, v = query[row:row + 1, q_heads], key[row:row + 1, kv_heads], value[row:row + 1, kv_heads]
            outs.append(torch.cat([F.scaled_dot_product_attention(
                q[:, :, s:e], k[:, :, s:e], v[:, :, s:e], is_causal=True, dropout_p=dropout, scale=scaling,
                enable_gqa=k.shape[1] != q.shape[1]) for s, e in group_bounds(position_ids[row], group, shift)],
                dim=2))
        rows.append(torch.cat(outs, dim=1))
    return torch.cat(rows, dim=0).transpose(1, 2).contiguous(), None
