"""Helpers shared by the unit and integration tests: tiny model shapes, plans of the demo recipe with
overrides, and process probes. One copy each (they used to be copied across a dozen files)."""

from __future__ import annotations

import socket

import pytest

from dist_ft.plan.plan import Plan, make_plan
from dist_ft.recipe.config import apply_overrides, recipe_from_dict
from dist_ft.recipe.model_shape import shape_from_config
from dist_ft.recipe.strict import RecipeError
from tests.conftest import demo_raw

# The smallest Llama the tests build: 2 layers, 4 heads over 2 KV heads, byte vocabulary.
TINY_LLAMA = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 259,
              "max_position_embeddings": 256, "rope_theta": 10000.0}


def tiny_llama(**changes) -> dict:
    """TINY_LLAMA with `changes` (a key set to None is left out, so transformers' default applies)."""
    return {key: value for key, value in {**TINY_LLAMA, **changes}.items() if value is not None}


def wide_llama(**changes) -> dict:
    """The tiny Llama at hidden 64 / intermediate 128 (the size the demo recipe trains)."""
    return tiny_llama(hidden_size=64, intermediate_size=128, **changes)


def llama_kwargs(config: dict) -> dict:
    """A shape dict as `LlamaConfig(**...)` takes it (without the recipe's model_type)."""
    return {key: value for key, value in config.items() if key != "model_type"}


def plan_of(overrides=(), raw: dict | None = None, shape="inline") -> Plan:
    """The plan of the demo recipe (or `raw`) with `--set` overrides; "inline" reads the shape from
    the recipe's own model.config."""
    recipe = recipe_from_dict(apply_overrides(raw or demo_raw(), list(overrides)))
    if shape == "inline":
        shape = shape_from_config(recipe.model.config, "test")
    return make_plan(recipe, shape, "/tmp/run")


def problems_of(overrides=(), raw: dict | None = None, shape="inline") -> dict:
    """The planner's problems for a recipe it must refuse, by dotted path."""
    with pytest.raises(RecipeError) as err:
        plan_of(overrides, raw, shape)
    return {problem.path: problem for problem in err.value.problems}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie, dead but not yet reaped, does not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
