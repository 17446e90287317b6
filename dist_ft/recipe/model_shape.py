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

# What transformers' config classes assume when config.json leaves a key out (checked against transformers by
# tests/unit/test_trainable_count.py). Other model types: tied embeddings, no biases, head_dim = hidden / heads.
CONFIG_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": {"tie_word_embeddings": False, "attention_bias": False, "mlp_bias": False},
    "mistral": {"tie_word_embeddings": False},
    "mixtral": {"tie_word_embeddings": False},
    "qwen2": {"tie_word_embeddings": False},
    "qwen3": {"tie_word_embeddings": False, "attention_bias": False, "head_dim": 128},
    "phi3": {"tie_word_embeddings": False},
    "gemma": {"tie_word_embeddings": True, "attention_bias": False, "head_dim": 256},
    "gpt2": {"tie_word_embeddings": True}, "gpt_neo": {"tie_word_embeddings": True},
    "opt": {"tie_word_embeddings": True},
}
# Model types whose module tree dist-ft knows exactly (model.layers.N.self_attn.q_proj ...): the plan counts
# their trainable parameters as peft and our methods do and checks module names. Others are estimated on
# the same Llama-shaped tree.
LAYOUT_TYPES = ("llama", "mistral", "qwen2", "qwen3")


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
    attention_bias: bool  # the q/k/v projections have biases
    source: str
    mixture_of_experts: bool = False
    attention_output_bias: bool = False  # the output projection (o_proj) has a bias
    mlp_bias: bool = False  # gate/up/down projections have biases

    @property
    def absolute_positions(self) -> bool:
        return self.model_type in ABSOLUTE_POSITION_TYPES

    @property
    def learned_position_table(self) -> bool:
        return self.model_type in LEARNED_POSITION_TYPES

    @property
    def num_params(self) -> int:
        """Parameters as `model.parameters()` counts them (a tied output layer once)."""
        return sum(layout(self).parameters.values())

    @property
    def exact_layout(self) -> bool:
        """Whether `layout` is this model's own module tree (else a Llama-shaped estimate)."""
        return self.model_type in LAYOUT_TYPES and not self.mixture_of_experts


@dataclass(frozen=True)
class Linear:
    name: str  # full module name, e.g. model.layers.0.self_attn.q_proj
    inputs: int
    outputs: int
    bias: bool
    layer: int | None  # decoder layer index; None outside the layers (the output layer)


@dataclass(frozen=True)
class Layout:
    """A decoder's module tree as transformers builds it: every parameter (name → element count, as
    `named_parameters()` lists them: a tied output layer has none of its own), every module name, the linear
    layers and the norms."""
    parameters: dict[str, int]
    modules: tuple[str, ...]
    linears: tuple[Linear, ...]  # the output layer included (last)
    norms: tuple[str, ...]  # modules whose class name ends in "Norm"
    embedding: str = "model.embed_tokens"
    output: str = "lm_head"
    layers: str = "model.layers"


