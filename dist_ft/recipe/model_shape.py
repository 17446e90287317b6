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


class ShapeError(ValueError):
    """A model config value the plan cannot use; `key` names it, `what` says why."""

    def __init__(self, key: str, what: str):
        self.key, self.what = key, what
        super().__init__(f"{key} {what}")


MAX_DIM = 1 << 20  # hidden size, heads, layers, vocabulary: beyond any model, small enough for the estimates
MAX_POSITIONS = 1 << 24
# Keys that decide the parameters' shapes or the positions: read by the plan, fixed by a pretrained
# checkpoint's weights (the recipe's `rope` and stages change RoPE and context instead).
SHAPE_KEYS = ("model_type", "hidden_size", "n_embd", "d_model", "num_hidden_layers", "n_layer",
              "num_attention_heads", "n_head", "num_key_value_heads", "head_dim", "intermediate_size", "n_inner",
              "ffn_dim", "vocab_size", "max_position_embeddings", "n_positions", "rope_parameters", "rope_scaling",
              "rope_theta", "tie_word_embeddings", "attention_bias", *MOE_KEYS)


def shape_from_config(cfg: dict[str, Any], source: str) -> ModelShape:
    """Pure: a transformers-style config dict → ModelShape (gpt2-style names too). Raises ShapeError."""
    def get(*names: str, default: int, limit: int = MAX_DIM) -> int:
        for name in names:
            if cfg.get(name) is not None:
                return _whole(name, cfg[name], limit)
        return default

    hidden = get("hidden_size", "n_embd", "d_model", default=64)
    heads = get("num_attention_heads", "n_head", default=4)
    kv_heads = get("num_key_value_heads", default=heads)
    _check_heads(cfg, hidden, heads, kv_heads)
    return ModelShape(
        model_type=_model_type(cfg),
        hidden_size=hidden,
        num_layers=get("num_hidden_layers", "n_layer", default=2),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=get("head_dim", default=hidden // heads),
        intermediate_size=get("intermediate_size", "n_inner", "ffn_dim", default=4 * hidden),
        vocab_size=get("vocab_size", default=32000),
        max_position_embeddings=get("max_position_embeddings", "n_positions", default=2048, limit=MAX_POSITIONS),
        rope_theta=_rope_theta(cfg),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", True)),
        attention_bias=bool(cfg.get("attention_bias", cfg.get("model_type") in ABSOLUTE_POSITION_TYPES)),
        source=source,
        mixture_of_experts=any(cfg.get(key) for key in MOE_KEYS),
    )


def _whole(key: str, value: Any, limit: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= limit:
        raise ShapeError(key, f"must be a whole number from 1 to {limit}, got {repr(value)[:40]}")
    return value


def _check_heads(cfg: dict[str, Any], hidden: int, heads: int, kv_heads: int) -> None:
    """What attention layers need to be built at all: whole heads, whole groups of query heads per KV head."""
    head_key = "num_attention_heads" if "num_attention_heads" in cfg else "n_head"
    if cfg.get("head_dim") is None and hidden % heads:
        raise ShapeError(head_key, f"{heads} does not divide the hidden size {hidden} (and head_dim is unset)")
    if heads % kv_heads:
        raise ShapeError("num_key_value_heads", f"{kv_heads} does not divide the {heads} attention heads")


def _model_type(cfg: dict[str, Any]) -> str:
    value = cfg.get("model_type", "llama")
    if not isinstance(value, str) or not value.replace("-", "_").isidentifier():
        raise ShapeError("model_type", f"must be a transformers model type such as llama, got {repr(value)[:40]}")
    return value


def _rope_theta(cfg: dict[str, Any]) -> float:
    rope_key = "rope_parameters" if cfg.get("rope_parameters") else "rope_scaling"
    rope = cfg.get(rope_key) or {}
    if not isinstance(rope, dict):
        raise ShapeError(rope_key, f"must be a mapping, got {repr(rope)[:40]}")
    for key, value in ((f"{rope_key}.rope_theta", rope.get("rope_theta")), ("rope_theta", cfg.get("rope_theta"))):
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
            raise ShapeError(key, f"must be a positive number, got {repr(value)[:40]}")
        return float(value)
    return 10000.0


def resolve_model_dir(name_or_path: str) -> Path | None:
    """`package:NAME` → the installed package's folder; a local dir → itself; else None."""
    if name_or_path.startswith("package:"):
        return package_dir(name_or_path.removeprefix("package:"))
    path = Path(name_or_path).expanduser()
    return path if is_dir(path) else None


def is_dir(path: Path) -> bool:
    """Path.is_dir, False where the system refuses to look (a name too long, a folder without permission)."""
    try:
        return path.is_dir()
    except OSError:
        return False


def is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except OSError:
        return False


def package_dir(name: str) -> Path | None:
    """`NAME` or `NAME.SUB.SUB` → that package's folder, found without importing anything.

    `importlib.util.find_spec("a.b")` imports `a`, running its `__init__`: a data path would run code
    at plan time. So only the top-level name goes to the finders (they locate, never execute) and
    sub-packages are plain folders below it.
    """
    parts = name.split(".")
    if not all(part.isidentifier() for part in parts):
        return None
    try:
        spec = importlib.util.find_spec(parts[0])
    except (ImportError, ValueError):  # ValueError: a module in sys.modules without a __spec__
        return None
    for root in (spec.submodule_search_locations or []) if spec else []:
        folder = Path(root).joinpath(*parts[1:])
        if is_dir(folder):
            return folder
    return None


def read_model_shape(name_or_path: str | None, gguf_file: str | None,
                     inline: dict[str, Any] | None) -> ModelShape | None:
    """Best-effort: None when nothing readable describes the model."""
    if name_or_path is None:
        return shape_from_config(inline or {}, "recipe model.config")
    folder = resolve_model_dir(name_or_path)
    if folder and gguf_file and is_file(folder / gguf_file):
        try:
            return _gguf_shape(folder / gguf_file)
        except (OSError, ValueError, KeyError, IndexError) as err:  # not a GGUF file, or a truncated one
            raise ShapeError("gguf_file", f"{gguf_file} cannot be read as GGUF: {err}") from None
    if folder and is_file(folder / "config.json"):
        cfg = _read_config_json(folder / "config.json")
        return shape_from_config({**cfg, **(inline or {})}, str(folder / "config.json"))
    if name_or_path in CATALOGUE:
        return shape_from_config({**CATALOGUE[name_or_path], **(inline or {})}, f"catalogue:{name_or_path}")
    return None


def _read_config_json(path: Path) -> dict[str, Any]:
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:  # ValueError: bad JSON or bad UTF-8
        raise ShapeError("config.json", f"in {path.parent} cannot be read: {err}") from None
    if not isinstance(cfg, dict):
        raise ShapeError("config.json", f"in {path.parent} is not a JSON object")
    return cfg


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
