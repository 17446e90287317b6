"""A GPT-2-style model trained past its learned position table: 2 ranks, ZeRO-3, export, plain reload."""

from __future__ import annotations

import json

import pytest
import torch

from tests.integration.training_helpers import losses, render, tiny_recipe, train

pytestmark = pytest.mark.integration

OLD, NEW = 64, 128
GPT2 = {"model_type": "gpt2", "n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": OLD, "vocab_size": 259,
        "bos_token_id": 256, "eos_token_id": 257}


def test_zero3_grows_the_table_trains_at_the_new_length_and_exports_it(tmp_path):
    raw = tiny_recipe(zero=3, steps=4, every=None)
    raw["model"]["config"] = GPT2
    raw["long_context"]["stages"] = [{"name": "ctx", "seq_len": NEW, "steps": 4, "lr": 2e-3,
                                      "extend_positions": "copy"}]
    run = tmp_path / "gpt2"
    plan = render(raw, run)
    assert plan.stage("ctx").max_position_embeddings == NEW and plan.stage("ctx").rope_parameters == {}
    train(run, "ctx")
    assert len(losses(run, "ctx")) == 4
    from transformers import AutoModelForCausalLM

    export = run / "stages/ctx/export"
    assert json.loads((export / "config.json").read_text())["n_positions"] == NEW
    model = AutoModelForCausalLM.from_pretrained(export).eval()
    assert model.transformer.wpe.weight.shape == (NEW, GPT2["n_embd"])
    with torch.no_grad():
        logits = model(input_ids=torch.arange(NEW).unsqueeze(0) % 250, use_cache=False).logits
    assert logits.shape == (1, NEW, GPT2["vocab_size"]) and torch.isfinite(logits).all()
