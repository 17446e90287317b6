"""All RoPE reasoning: a stage's parameters as transformers' `config.rope_parameters` wants them,
the context they address, and their merge into a live config before a model is built. Pure: a
transformers config is only read and set here (duck-typed), never imported.

Every check transformers would only log (a factor below 1, llama3's frequency band, LongRoPE's
factor lists) is an error here, at plan time, with the recipe field's path.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from dist_ft.recipe.config import Rope
from dist_ft.recipe.model_shape import ModelShape
from dist_ft.recipe.strict import Problem

TRANSFORMERS_TYPE = {"none": "default", "linear": "linear", "dynamic": "dynamic", "yarn": "yarn",
                     "llama3": "llama3", "longrope": "longrope"}
# RoPE types whose scaling is measured against the pre-training context.
NEEDS_ORIGINAL = ("yarn", "llama3", "longrope")
SCALED_TYPES = ("linear", "dynamic", "yarn", "llama3", "longrope")
KEPT_ACROSS_ROPE_TYPES = ("rope_theta", "partial_rotary_factor")
# Without scaling, perplexity explodes a little past the trained window; much further is wasted CPU/GPU time.
UNSCALED_REACH = 4
_SCALING = {"factor", "original_max_position_embeddings", "rope_theta"}
# The recipe fields each kind reads: any other one set is a mistake (say, short_factor under yarn).
FIELDS_READ = {"none": {"rope_theta"}, "linear": _SCALING, "dynamic": _SCALING,
               "yarn": _SCALING | {"beta_fast", "beta_slow", "attention_factor"},
               "llama3": _SCALING | {"low_freq_factor", "high_freq_factor"},
               "longrope": _SCALING | {"short_factor", "long_factor", "attention_factor"}}


def rope_parameters(rope: Rope, seq_len: int, shape: ModelShape | None, path: str,
                    problems: list[Problem], inherited_theta: float | None = None) -> dict[str, Any]:
    """The rope dict (rope_type, rope_theta, factor, ...) for one stage; {} keeps the model's own.

    `type: none` gives {} (or just the recipe's rope_theta), so a model keeps the scaling it
    has, e.g. Llama 3.1's or an earlier stage's. Otherwise the factor defaults to seq_len /
    original context, the original context being the recipe's or the model's own, and
    rope_theta to the recipe's, else `inherited_theta` (an earlier stage's raise), else the model's.
    A model without RoPE gets {}.
    """
    _check_fields_read(rope, path, problems)
    if shape is not None and shape.absolute_positions:
        _check_no_rope(rope, shape, path, problems)
        return {}
    if rope.type == "none":
        return {} if rope.rope_theta is None else {"rope_theta": float(rope.rope_theta)}
    params: dict[str, Any] = {"rope_type": TRANSFORMERS_TYPE[rope.type]}
    theta = rope.rope_theta or inherited_theta or (shape.rope_theta if shape else None)
    if theta is not None:
        params["rope_theta"] = float(theta)
    original = _original_context(rope, shape, path, problems)
    if original is None and rope.factor is None:
        return params
    _check_dynamic_reaches(rope, seq_len, original, path, problems)
    params["factor"] = _factor(rope, seq_len, original, path, problems)
    if original is not None:
        params["original_max_position_embeddings"] = int(original)
    params.update(_type_specific(rope, shape, path, problems))
    return params


def _original_context(rope: Rope, shape: ModelShape | None, path: str, problems: list[Problem]) -> int | None:
    original = rope.original_max_position_embeddings or (shape.max_position_embeddings if shape else None)
    if original is None and (rope.type in NEEDS_ORIGINAL or rope.factor is None):
        problems.append(Problem(f"{path}.original_max_position_embeddings",
                                f"{rope.type} RoPE needs the model's original context and the model config "
                                "is not readable", "set `original_max_position_embeddings: 8192` (the model's "
                                "pre-training context)"))
    return original


def _check_dynamic_reaches(rope: Rope, seq_len: int, original: int | None, path: str,
                           problems: list[Problem]) -> None:
    if rope.type == "dynamic" and original is not None and seq_len <= original:
        problems.append(Problem(f"{path}.type", f"dynamic NTK rescales only beyond the original context "
                                f"({original}); at seq_len {seq_len} this stage would train the unscaled model",
                                f"use `type: none` for stages inside the original context, or raise seq_len "
                                f"above {original}"))


def _factor(rope: Rope, seq_len: int, original: int | None, path: str, problems: list[Problem]) -> float:
    factor = rope.factor if rope.factor is not None else max(1.0, seq_len / original)
    if factor < 1:
        problems.append(Problem(f"{path}.factor", f"must be >= 1, got {factor:g}",
                                "a factor below 1 shrinks the context; use 1 or more"))
    return float(factor)


def scaled_context(params: dict[str, Any]) -> int | None:
    """The context a stage's model declares for its static scaling: original × factor (None for none and
    dynamic: dynamic NTK rescales against max_position_embeddings itself, which must stay the original)."""
    if params.get("rope_type") in (None, "default", "dynamic") or "original_max_position_embeddings" not in params:
        return None
    return round(params["original_max_position_embeddings"] * params.get("factor", 1.0))


def native_context(config) -> int:
    """A built config's pre-training context: the RoPE's original window where scaling recorded one."""
    rope = config.rope_parameters or {}
    return int(rope.get("original_max_position_embeddings") or config.max_position_embeddings)


def reach(config, absolute_positions: bool) -> int:
    """The longest length worth evaluating on a built config: its native context × the scaling factor
    (dynamic included: it stretches at run time), then `addressable_length`."""
    rope = config.rope_parameters or {}
    context = config.max_position_embeddings
    if rope.get("rope_type", "default") in SCALED_TYPES:
        context = int(native_context(config) * float(rope.get("factor") or 1.0))
    return addressable_length(context, absolute_positions)


def addressable_length(context: int, absolute_positions: bool) -> int:
    """Longest length worth evaluating for a model whose (scaled) window is `context` tokens: all of a
    learned/absolute position table, ×4 for RoPE (extrapolation studies)."""
    return context if absolute_positions else context * UNSCALED_REACH


def _check_fields_read(rope: Rope, path: str, problems: list[Problem]) -> None:
    read = FIELDS_READ[rope.type]
    for name in Rope.__dataclass_fields__:
        if name != "type" and getattr(rope, name) is not None and name not in read:
            users = [kind for kind, fields in FIELDS_READ.items() if name in fields]
            problems.append(Problem(f"{path}.{name}", f"is not used by `type: {rope.type}`",
                                    f"remove it, or use a type that reads it ({', '.join(users)})"))


def _check_no_rope(rope: Rope, shape: ModelShape, path: str, problems: list[Problem]) -> None:
    if shape.learned_position_table:
        what, fix = "learned absolute positions", ("set `rope.type: none`; to go past its "
                                                   f"{shape.max_position_embeddings} positions, set the stage's "
                                                   "`extend_positions: interpolate` (or copy, init)")
    else:
        what, fix = "positions transformers' RoPE settings do not reach (ALiBi or fixed)", "set `rope.type: none`"
    if rope.type != "none":
        problems.append(Problem(f"{path}.type", f"{shape.model_type} has no RoPE to scale: it uses {what}", fix))
    if rope.rope_theta is not None:
        problems.append(Problem(f"{path}.rope_theta", f"{shape.model_type} has no RoPE base to raise: it uses "
                                f"{what}", "remove rope_theta"))


def _type_specific(rope: Rope, shape: ModelShape | None, path: str, problems: list[Problem]) -> dict[str, Any]:
    if rope.attention_factor is not None and rope.attention_factor <= 0:
        problems.append(Problem(f"{path}.attention_factor", f"must be > 0, got {rope.attention_factor:g}",
                                "leave it unset for the paper's default"))
    if rope.type == "yarn":
        fast, slow = rope.beta_fast or 32.0, rope.beta_slow or 1.0
        if fast <= slow:
            problems.append(Problem(f"{path}.beta_fast", f"must exceed beta_slow ({slow:g}), got {fast:g}",
                                    "use e.g. beta_fast: 32, beta_slow: 1 (the defaults)"))
        return {k: v for k, v in (("beta_fast", rope.beta_fast), ("beta_slow", rope.beta_slow),
                                  ("attention_factor", rope.attention_factor)) if v is not None}
    if rope.type == "llama3":
        low, high = rope.low_freq_factor or 1.0, rope.high_freq_factor or 4.0
        if high <= low:
            problems.append(Problem(f"{path}.high_freq_factor", f"must exceed low_freq_factor ({low:g})",
                                    "use e.g. low_freq_factor: 1, high_freq_factor: 4"))
        return {"low_freq_factor": float(low), "high_freq_factor": float(high)}
    if rope.type == "longrope":
        return _longrope(rope, shape, path, problems)
    return {}


def _longrope(rope: Rope, shape: ModelShape | None, path: str, problems: list[Problem]) -> dict[str, Any]:
    half = shape.head_dim // 2 if shape else None
    out: dict[str, Any] = {}
    for name in ("short_factor", "long_factor"):
        values = getattr(rope, name)
        if values is None:
            problems.append(Problem(f"{path}.{name}", "LongRoPE needs per-frequency factors",
                                    f"give a list of {half or 'head_dim/2'} numbers (from the LongRoPE search)"))
        elif half is not None and len(values) != half:
            problems.append(Problem(f"{path}.{name}", f"has {len(values)} values, the model needs {half}",
                                    f"give head_dim/2 = {half} numbers"))
        elif min(values, default=1) <= 0:
            problems.append(Problem(f"{path}.{name}", "has a value <= 0; each divides a frequency",
                                    "give positive numbers (1 leaves a frequency as it is)"))
        else:
            out[name] = [float(v) for v in values]
    if rope.attention_factor is not None:
        out["attention_factor"] = rope.attention_factor
    return out


# ---- merging into a live config (before the model is built) ----------------------------------

def merged_rope_parameters(current: Mapping[str, Any] | None, requested: Mapping[str, Any],
                           context: int) -> dict[str, Any]:
    """`requested` laid over the model's own RoPE dict.

    Same type, or no type requested: merged over all current keys (keeps e.g. Llama
    3.1's freq factors, or the previous stage's scaling under a theta-only request).
    Another type: only rope_theta and partial_rotary_factor carry over, since
    leftover keys of the old type fail transformers' validation. `context` is
    the model's native context, the default original for yarn/llama3/longrope.
    """
    current = dict(current or {})
    if requested.get("rope_type", current.get("rope_type", "default")) == current.get("rope_type", "default"):
        merged = {**current, **requested}
    else:
        merged = {**{k: current[k] for k in KEPT_ACROSS_ROPE_TYPES if k in current}, **requested}
    merged.setdefault("rope_type", "default")
    if merged["rope_type"] in NEEDS_ORIGINAL:
        merged.setdefault("original_max_position_embeddings", context)
    return merged


def apply_context(config, rope_parameters: Mapping[str, Any] | None,
                  max_position_embeddings: int | None) -> None:
    """Set the stage's RoPE and context length on `config` (in place, before the model is built).

    Dynamic NTK scales relative to `config.max_position_embeddings` itself, so for
    it that number stays the original context instead of growing to the stage's.
    Empty or None `rope_parameters` keep the model's RoPE (or its lack of one).
    """
    rope = None
    if rope_parameters:
        if getattr(config, "rope_parameters", None) is None:
            raise ValueError(f"{config.model_type} has no RoPE to set {dict(rope_parameters)} on")
        if config.nested_rope_parameter_keys(config.rope_parameters or {}):
            raise ValueError(f"{config.model_type} has per-layer-type RoPE; rescaling it is not supported")
        rope = merged_rope_parameters(config.rope_parameters, rope_parameters, config.max_position_embeddings)
        if rope["rope_type"] == "dynamic":
            config.max_position_embeddings = rope.pop("original_max_position_embeddings",
                                                      config.max_position_embeddings)
            max_position_embeddings = None
        config.rope_parameters = rope
    if max_position_embeddings is not None and max_position_embeddings > config.max_position_embeddings:
        config.max_position_embeddings = max_position_embeddings
    if rope is not None:
        config.validate_rope()  # after the context grows: yarn/llama3 compare their original against it


def max_positions(shape: ModelShape | None, seq_len: int, rope: dict[str, Any]) -> int:
    """The context the stage's model declares: what it trains on, and what its RoPE scaling addresses."""
    return max(seq_len, shape.max_position_embeddings if shape else 0, scaled_context(rope) or 0)


def inherited_theta(earlier: list[dict[str, Any]]) -> float | None:
    """The RoPE base the stages so far (their rope parameters, in order) leave the model with (None: the
    model's own)."""
    return next((params["rope_theta"] for params in reversed(earlier) if "rope_theta" in params), None)
