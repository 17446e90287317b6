"""The numbers of a model architecture the plan needs, and where to read them.

`shape_from_config` is pure. `read_model_shape` is the one place the launcher
touches model files: a local config.json, GGUF metadata, an inline recipe
config, or a small catalogue of well-known hub models (so cluster recipes plan
on a laptop without downloading anything).
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Model types whose positions are not a configurable RoPE (learned tables, ALiBi, GPT-J's fixed rotary):
# transformers' rope_parameters mean nothing to them.
ABSOLUTE_POSITION_TYPES = ("gpt2", "gpt_neo", "gptj", "opt", "bloom", "gpt_bigcode")
# Those with a learned table of max_position_embeddings rows: no position beyond it exists until it grows.
LEARNED_POSITION_TYPES = ("gpt2", "gpt_neo", "opt", "gpt_bigcode")
# Tables dist-ft can grow: (module path under the base model, rows stored before position 0 — OPT keeps 2).
# gpt_neo is missing on purpose: its eager attention slices a causal buffer sized by the old length.
POSITION_TABLES = {"gpt2": ("wpe", 0), "gpt_bigcode": ("wpe", 0), "opt": ("decoder.embed_positions", 2)}

# Configs that route tokens to experts (their MLP is not one per-token function).
MOE_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_intermediate_size")
# Decoder layers without an `mlp` module (their feed-forward is inline): nothing to tile.
INLINE_MLP_TYPES = ("opt",)

# Public config.json values of hub models our recipes name; used only for planning.
CATALOGUE: dict[str, dict[str, Any]] = {
    "meta-llama/Meta-Llama-3-8B": dict(model_type="llama", hidden_size=4096, num_hidden_layers=32,
                                    num_attention_heads=32, num_key_value_heads=8, intermediate_size=14336,
                                    vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0,
                                    tie_word_embeddings=False),
    "meta-llama/Llama-3.2-1B": dict(model_type="llama", hidden_size=2048, num_hidden_layers=16,
                                    num_attention_heads=32, num_key_value_heads=8, intermediate_size=8192,
                                    vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0,
                                    tie_word_embeddings=True),
    "Qwen/Qwen2.5-7B": dict(model_type="qwen2", hidden_size=3584, num_hidden_layers=28,
                            num_attention_heads=28, num_key_value_heads=4, intermediate_size=18944,
                            vocab_size=152064, max_position_embeddings=32768, rope_theta=1000000.0,
                            tie_word_embeddings=False, attention_bias=True),
    "mistralai/Mistral-7B-v0.1": dict(model_type="mistral", hidden_size=4096, num_hidden_layers=32,
                                      num_attention_heads=32, num_key_value_heads=8, intermediate_size=14336,
                                      vocab_size=32000, max_position_embeddings=8192, rope_theta=10000.0,
                                      tie_word_embeddings=False),
    "HuggingFaceTB/SmolLM2-135M-Instruct": dict(model_type="llama", hidden_size=576, num_hidden_layers=30,
                                                num_attention_heads=9, num_key_value_heads=3,
                                                intermediate_size=1536, vocab_size=49152,
                                                max_position_embeddings=8192, rope_theta=100000.0,
                                                tie_word_embeddings=True),
}
GGUF_NAMES = {"SmolLM2-135M-Instruct": "HuggingFaceTB/SmolLM2-135M-Instruct"}


@dataclass(frozen=True)
class ModelShape:
    model_type: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    max_position_embeddings: int
    rope_theta: float
    tie_word_embeddings: bool
    attention_bias: bool
    source: str
    mixture_of_experts: bool = False

    @property
    def absolute_positions(self) -> bool:
        return self.model_type in ABSOLUTE_POSITION_TYPES

    @property
    def learned_position_table(self) -> bool:
        return self.model_type in LEARNED_POSITION_TYPES

    @property
    def num_params(self) -> int:
        h, kv = self.hidden_size, self.num_kv_heads * self.head_dim
        attn = h * (self.num_heads * self.head_dim) * 2 + h * kv * 2
        mlp = 3 * h * self.intermediate_size
        per_layer = attn + mlp + 2 * h
        embed = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * per_layer + embed + h

    def linear_shapes(self) -> list[tuple[int, int]]:
        """(in, out) of each linear layer in one decoder block (LoRA sizing)."""
        h, q, kv, i = self.hidden_size, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim, \
            self.intermediate_size
        return [(h, q), (h, kv), (h, kv), (q, h), (h, i), (h, i), (i, h)]


def shape_from_config(cfg: dict[str, Any], source: str) -> ModelShape:
    """Pure: a transformers-style config dict → ModelShape (gpt2-style names too)."""
    def get(*names: str, default: Any = None) -> Any:
        for name in names:
            if cfg.get(name) is not None:
                return cfg[name]
        return default

    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    hidden = get("hidden_size", "n_embd", "d_model", default=64)
    heads = get("num_attention_heads", "n_head", default=4)
    return ModelShape(
        model_type=cfg.get("model_type", "llama"),
        hidden_size=hidden,
        num_layers=get("num_hidden_layers", "n_layer", default=2),
        num_heads=heads,
        num_kv_heads=get("num_key_value_heads", default=heads),
        head_dim=get("head_dim", default=hidden // heads),
        intermediate_size=get("intermediate_size", "n_inner", "ffn_dim", default=4 * hidden),
        vocab_size=get("vocab_size", default=32000),
        max_position_embeddings=get("max_position_embeddings", "n_positions", default=2048),
        rope_theta=float(rope.get("rope_theta") or cfg.get("rope_theta") or 10000.0),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", True)),
        attention_bias=bool(cfg.get("attention_bias", cfg.get("model_type") in ABSOLUTE_POSITION_TYPES)),
        source=source,
        mixture_of_experts=any(cfg.get(key) for key in MOE_KEYS),
    )


def resolve_model_dir(name_or_path: str) -> Path | None:
    """`package:NAME` → the installed package's folder; a local dir → itself; else None."""
    if name_or_path.startswith("package:"):
        found = importlib.util.find_spec(name_or_path.removeprefix("package:"))
        return Path(next(iter(found.submodule_search_locations))) if found and found.submodule_search_locations \
            else None
    path = Path(name_or_path).expanduser()
    return path if path.is_dir() else None


