"""Learned absolute position tables (GPT-2 style), grown past their pre-training length.

A table of n rows knows positions 0..n-1 and nothing beyond: a longer sequence indexes past its
end. Growing it before training (in `build_model`) also grows the config, so the exported
config.json declares the new length and plain transformers loads the model as it was trained.
"""

from __future__ import annotations

import torch
from torch import nn

from dist_ft.recipe.model_shape import POSITION_TABLES

EXTENSIONS = ("interpolate", "copy", "init")


def grown_rows(rows: torch.Tensor, length: int, how: str, seed: int = 0) -> torch.Tensor:
    """`rows` (position i in row i) grown to `length` rows; same dtype and device.

    interpolate: position interpolation. New row i is the old table read at i·(n−1)/(length−1),
        linearly between its two neighbours: every position keeps the neighbourhood it had, on a
        finer grid (the learned-table counterpart of linear RoPE scaling). The first and last rows
        stay where they were; the ones between are resampled.
    copy: the old rows stay; the new ones repeat the table (row i = old row i mod n), as Longformer
        grew RoBERTa's 512 positions to 4096.
    init: the old rows stay; the new ones are drawn per dimension from the old rows' mean and
        standard deviation (seeded), so they have the scale the network expects and no order yet.
    """
    n = rows.shape[0]
    if length < n:
        raise ValueError(f"cannot shrink a position table of {n} rows to {length}")
    if how == "interpolate":
        resampled = nn.functional.interpolate(rows.float().T.unsqueeze(0), size=length, mode="linear",
                                              align_corners=True)
        return resampled[0].T.to(rows.dtype)
    if how == "copy":
        return rows[torch.arange(length, device=rows.device) % n]
    if how == "init":
        return torch.cat([rows, _drawn_like(rows, length - n, seed)])
    raise ValueError(f"unknown position-table extension {how!r}; use one of {', '.join(EXTENSIONS)}")


def _drawn_like(rows: torch.Tensor, count: int, seed: int) -> torch.Tensor:
    stats = rows.float()
    noise = torch.randn(count, rows.shape[1], generator=torch.Generator().manual_seed(seed))
    return (stats.mean(0) + noise.to(rows.device) * stats.std(0)).to(rows.dtype)


def position_table(model: nn.Module) -> tuple[nn.Embedding, int]:
    """(the learned position embedding, rows stored before position 0) of a causal LM."""
    model_type = model.config.model_type
    if model_type not in POSITION_TABLES:
        raise ValueError(f"{model_type} has no learned position table dist-ft can grow "
                         f"(supported: {', '.join(POSITION_TABLES)})")
    path, offset = POSITION_TABLES[model_type]
    return model.base_model.get_submodule(path), offset


def extend_position_table(model: nn.Module, length: int, how: str, seed: int = 0) -> None:
    """Grow the model's position table to `length` positions, in place, and record it in the config.

    Under ZeRO-3 the old table is gathered; the new parameter is a plain one, which
    `deepspeed.initialize` partitions like any parameter created outside `zero.Init`.
    """
    table, offset = position_table(model)
    old = _whole(table.weight)
    with torch.no_grad():
        grown = torch.cat([old[:offset], grown_rows(old[offset:], length, how, seed)])
    table.weight = nn.Parameter(grown, requires_grad=table.weight.requires_grad)
    table.num_embeddings = grown.shape[0]
    model.config.max_position_embeddings = length


def _whole(weight: nn.Parameter) -> torch.Tensor:
    if not hasattr(weight, "ds_id"):
        return weight.detach().clone()
    from . import engine as ds  # only a ZeRO-3 partitioned table gets here, so only then is DeepSpeed imported

    with ds.gathered([weight], enabled=True):
        return weight.detach().clone()
