"""`sdpa_varlen`: packed documents attend only to themselves, in memory linear in the row length.

transformers' `sdpa` isolates packed documents by building a (L × L) block-diagonal mask from the
restarting position_ids; SDPA then runs with an explicit mask, and memory grows with L² (measured on
CPU: +2.5 GiB for one 16k row of a tiny model). flash_attention_2 avoids that with its varlen kernel,
but needs CUDA and flash-attn. This attention does what the varlen kernel does, with stock SDPA:
one causal SDPA call per document segment, no mask at all.

It is registered through transformers' public `AttentionInterface`; a name without a mask function
in `AttentionMaskInterface` makes transformers skip building a mask (it would be unused).
Segments are where `position_ids` restart (or jump), the convention our packer writes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

SDPA_VARLEN = "sdpa_varlen"


def register() -> None:
    """Make `attn_implementation="sdpa_varlen"` known to transformers (idempotent)."""
    from transformers import AttentionInterface

    AttentionInterface.register(SDPA_VARLEN, sdpa_varlen_attention)


def segment_bounds(position_ids: torch.Tensor) -> list[tuple[int, int]]:
    """(start, end) of each run of consecutive positions in one row of position_ids."""
    positions = position_ids.tolist()
    starts = [0] + [i for i in range(1, len(positions)) if positions[i] != positions[i - 1] + 1]
    return list(zip(starts, starts[1:] + [len(positions)]))


def sdpa_varlen_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                          position_ids: torch.Tensor | None = None, **_: object) -> tuple[torch.Tensor, None]:
    """query (B, H, L, D), key/value (B, H_kv, L, D) → output (B, L, H, D), as transformers expects."""
    if attention_mask is not None:
        raise ValueError("sdpa_varlen takes no attention mask: documents are delimited by position_ids "
                         "(right-padded rows need none)")
    length = query.shape[2]
    if key.shape[2] != length:
        raise ValueError(f"sdpa_varlen needs as many keys as queries ({key.shape[2]} keys, {length} queries): "
                         "cached or prefix keys need attn_implementation sdpa")
    if position_ids is None:
        position_ids = torch.arange(length, device=query.device)[None]
    position_ids = position_ids.expand(query.shape[0], length)  # transformers' own are one row for the batch
    rows = []
    for row in range(query.shape[0]):
        pieces = [F.scaled_dot_product_attention(
            query[row:row + 1, :, start:end], key[row:row + 1, :, start:end], value[row:row + 1, :, start:end],
            is_causal=True, dropout_p=dropout, scale=scaling,
            enable_gqa=key.shape[1] != query.shape[1])
            for start, end in segment_bounds(position_ids[row])]
        rows.append(torch.cat(pieces, dim=2))
    return torch.cat(rows, dim=0).transpose(1, 2).contiguous(), None