def layout(shape: ModelShape) -> Layout:
    """The Llama-shaped module tree of `shape` (exact for LAYOUT_TYPES; see ModelShape.exact_layout)."""
    h, q, kv, i = shape.hidden_size, shape.num_heads * shape.head_dim, shape.num_kv_heads * shape.head_dim, \
        shape.intermediate_size
    params: dict[str, int] = {"model.embed_tokens.weight": shape.vocab_size * h}
    modules = ["model", "model.embed_tokens", "model.layers", "model.norm", "model.rotary_emb", "lm_head"]
    linears: list[Linear] = []
    norms: list[str] = []
    qkv, out, mlp = shape.attention_bias, shape.attention_output_bias, shape.mlp_bias
    blocks = [("self_attn.q_proj", h, q, qkv), ("self_attn.k_proj", h, kv, qkv), ("self_attn.v_proj", h, kv, qkv),
              ("self_attn.o_proj", q, h, out), ("mlp.gate_proj", h, i, mlp), ("mlp.up_proj", h, i, mlp),
              ("mlp.down_proj", i, h, mlp)]
    layer_norms = [("input_layernorm", h), ("post_attention_layernorm", h)]
    if shape.model_type == "qwen3":
        layer_norms += [("self_attn.q_norm", shape.head_dim), ("self_attn.k_norm", shape.head_dim)]
    for n in range(shape.num_layers):
        prefix = f"model.layers.{n}"
        modules += [prefix, f"{prefix}.self_attn", f"{prefix}.mlp", f"{prefix}.mlp.act_fn"]
        for name, inputs, outputs, bias in blocks:
            full = f"{prefix}.{name}"
            linears.append(Linear(full, inputs, outputs, bias, n))
            modules.append(full)
            params[f"{full}.weight"] = inputs * outputs
            if bias:
                params[f"{full}.bias"] = outputs
        for name, size in layer_norms:
            norms.append(f"{prefix}.{name}")
            modules.append(f"{prefix}.{name}")
            params[f"{prefix}.{name}.weight"] = size
    norms.append("model.norm")
    params["model.norm.weight"] = h
    linears.append(Linear("lm_head", h, shape.vocab_size, False, None))
    if not shape.tie_word_embeddings:
        params["lm_head.weight"] = shape.vocab_size * h
    return Layout(parameters=params, modules=tuple(modules), linears=tuple(linears), norms=tuple(norms))


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
              "rope_theta", "tie_word_embeddings", "attention_bias", "mlp_bias", *MOE_KEYS)


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
    model_type = _model_type(cfg)
    defaults = CONFIG_DEFAULTS.get(model_type, {})
    _check_heads(cfg, hidden, heads, kv_heads, defaults.get("head_dim"))
    qkv_bias, out_bias, mlp_bias = _biases(model_type, cfg, defaults)
    return ModelShape(
        model_type=model_type,
        hidden_size=hidden,
        num_layers=get("num_hidden_layers", "n_layer", default=2),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=get("head_dim", default=defaults.get("head_dim") or hidden // heads),
        intermediate_size=get("intermediate_size", "n_inner", "ffn_dim", default=4 * hidden),
        vocab_size=get("vocab_size", default=32000),
        max_position_embeddings=get("max_position_embeddings", "n_positions", default=2048, limit=MAX_POSITIONS),
        rope_theta=_rope_theta(cfg),
        tie_word_embeddings=_flag(cfg, "tie_word_embeddings", defaults.get("tie_word_embeddings", True)),
        attention_bias=qkv_bias,
        attention_output_bias=out_bias,
        mlp_bias=mlp_bias,
        source=source,
        mixture_of_experts=any(cfg.get(key) for key in MOE_KEYS),
    )


def _flag(cfg: dict[str, Any], key: str, default: bool) -> bool:
    value = cfg.get(key)
    return default if value is None else bool(value)


def _biases(model_type: str, cfg: dict[str, Any], defaults: dict[str, Any]) -> tuple[bool, bool, bool]:
    """(q/k/v, output projection, MLP) biases as each family's modelling code builds them."""
    if model_type == "qwen2":  # q/k/v always carry a bias, nothing else does
        return True, False, False
    if model_type == "mistral":  # no bias switch at all
        return False, False, False
    attention = _flag(cfg, "attention_bias", defaults.get("attention_bias", model_type in ABSOLUTE_POSITION_TYPES))
    mlp = _flag(cfg, "mlp_bias", defaults.get("mlp_bias", False)) if model_type == "llama" else \
        model_type in ABSOLUTE_POSITION_TYPES
    return attention, attention, mlp


def _whole(key: str, value: Any, limit: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= limit:
        raise ShapeError(key, f"must be a whole number from 1 to {limit}, got {repr(value)[:40]}")
    return value


def _check_heads(cfg: dict[str, Any], hidden: int, heads: int, kv_heads: int, head_dim: int | None) -> None:
    """What attention layers need to be built at all: whole heads, whole groups of query heads per KV head."""
    head_key = "num_attention_heads" if "num_attention_heads" in cfg else "n_head"
    if cfg.get("head_dim") is None and head_dim is None and hidden % heads:
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
