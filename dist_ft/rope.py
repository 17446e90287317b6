"""RoPE parameters per stage, as transformers' `config.rope_parameters` wants them. Pure."""

from __future__ import annotations

from typing import Any

from .config import Rope
from .model_shape import ModelShape
from .strict import Problem

TRANSFORMERS_TYPE = {"none": "default", "linear": "linear", "dynamic": "dynamic", "yarn": "yarn",
                     "llama3": "llama3", "longrope": "longrope"}
NEEDS_ORIGINAL = ("yarn", "llama3", "longrope")


def rope_parameters(rope: Rope, seq_len: int, shape: ModelShape | None, path: str,
                    problems: list[Problem]) -> dict[str, Any]:
    """The full rope dict (rope_type, rope_theta, factor, ...) for one stage.

    The factor defaults to seq_len / original context; the original context is
    the recipe's `original_max_position_embeddings` or the model's own.
    """
    theta = rope.rope_theta or (shape.rope_theta if shape else None)
    params: dict[str, Any] = {"rope_type": TRANSFORMERS_TYPE[rope.type]}
    if theta is not None:
        params["rope_theta"] = float(theta)
    if rope.type == "none":
        return params
    if shape is not None and shape.absolute_positions:
        problems.append(Problem(f"{path}.type", f"{shape.model_type} uses learned absolute positions, not RoPE",
                                "set `rope.type: none`"))
        return params
    original = rope.original_max_position_embeddings or (shape.max_position_embeddings if shape else None)
    if original is None and (rope.type in NEEDS_ORIGINAL or rope.factor is None):
        problems.append(Problem(f"{path}.original_max_position_embeddings",
                                f"{rope.type} RoPE needs the model's original context and the model config "
                                "is not readable", "set `original_max_position_embeddings: 8192` (the model's "
                                "pre-training context)"))
        return params
    factor = rope.factor if rope.factor is not None else max(1.0, seq_len / original)
    if factor < 1:
        problems.append(Problem(f"{path}.factor", f"must be >= 1, got {factor:g}",
                                "a factor below 1 shrinks the context; use 1 or more"))
    params["factor"] = float(factor)
    if original is not None:
        params["original_max_position_embeddings"] = int(original)
    params.update(_type_specific(rope, shape, path, problems))
    return params


def _type_specific(rope: Rope, shape: ModelShape | None, path: str, problems: list[Problem]) -> dict[str, Any]:
    if rope.type == "yarn":
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
        else:
            out[name] = [float(v) for v in values]
    if rope.attention_factor is not None:
        out["attention_factor"] = rope.attention_factor
    return out
