"""Each PEFT option people set reaches peft, trains, exports through our export path and reloads through
`dist-ft eval`'s loader with the logits it had; what cannot work is refused with a reason."""

from __future__ import annotations

import json

import pytest
import torch

from dist_ft.evaluation.eval_model import RopeVariant, load_variant, resolve_target
from dist_ft.rank.methods import MethodError, apply_method, load_trained, save_trained, trainable_summary
from dist_ft.rank.model import build_model, export_model_dir
from dist_ft.rank.tokenizer import byte_tokenizer
from tests.helpers import wide_llama

TINY = wide_llama(rope_theta=None, attention_bias=True)
COMMON = {"r": 4, "alpha": 8, "dropout": 0.0, "num_virtual_tokens": 4, "encoder_hidden_size": 32}
BATCH = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """Two saved base models (untied, tied), so adapters name a base the eval loader can find."""
    out = {}
    for tied in (False, True):
        path = tmp_path_factory.mktemp(f"base-tied{tied}")
        model = build_model(name_or_path=None, config_overrides={**TINY, "tie_word_embeddings": tied},
                            attn_implementation="sdpa", dtype=torch.float32, seed=0)
        export_model_dir(model, byte_tokenizer(), path)
        out[tied] = path
    return out


def base_model(path, dtype=torch.float32):
    return build_model(name_or_path=str(path), attn_implementation="sdpa", dtype=dtype)


def train_steps(model, steps=2):
    """Two steps: LoRA's B starts at zero, so A only gets a gradient on the second."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    model.train()
    for _ in range(steps):
        model(input_ids=BATCH, labels=BATCH, use_cache=False).loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def logits(model):
    model.eval()
    with torch.no_grad():
        return model(input_ids=BATCH, use_cache=False).logits.float()


def reload_as_eval_does(adapter_dir, dtype=torch.float32):
    target = resolve_target(str(adapter_dir), virtual_tokens=True)
    return load_variant(target, RopeVariant("keep"), dtype, keep_peft_model=True)


ROUND_TRIPS = [
    ("lora", {"bias": "all"}, False),
    ("lora", {"bias": "lora_only", "target_modules": ["q_proj", "o_proj"]}, False),
    ("lora", {"use_rslora": True}, False),
    ("lora", {"init_lora_weights": "gaussian"}, False),
    ("lora", {"init_lora_weights": "pissa"}, False),
    ("lora", {"init_lora_weights": "olora", "use_rslora": True}, False),
    ("lora", {"init_lora_weights": "pissa", "bias": "all", "modules_to_save": ["lm_head"]}, False),
    ("longlora", {"init_lora_weights": "olora"}, True),
    ("lora", {"layers_to_transform": [1]}, False),
    ("lora", {"modules_to_save": ["lm_head"]}, False),
    ("lora", {"modules_to_save": ["lm_head"]}, True),
    ("lora", {"modules_to_save": ["embed_tokens", "norm"], "target_modules": ["q_proj"]}, True),
    ("dora", {"bias": "all", "modules_to_save": ["norm"], "layers_to_transform": [0]}, False),
    ("longlora", {"modules_to_save": ["lm_head"]}, False),
    ("ia3", {"modules_to_save": ["lm_head"]}, False),
    ("prefix", {"prefix_projection": True}, False),
    ("prefix", {"modules_to_save": ["norm"]}, False),
    ("prompt", {"prompt_tuning_init_text": "Answer briefly:"}, False),
    ("prompt", {"modules_to_save": ["lm_head"]}, True),
    ("ptuning", {"encoder_reparameterization_type": "LSTM"}, False),
    ("ptuning", {"encoder_reparameterization_type": "MLP", "modules_to_save": ["norm"]}, False),
]


@pytest.mark.parametrize("method, options, tied", ROUND_TRIPS,
                         ids=[f"{m}-{'-'.join(o)}{'-tied' if t else ''}" for m, o, t in ROUND_TRIPS])
def test_option_trains_exports_and_reloads_with_the_same_logits(method, options, tied, bases, tmp_path):
    model = apply_method(base_model(bases[tied]), method, {**COMMON, **options}, tokenizer=byte_tokenizer())
    before = logits(model)
    train_steps(model)
    trained = logits(model)
    assert not torch.allclose(before, trained)  # training changed what the export must carry
    save_trained(model, tmp_path / "adapter", tokenizer=byte_tokenizer())
    reloaded = logits(reload_as_eval_does(tmp_path / "adapter"))
    torch.testing.assert_close(reloaded, trained, rtol=0, atol=1e-5)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_pissa_and_olora_export_a_plain_lora_adapter_over_the_original_base(init, bases, tmp_path):
    base = base_model(bases[False])
    original = {n: p.detach().clone() for n, p in base.named_parameters()}
    model = apply_method(base, "lora", {**COMMON, "init_lora_weights": init})
    q = "model.layers.0.self_attn.q_proj"
    assert not torch.equal(model.get_base_model().get_submodule(q).base_layer.weight, original[f"{q}.weight"])
    train_steps(model)
    trained = logits(model)
    save_trained(model, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["init_lora_weights"]) == (8, 16, True)
    # plain peft over the untouched base: no decomposition at load time
    plain = load_trained(tmp_path / "adapter", base_model=base_model(bases[False]))
    torch.testing.assert_close(logits(plain), trained, rtol=0, atol=1e-5)
    # and the merged export (what `merge_adapter` writes) is the same model
    save_trained(load_trained(tmp_path / "adapter", base_model=base_model(bases[False])), tmp_path / "merged",
                 merge=True)
    torch.testing.assert_close(logits(base_model(tmp_path / "merged")), trained, rtol=0, atol=1e-5)


def test_pissa_under_bf16_exports_up_to_the_bf16_rounding_of_the_residual(bases, tmp_path):
    """What the plan's bf16 warning says, measured: the residual base is rounded after the decomposition."""
    model = apply_method(base_model(bases[False], torch.bfloat16), "lora", {**COMMON, "init_lora_weights": "pissa"})
    train_steps(model)
    trained = logits(model)
    save_trained(model, tmp_path / "adapter")
    reloaded = logits(reload_as_eval_does(tmp_path / "adapter", torch.bfloat16))
    difference = (reloaded - trained).abs().max().item()
    assert 0 < difference < 0.05 * trained.abs().max().item()


