"""Which parameters decay (dist_ft/rank/optimizer.py): weight matrices do; biases, norm weights and other
vectors never do; frozen parameters are in no group."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from dist_ft.rank.optimizer import parameter_groups
from tests.helpers import llama_kwargs, tiny_llama

TINY = llama_kwargs(tiny_llama(max_position_embeddings=None, rope_theta=None, attention_bias=True, mlp_bias=True))


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**TINY))


def names_by_group(model: torch.nn.Module, groups: list[dict]) -> list[tuple[float | None, set[str]]]:
    name_of = {id(p): n for n, p in model.named_parameters()}
    return [(g.get("weight_decay"), {name_of[id(p)] for p in g["params"]}) for g in groups]


def test_biases_and_norm_weights_never_decay_weight_matrices_do():
    model = tiny_llama()
    (decay, decayed), (no_decay, kept) = names_by_group(model, parameter_groups(model, 0.1))
    assert (decay, no_decay) == (0.1, 0.0)
    assert kept and all(n.endswith(("bias", "norm.weight", "layernorm.weight")) for n in kept), kept
    assert {"model.norm.weight", "model.layers.0.input_layernorm.weight", "model.layers.1.self_attn.q_proj.bias",
            "model.layers.0.mlp.down_proj.bias"} <= kept
    assert {"model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight",
            "model.layers.1.mlp.gate_proj.weight", "lm_head.weight"} <= decayed
    assert decayed.isdisjoint(kept) and decayed | kept == {n for n, _ in model.named_parameters()}


def test_without_decay_one_group_in_the_models_order():
    model = tiny_llama()
    (group,) = parameter_groups(model, 0.0)
    assert group.keys() == {"params"}  # the optimizer's own weight_decay (0) applies, as before groups existed
    assert [id(p) for p in group["params"]] == [id(p) for p in model.parameters()]


def test_frozen_parameters_are_left_out_and_empty_groups_dropped():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    groups = names_by_group(model, parameter_groups(model, 0.1))
    assert len(groups) == 1 and groups[0][0] == 0.1  # LoRA trains only matrices: no empty no-decay group
    assert groups[0][1] and all("lora_" in n for n in groups[0][1])


def test_a_zero3_partition_is_judged_by_its_full_shape():
    model = torch.nn.Linear(4, 4)
    model.weight.data = torch.empty(0)  # what ZeRO-3 leaves on a rank; the shape lives in ds_shape
    model.weight.ds_shape = torch.Size([4, 4])
    model.bias.data = torch.empty(0)
    model.bias.ds_shape = torch.Size([4])
    (_, decayed), (_, kept) = names_by_group(model, parameter_groups(model, 0.1))
    assert (decayed, kept) == ({"weight"}, {"bias"})
