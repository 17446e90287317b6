"""The plan's trainable-parameter count equals what the methods really train, method by method, on
several tiny shapes (GQA, tied embeddings, attention and MLP biases, Qwen2's q/k/v biases, Qwen3's
head norms); and the module tree the plan reasons about is the one transformers builds."""

from __future__ import annotations

import pytest
import torch

from dist_ft.plan.method_options import IA3_DEFAULTS, trainable_params
from dist_ft.rank.methods import apply_method, trainable_summary
from dist_ft.rank.model import build_model
from dist_ft.recipe.config import MethodOptions
from dist_ft.recipe.model_shape import CONFIG_DEFAULTS, LAYOUT_TYPES, layout, shape_from_config

BASE = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 128,
        "vocab_size": 259, "max_position_embeddings": 256}
SHAPES = {
    # the tiny Llama of test_methods: GQA, q/k/v/o biases, untied (Llama's default)
    "llama-gqa-bias": {**BASE, "model_type": "llama", "num_key_value_heads": 2, "attention_bias": True},
    "llama-tied-mlp-bias": {**BASE, "model_type": "llama", "tie_word_embeddings": True, "mlp_bias": True},
    "qwen2-gqa": {**BASE, "model_type": "qwen2", "num_key_value_heads": 1},  # q/k/v biases always
    "qwen3-head-dim": {**BASE, "model_type": "qwen3", "num_key_value_heads": 2, "head_dim": 8,
                       "tie_word_embeddings": True},
    "mistral": {**BASE, "model_type": "mistral", "num_key_value_heads": 2},
}
COMMON = {"r": 4, "alpha": 8, "dropout": 0.0, "num_virtual_tokens": 4, "encoder_hidden_size": 32}
CASES = [
    ("full", {}), ("bitfit", {}),
    ("freeze", {"trainable_layers": 1}),
    ("freeze", {"trainable_layers": 0, "trainable_patterns": [r"lm_head", r"\.norm\.", r"embed"]}),
    ("lora", {}), ("lora", {"target_modules": ["q_proj", "v_proj"]}), ("lora", {"target_modules": r".*\.mlp\..*_proj"}),
    ("lora", {"bias": "all"}), ("lora", {"bias": "lora_only", "target_modules": ["q_proj", "o_proj"]}),
    ("lora", {"layers_to_transform": [1]}), ("lora", {"use_rslora": True}),
    ("lora", {"modules_to_save": ["lm_head"]}), ("lora", {"modules_to_save": ["embed_tokens", "norm"]}),
    ("lora", {"modules_to_save": ["q_proj"]}), ("lora", {"modules_to_save": ["mlp"], "bias": "lora_only"}),
    ("lora", {"modules_to_save": ["o_proj", "mlp"], "bias": "all"}),
    ("lora", {"target_modules": ["k_proj"], "layers_to_transform": [0], "bias": "all",
              "modules_to_save": ["lm_head"], "use_rslora": True}),
    ("dora", {}), ("dora", {"layers_to_transform": [0], "bias": "lora_only"}),
    ("longlora", {}), ("longlora", {"modules_to_save": ["lm_head"], "layers_to_transform": [1]}),
    ("ia3", {}), ("ia3", {"target_modules": ["q_proj", "down_proj"], "feedforward_modules": ["down_proj"]}),
    ("ia3", {"modules_to_save": ["lm_head"]}), ("ia3", {"modules_to_save": ["down_proj"]}),
    ("prefix", {}), ("prefix", {"prefix_projection": True}), ("prefix", {"modules_to_save": ["norm"]}),
    ("prompt", {}), ("prompt", {"modules_to_save": ["lm_head"]}),
    ("ptuning", {}), ("ptuning", {"encoder_reparameterization_type": "LSTM"}),
]


def tiny(config, quantize_4bit=False):
    return build_model(name_or_path=None, config_overrides=config, attn_implementation="sdpa", dtype=torch.float32,
                       quantize_4bit=quantize_4bit)


def _has_bias(config) -> bool:
    return any(name.endswith(".bias") for name in layout(shape_from_config(config, "test")).parameters)


@pytest.mark.parametrize("shape_name", list(SHAPES))
@pytest.mark.parametrize("method, options", CASES, ids=[f"{m}-{i}" for i, (m, _) in enumerate(CASES)])
def test_the_plans_trainable_count_is_what_the_method_trains(shape_name, method, options):
    config = SHAPES[shape_name]
    if method == "bitfit" and not _has_bias(config):
        pytest.skip("bitfit needs biases (the method refuses a model without)")
    opts = MethodOptions(**{**COMMON, **options})
    real = trainable_summary(apply_method(tiny(config), method, opts))[0]
    assert trainable_params(shape_from_config(config, "test"), method, opts) == real


@pytest.mark.parametrize("options", [{}, {"modules_to_save": ["norm"], "layers_to_transform": [0]}])
def test_the_qlora_count_too(options):
    config = SHAPES["llama-gqa-bias"]
    opts = MethodOptions(**{**COMMON, **options})
    real = trainable_summary(apply_method(tiny(config, quantize_4bit=True), "qlora", opts))[0]
    assert trainable_params(shape_from_config(config, "test"), "qlora", opts) == real


def test_the_numbers_the_issue_found_wrong_are_right_now():
    """Issue 12 measured these on test_methods' tiny Llama (r 4, 4 virtual tokens, encoder 32, 1 layer)."""
    shape = shape_from_config(SHAPES["llama-gqa-bias"], "test")
    opts = MethodOptions(**COMMON, trainable_layers=1)
    assert not shape.tie_word_embeddings
    assert {m: trainable_params(shape, m, opts) for m in ("prefix", "ptuning", "bitfit", "freeze")} == \
        {"prefix": 512, "ptuning": 5504, "bitfit": 384, "freeze": 37184}


@pytest.mark.parametrize("shape_name", list(SHAPES))
def test_the_layout_is_the_module_tree_transformers_builds(shape_name):
    config = SHAPES[shape_name]
    model = tiny(config)
    tree = layout(shape_from_config(config, "test"))
    assert tree.parameters == {name: p.numel() for name, p in model.named_parameters()}
    assert set(tree.modules) == {name for name, _ in model.named_modules() if name}
    assert set(tree.norms) == {name for name, m in model.named_modules() if type(m).__name__.endswith("Norm")}
    linears = {name: (m.in_features, m.out_features, m.bias is not None)
               for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert {t.name: (t.inputs, t.outputs, t.bias) for t in tree.linears} == linears
    assert sum(tree.parameters.values()) == shape_from_config(config, "test").num_params


@pytest.mark.parametrize("model_type", list(CONFIG_DEFAULTS))
def test_config_defaults_are_transformers_own(model_type):
    from transformers import AutoConfig

    config = AutoConfig.for_model(model_type)
    for key, value in CONFIG_DEFAULTS[model_type].items():
        assert getattr(config, key) == value, key


def test_ia3_defaults_are_peft_own():
    from peft.utils.constants import (TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING as FEEDFORWARD,
                                      TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING as TARGETS)

    assert set(IA3_DEFAULTS) == set(LAYOUT_TYPES)
    for model_type, (targets, feedforward) in IA3_DEFAULTS.items():
        assert (sorted(TARGETS[model_type]), sorted(FEEDFORWARD[model_type])) == (sorted(targets), sorted(feedforward))