def test_prompt_init_text_starts_from_the_texts_token_embeddings(bases):
    base = base_model(bases[False])
    words = base.get_input_embeddings().weight.detach().clone()
    model = apply_method(base, "prompt", {**COMMON, "num_virtual_tokens": 5, "prompt_tuning_init_text": "abc"},
                         tokenizer=byte_tokenizer())
    ids = byte_tokenizer()("abc", add_special_tokens=False)["input_ids"]
    expected = words[(ids * 2)[:5]]
    torch.testing.assert_close(model.prompt_encoder["default"].embedding.weight.detach(), expected)


def test_rslora_changes_the_scaling_not_the_count(bases):
    plain = apply_method(base_model(bases[False]), "lora", COMMON)
    rs = apply_method(base_model(bases[False]), "lora", {**COMMON, "use_rslora": True})
    assert trainable_summary(plain) == trainable_summary(rs)
    q = "base_model.model.model.layers.0.self_attn.q_proj"
    assert plain.get_submodule(q).scaling["default"] == 8 / 4
    assert rs.get_submodule(q).scaling["default"] == pytest.approx(8 / 2)


@pytest.mark.parametrize("method, options, quantize, message", [
    ("lora", {"modules_to_save": ["lm_haed"]}, False, "names no module.*did you mean 'lm_head'"),
    ("lora", {"layers_to_transform": [2]}, False, r"\[2\] are beyond the model's 2 layers"),
    ("dora", {"init_lora_weights": "pissa"}, False, "does not combine with dora"),
    ("qlora", {"init_lora_weights": "olora"}, True, "4-bit base"),
    ("prompt", {"prompt_tuning_init_text": "hi"}, False, "needs the tokenizer"),
])
def test_what_cannot_work_is_refused_before_training(method, options, quantize, message, bases):
    base = base_model(bases[False]) if not quantize else \
        build_model(name_or_path=str(bases[False]), attn_implementation="sdpa", dtype=torch.float32,
                    quantize_4bit=True)
    with pytest.raises(MethodError, match=message):
        apply_method(base, method, {**COMMON, **options})
