"""Every method trains exactly its parameters, and what it saves reloads to the same loss."""

from __future__ import annotations

import re

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from dist_ft.rank.methods import MethodError, apply_method, load_trained, save_trained, trainable_summary
from dist_ft.rank.model import build_model
from tests.helpers import wide_llama

TINY = wide_llama(rope_theta=None, attention_bias=True)
OPTS = {"r": 4, "alpha": 8, "dropout": 0.0, "num_virtual_tokens": 4, "encoder_hidden_size": 32,
        "trainable_layers": 1}
BATCH = torch.randint(0, 259, (2, 24), generator=torch.Generator().manual_seed(1))

# What each method should train, told by parameter name independently of the method's code.
INTENDED = {
    "full": r".",
    "lora": r"\.lora_[AB]\.",
    "qlora": r"\.lora_[AB]\.",
    "dora": r"\.lora_([AB]|magnitude_vector)\.",
    "longlora": r"\.lora_[AB]\.|(embed_tokens|norm)\.modules_to_save\.",
    "prefix": r"^prompt_encoder\.",
    "prompt": r"^prompt_encoder\.",
    "ptuning": r"^prompt_encoder\.",
    "ia3": r"\.ia3_l\.",
    "bitfit": r"\.bias$",
    "freeze": r"\.layers\.1\.",
}


def tiny_base(quantize_4bit=False, **overrides):
    return build_model(name_or_path=None, config_overrides={**TINY, **overrides}, attn_implementation="sdpa",
                       dtype=torch.float32, quantize_4bit=quantize_4bit)


def eval_loss(model):
    model.eval()
    with torch.no_grad():
        loss = model(input_ids=BATCH, labels=BATCH, use_cache=False).loss.item()
    model.train()
    return loss