def read_model_shape(name_or_path: str | None, gguf_file: str | None,
                     inline: dict[str, Any] | None) -> ModelShape | None:
    """Best-effort: None when nothing readable describes the model."""
    if name_or_path is None:
        return shape_from_config(inline or {}, "recipe model.config")
    folder = resolve_model_dir(name_or_path)
    if folder and gguf_file and (folder / gguf_file).is_file():
        return _gguf_shape(folder / gguf_file)
    if folder and (folder / "config.json").is_file():
        cfg = json.loads((folder / "config.json").read_text())
        return shape_from_config({**cfg, **(inline or {})}, str(folder / "config.json"))
    if name_or_path in CATALOGUE:
        return shape_from_config({**CATALOGUE[name_or_path], **(inline or {})}, f"catalogue:{name_or_path}")
    return None


def _gguf_shape(path: Path) -> ModelShape:
    stem = path.name.split(".")[0]
    if stem in GGUF_NAMES:  # reading GGUF metadata parses the whole file; the catalogue is instant
        return shape_from_config(CATALOGUE[GGUF_NAMES[stem]], f"catalogue:{GGUF_NAMES[stem]} ({path.name})")
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    arch = _gguf_field(reader, "general.architecture")
    cfg = {
        "model_type": arch,
        "hidden_size": _gguf_field(reader, f"{arch}.embedding_length"),
        "num_hidden_layers": _gguf_field(reader, f"{arch}.block_count"),
        "num_attention_heads": _gguf_field(reader, f"{arch}.attention.head_count"),
        "num_key_value_heads": _gguf_field(reader, f"{arch}.attention.head_count_kv"),
        "intermediate_size": _gguf_field(reader, f"{arch}.feed_forward_length"),
        "max_position_embeddings": _gguf_field(reader, f"{arch}.context_length"),
        "rope_theta": _gguf_field(reader, f"{arch}.rope.freq_base"),
        "vocab_size": len(reader.fields["tokenizer.ggml.tokens"].data),
    }
    return shape_from_config(cfg, str(path))


def _gguf_field(reader: Any, key: str) -> Any:
    field = reader.fields.get(key)
    if field is None:
        return None
    value = field.parts[field.data[0]]
    return bytes(value).decode() if value.dtype.kind == "u" and value.itemsize == 1 else value.item()
