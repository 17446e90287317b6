"""Adapter methods in long-context stages (issue 28): a LongLoRA (LoRA+) stage with S²-Attn on 2 CPU ranks under
ZeRO-3 and ZeRO-2, resumed on another world size, exported merged with its RoPE and reloaded without DeepSpeed
(with full attention)."""

from __future__ import annotations

import json

import pytest
import torch

from dist_ft.plan.method_options import trainable_params
from tests.helpers import llama_kwargs
from tests.integration.training_helpers import (
    TINY_CONFIG, kill_when, latest_step, losses, render, start, tiny_recipe, train)

pytestmark = pytest.mark.integration


def _recipe(base, zero: int) -> dict:
    raw = tiny_recipe(zero=zero, steps=4, every=2)
    raw["model"] = {"name_or_path": str(base), "tokenizer": "byte", "dtype": "fp32"}
    raw["long_context"]["stages"][0].update(method="longlora", options={"r": 4, "alpha": 8, "dropout": 0.0})
    raw["long_context"].update(attention="shifted_sparse", shifted_sparse_group=64)  # S²-Attn while training
    return raw


def test_longlora_stage_trains_resumes_on_another_world_size_and_exports_merged_with_its_rope(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    base = tmp_path / "base"
    LlamaForCausalLM(LlamaConfig(**llama_kwargs(TINY_CONFIG))).save_pretrained(base)
    whole, moved = tmp_path / "zero3", tmp_path / "zero2"
    plan = render(_recipe(base, zero=3), whole)
    train(whole, "ctx")
    info = json.loads((whole / "stages/ctx/ranks/rank0.json").read_text())
    counted = trainable_params(plan.model_shape, "longlora", plan.stage("ctx").method_options)
    assert info["trainable_elements"] == counted and info["param_elements_held"] < info["param_elements_total"] / 2 + 4096

    render(_recipe(base, zero=2), moved)  # ZeRO-2, killed after its first checkpoint, resumed on one rank
    kill_when(start(moved, "ctx"), lambda: latest_step(moved, "ctx") >= 2)
    result = train(moved, "ctx", nproc=1)
    assert "universal" in result.stdout and "resumed from" in result.stdout
    assert len(losses(whole, "ctx")) == 4 and losses(moved, "ctx") == pytest.approx(losses(whole, "ctx"), abs=1e-4)

    merged = AutoModelForCausalLM.from_pretrained(whole / "stages/ctx/export")
    rope = merged.config.rope_parameters
    assert rope["rope_type"] == "yarn" and rope["factor"] == 2.0 and merged.config.max_position_embeddings == 256
    assert merged.config._attn_implementation == "sdpa"  # S²-Attn was training-only
    assert not (whole / "stages/ctx/export/adapter_config.json").exists()
    rebuilt = AutoModelForCausalLM.from_pretrained(base, rope_parameters=rope, max_position_embeddings=256)
    adapter = PeftModel.from_pretrained(rebuilt, whole / "stages/ctx/adapter").merge_and_unload()
    ids = torch.randint(0, 259, (1, 256))
    with torch.no_grad():
        assert torch.allclose(adapter(ids).logits, merged(ids).logits, atol=1e-5)
        assert not torch.allclose(AutoModelForCausalLM.from_pretrained(base)(ids).logits, merged(ids).logits)
    trained = {name for name, p in merged.named_parameters()
               if not torch.equal(p, dict(LlamaForCausalLM.from_pretrained(base).named_parameters())[name])}
    assert "model.embed_tokens.weight" in trained and "model.norm.weight" in trained  # LoRA+: both train


def test_carried_adapter_continues_over_the_first_base_and_the_export_is_still_merged(tmp_path):
    """ZeRO-3, 2 ranks: the second stage (lr 0) starts from the first stage's adapter, over the first base."""
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    base = tmp_path / "base"
    LlamaForCausalLM(LlamaConfig(**llama_kwargs(TINY_CONFIG))).save_pretrained(base)
    raw = _recipe(base, zero=3)
    lora = {"method": "longlora", "options": {"r": 4, "alpha": 8, "dropout": 0.0}}
    raw["long_context"] = {**raw["long_context"], "adapter": "carry", "stages": [
        {"name": "a", "seq_len": 128, "steps": 2, "lr": 2e-3, "rope": {"type": "none"}, **lora},
        {"name": "b", "seq_len": 256, "steps": 1, "lr": 0.0, "rope": {"type": "yarn"}, **lora}]}
    run = tmp_path / "carry"
    plan = render(raw, run)
    assert [s.carry_adapter for s in plan.stages] == [False, True]
    train(run, "a")
    train(run, "b")
    first, second = (load_file(run / f"stages/{s}/adapter/adapter_model.safetensors") for s in "ab")
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    config = json.loads((run / "stages/b/adapter/adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(base)
    merged = AutoModelForCausalLM.from_pretrained(run / "stages/b/export")
    rope = merged.config.rope_parameters
    rebuilt = AutoModelForCausalLM.from_pretrained(base, rope_parameters=rope, max_position_embeddings=256)
    adapter = PeftModel.from_pretrained(rebuilt, run / "stages/b/adapter").merge_and_unload()
    ids = torch.randint(0, 259, (1, 256))
    with torch.no_grad():
        assert rope["rope_type"] == "yarn" and torch.allclose(adapter(ids).logits, merged(ids).logits, atol=1e-5)
