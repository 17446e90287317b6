"""Tiled MLPs (DeepSpeed's TiledMLP on each decoder layer) compute what the model computes.

This is also the canary for the instance-level forward swap in dist_ft/rank/tiled_mlp.py: if a
transformers release changes what a decoder MLP's forward takes or returns, these fail.
"""

from __future__ import annotations

import math

import pytest
import torch

from dist_ft.rank.loss import LanguageModelLoss
from dist_ft.rank.methods import apply_method
from dist_ft.rank.tiled_mlp import decoder_mlps, tile_count, tile_mlps
from test_loss import loss_and_grads, packed_batch, tiny

GPT2 = {"model_type": "gpt2", "n_embd": 32, "n_layer": 2, "n_head": 4, "vocab_size": 259, "n_positions": 64,
        "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}


def assert_same_training_signal(make_model, tile_tokens: int, checkpointing: bool = False, method: str = "full"):
    results = []
    for tiled in (False, True):
        torch.manual_seed(0)
        model = make_model()
        if checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        if tiled:
            assert tile_mlps(model, tile_tokens) == model.config.num_hidden_layers
        if method != "full":
            model = apply_method(model, method, {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": "all-linear"})
        wrapped = LanguageModelLoss(model, chunk_tokens=16)
        results.append(loss_and_grads(model, lambda: wrapped(**packed_batch())))
    (expected, expected_grads), (loss, grads) = results
    torch.testing.assert_close(loss, expected, rtol=0, atol=1e-6)
    assert grads.keys() == expected_grads.keys() and grads
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected_grads[name], rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("tile_tokens", [1, 7, 40])
def test_llama_tiled_equals_untiled(tile_tokens):
    assert_same_training_signal(tiny, tile_tokens)


def test_tiled_under_checkpointing_and_lora():
    """LoRA wraps the MLP's projections after tiling: the adapter weights are found at call time."""
    assert_same_training_signal(tiny, 7, checkpointing=True, method="lora")


def test_gpt2_mlp_tiles_too():
    from dist_ft.rank.model import build_model

    assert_same_training_signal(lambda: build_model(name_or_path=None, config_overrides=GPT2,
                                                    attn_implementation="sdpa"), 9)


def test_state_dict_keys_unchanged():
    model = tiny()
    keys = list(model.state_dict())
    tile_mlps(model, 8)
    assert list(model.state_dict()) == keys
    assert len(decoder_mlps(model)) == 2


def test_mlp_dropout_is_refused():
    """TiledMLP recomputes each tile in backward without replaying the dropout masks."""
    from dist_ft.rank.model import build_model

    model = build_model(name_or_path=None, config_overrides={**GPT2, "resid_pdrop": 0.1}, attn_implementation="sdpa")
    with pytest.raises(ValueError, match="dropout"):
        tile_mlps(model, 8)


def test_model_without_mlp_module_is_refused():
    from dist_ft.rank.model import build_model

    opt = build_model(name_or_path=None, attn_implementation="sdpa", config_overrides={
        "model_type": "opt", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "ffn_dim": 64,
        "vocab_size": 259, "max_position_embeddings": 64, "word_embed_proj_dim": 32})
    with pytest.raises(ValueError, match="tiled_mlp_tokens"):
        tile_mlps(opt, 8)


@pytest.mark.parametrize("rows,tokens,tile", [(1, 1000, 300), (2, 7, 3), (3, 97, 10), (1, 16384, 2048)])
def test_tile_count_is_what_chunk_splits_into(rows, tokens, tile):
    tiles = tile_count(torch.Size([rows, tokens, 4]), tile)
    assert tiles >= math.ceil(tokens / tile)
    assert len(torch.chunk(torch.zeros(rows, tokens), tiles, dim=-1)) == tiles
    assert len(torch.chunk(torch.zeros(rows * tokens), tiles)) == tiles
