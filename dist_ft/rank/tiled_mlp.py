"""DeepSpeed's TiledMLP on every decoder layer's MLP.

A dense MLP treats each token on its own, so it can run over the sequence a tile at a time. DeepSpeed's
`TiledMLP` (ulysses_sp.py, from Arctic Long Sequence Training) does that in forward without keeping the
tiles' intermediates, and in backward recomputes one tile at a time: the MLP's intermediate
activations (gate, up, their product: several × intermediate_size per token, the largest term of a
layer) shrink to one tile's. Its gradient bookkeeping for ZeRO (`ds_grad_is_ready`, held back until
the last tile) wants the trainable weights involved, which we find at call time so that adapters
added later (LoRA on the MLP projections) are counted.

transformers has no hook to swap a module's computation, so each MLP *instance* gets its forward
replaced (the class stays untouched, the state-dict keys too). `tests/unit/test_tiled_mlp.py` fails
if the MLP's forward stops being a per-token function of one tensor.
"""

from __future__ import annotations

import math

import torch


def tile_mlps(model: torch.nn.Module, tile_tokens: int) -> int:
    """Make every decoder layer's `mlp` run in tiles of about `tile_tokens` tokens; returns how many."""
    mlps = decoder_mlps(model)
    if not mlps:
        raise ValueError(f"model.tiled_mlp_tokens: {type(model).__name__} has no decoder layer with an `mlp` "
                         "module to tile; unset tiled_mlp_tokens for this model")
    if any(isinstance(m, torch.nn.Dropout) and m.p > 0 for mlp in mlps for m in mlp.modules()):
        raise ValueError("model.tiled_mlp_tokens: the model's MLP applies dropout, whose masks TiledMLP's "
                         "recomputation in backward would draw anew (wrong gradients); set the model's dropout "
                         "to 0 (e.g. resid_pdrop for GPT-2) or unset tiled_mlp_tokens")
    for mlp in mlps:
        mlp.forward = _tiled_forward(mlp, tile_tokens)
    return len(mlps)


def decoder_mlps(model: torch.nn.Module) -> list[torch.nn.Module]:
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [layer.mlp for layer in model.modules()
            if isinstance(layer, GradientCheckpointingLayer) and isinstance(getattr(layer, "mlp", None),
                                                                            torch.nn.Module)]


def tile_count(shape: torch.Size, tile_tokens: int) -> int:
    """Tiles for a (..., tokens, hidden) input: about tokens / tile_tokens, and a number `torch.chunk`
    really splits into — both the tokens of a row (TiledMLP's forward) and all rows' tokens flattened
    (its backward) — since DeepSpeed releases the weights' gradients after tile number `tiles` and
    never would if chunk returned fewer pieces. Every rank sees rows of the same length, so all agree
    (ZeRO-3 needs that: each tile gathers the MLP's weights again, a collective)."""
    tokens = shape[-2]
    flat = math.prod(shape[:-1])
    tiles = max(1, math.ceil(tokens / tile_tokens))
    while tiles < tokens and (_pieces(tokens, tiles) != tiles or _pieces(flat, tiles) != tiles):
        tiles += 1
    return tiles


def _pieces(length: int, chunks: int) -> int:
    """How many pieces torch.chunk cuts `length` items into when asked for `chunks`."""
    return math.ceil(length / math.ceil(length / chunks))


def _tiled_forward(mlp: torch.nn.Module, tile_tokens: int):
    from . import engine as ds

    tiled = ds.tiled_mlp_function()
    computation = type(mlp).forward  # the class's own, called on one tile at a time

    def per_token(module: torch.nn.Module, tile: torch.Tensor) -> torch.Tensor:
        return computation(module, tile.contiguous())  # a tile of a multi-row batch is a strided view

    def forward(hidden_states: torch.Tensor) -> torch.Tensor:
        trainable = [p for p in mlp.parameters() if p.requires_grad]
        tiles = tile_count(hidden_states.shape, tile_tokens)
        return tiled.apply(per_token, mlp, hidden_states, tiles, trainable)

    return forward