def train_steps(model, steps=2):
    """Two steps: LoRA's B starts at zero, so A only gets a gradient on the second."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    for _ in range(steps):
        model(input_ids=BATCH, labels=BATCH, use_cache=False).loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def snapshot(model):
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def reload(method, out, qlora):
    if method in ("full", "bitfit", "freeze"):
        return AutoModelForCausalLM.from_pretrained(out)
    return PeftModel.from_pretrained(tiny_base(quantize_4bit=qlora), out)


@pytest.mark.parametrize("method", list(INTENDED))
def test_method_trains_exactly_its_parameters_and_reloads(method, tmp_path):
    qlora = method == "qlora"
    model = apply_method(tiny_base(quantize_4bit=qlora), method, OPTS)
    before = snapshot(model)
    train_steps(model)
    after = snapshot(model)
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    intended = {name for name in before if re.search(INTENDED[method], name)}
    assert intended and changed == intended
    assert {name for name, p in model.named_parameters() if p.requires_grad} == intended

    trained_loss = eval_loss(model)
    save_trained(model, tmp_path / "out")
    assert eval_loss(reload(method, tmp_path / "out", qlora)) == pytest.approx(trained_loss, abs=1e-5)


def test_qlora_gradients_survive_an_eval_forward_before_training():
    model = apply_method(tiny_base(quantize_4bit=True), "qlora", OPTS)
    eval_loss(model)  # the bitsandbytes CPU trap: an eval, no-grad forward before the first backward
    train_steps(model, steps=1)
    model(input_ids=BATCH, labels=BATCH, use_cache=False).loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters() if p.requires_grad}
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads.values())


def test_without_the_guard_the_qlora_trap_is_real():
    """Shows the guard's test above can fail: bitsandbytes' CPU repack kills LoRA gradients."""
    import bitsandbytes as bnb
    from bitsandbytes.functional import has_avx512bf16

    if not has_avx512bf16():
        pytest.skip("this CPU has no AVX512-BF16, so bitsandbytes never repacks")
    model = apply_method(tiny_base(quantize_4bit=True, attention_bias=False), "qlora", OPTS)
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = True
    eval_loss(model)
    model(input_ids=BATCH, labels=BATCH, use_cache=False).loss.backward()
    first_b = next(p.grad for name, p in model.named_parameters() if "layers.0.self_attn.q_proj.lora_B" in name)
    assert first_b is None or first_b.abs().sum() == 0


def test_the_qlora_guard_still_reaches_what_bitsandbytes_has():
    """The canary for keep_4bit_trainable's private reach, on any CPU (the test above needs AVX512-BF16):
    bitsandbytes still has the switch its CPU repack checks, and a repack done with its own function is
    undone by the guard, leaving the same 4-bit weights, the outputs (up to the block scales' round trip
    through bf16 in the repack), a backward, and the switch off."""
    import inspect

    import bitsandbytes as bnb
    from bitsandbytes.functional import _convert_weight_packed_for_cpu

    from dist_ft.rank.model import keep_4bit_trainable

    assert hasattr(bnb.nn.Linear4bit(8, 8), "support_avx512bf16_for_cpu")  # bitsandbytes' own, set in __init__
    assert "support_avx512bf16_for_cpu" in inspect.getsource(bnb.nn.Linear4bit.forward)
    model = tiny_base(quantize_4bit=True, attention_bias=False).eval()
    linear = next(m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit))
    x = torch.randn(3, linear.in_features)
    with torch.no_grad():
        before, weights = linear(x), linear.weight.data.clone()
    linear.support_avx512bf16_for_cpu = True
    linear.weight.data, linear.weight.quant_state = _convert_weight_packed_for_cpu(linear.weight.data,
                                                                                 linear.weight.quant_state)
    assert linear.weight.quant_state.packing_format_for_cpu  # what the repack leaves: no backward from here
    keep_4bit_trainable(model)
    assert not linear.weight.quant_state.packing_format_for_cpu and not linear.support_avx512bf16_for_cpu
    assert torch.equal(linear.weight.data, weights)
    after = linear(x.requires_grad_())
    assert torch.allclose(after, before, rtol=2e-2, atol=2e-3)
    after.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


@pytest.mark.parametrize("method, tied", [("lora", False), ("dora", False), ("longlora", False), ("longlora", True)])
def test_merged_export_reloads_in_plain_transformers(method, tied, tmp_path):
    model = apply_method(tiny_base(tie_word_embeddings=tied), method, OPTS)
    train_steps(model)
    adapter_loss = eval_loss(model)
    save_trained(model, tmp_path / "adapter")
    save_trained(model, tmp_path / "merged", merge=True)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert eval_loss(merged) == pytest.approx(adapter_loss, abs=1e-5)
    reloaded = load_trained(tmp_path / "adapter", base_model=tiny_base(tie_word_embeddings=tied))
    assert eval_loss(reloaded) == pytest.approx(adapter_loss, abs=1e-5)


def test_longlora_keeps_tied_embeddings_tied():
    model = apply_method(tiny_base(tie_word_embeddings=True), "longlora", OPTS)
    train_steps(model)
    inner = model.get_base_model()
    assert torch.equal(inner.get_input_embeddings().weight, inner.get_output_embeddings().weight)


def test_trainable_summary_counts_parameters():
    base = tiny_base()
    total = sum(p.numel() for p in base.parameters())
    assert trainable_summary(base) == (total, total)
    model = apply_method(base, "lora", {"r": 4, "target_modules": ["q_proj"]})
    # per layer: A (4×64) + B (64×4) on q_proj
    assert trainable_summary(model) == (2 * (4 * 64 + 64 * 4), total + 2 * (4 * 64 + 64 * 4))


def test_trainable_summary_counts_4bit_weights_at_full_size():
    full = sum(p.numel() for p in tiny_base().parameters())
    assert trainable_summary(tiny_base(quantize_4bit=True))[1] == full


@pytest.mark.parametrize("method, opts, model_overrides, message", [
    ("lorra", {}, {}, "did you mean 'lora'"),
    ("lora", {"lora_alpha": 16}, {}, "did you mean 'alpha'"),
    ("bitfit", {}, {"attention_bias": False}, "has none"),
    ("freeze", {"trainable_layers": 0}, {}, "would train nothing"),
    ("freeze", {"trainable_layers": 3}, {}, "has 2 layers"),
    ("qlora", {}, {}, "4-bit base"),
])
def test_method_errors_say_what_to_do(method, opts, model_overrides, message):
    with pytest.raises(MethodError, match=message):
        apply_method(tiny_base(**model_overrides), method, opts)


def test_prefix_tuning_with_gradient_checkpointing_is_refused():
    with pytest.raises(MethodError, match="gradient checkpointing"):
        apply_method(tiny_base(), "prefix", OPTS, gradient_checkpointing=True)


def test_freeze_by_pattern():
    model = apply_method(tiny_base(), "freeze", {"trainable_layers": 0, "trainable_patterns": [r"lm_head", r"\.norm\."]})
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {"lm_head.weight", "model.norm.weight"}


def test_merging_a_prompt_adapter_is_refused(tmp_path):
    model = apply_method(tiny_base(), "prompt", OPTS)
    with pytest.raises(MethodError, match="LoRA family"):
        save_trained(model, tmp_path, merge=True)


PEFT_ON_DEMAND = """
import sys
from dist_ft.rank import trainer
from dist_ft.rank.methods import apply_method
from dist_ft.rank.model import build_model
model = build_model(name_or_path=None, config_overrides={config!r}, attn_implementation="sdpa")
apply_method(model, "full")
print("after full:", "peft" in sys.modules, "bitsandbytes" in sys.modules)
apply_method(model, "lora", {{"r": 4, "alpha": 8}})
print("after lora:", "peft" in sys.modules)
"""


@pytest.mark.integration  # a fresh interpreter: what a rank imports at start-up
def test_a_rank_imports_peft_only_for_a_method_that_wraps_the_model():
    import subprocess
    import sys

    from tests.conftest import ROOT

    out = subprocess.run([sys.executable, "-c", PEFT_ON_DEMAND.format(config=TINY)], cwd=ROOT, check=True,
                         capture_output=True, text=True).stdout.splitlines()
    assert [line for line in out if line.startswith("after")] == ["after full: False False", "after lora: True"]
