"""The recipe as plain data: `--set` overrides applied to the raw YAML dict, and typed sections back to
plain dicts for YAML/JSON output. Split from config.py (re-exported there); nothing here knows the
sections' types, which is why it needs no import of them.
"""

from __future__ import annotations

import copy
import dataclasses
import re
from typing import Any

from .recipe_yaml import MAX_DEPTH, parse_override
from .strict import Problem, RecipeError


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Return a copy of `raw` with each `a.b.c=value` (YAML value) applied."""
    out = copy.deepcopy(raw)
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise RecipeError([Problem(key or item, "override is not of the form key=value",
                                       "write e.g. --set cluster.nodes=4")])
        if key.count(".") >= MAX_DEPTH:  # as deep as the YAML loader allows, so validation cannot recurse away
            raise RecipeError([Problem(key[:80], f"the key is more than {MAX_DEPTH} levels deep", "check the key")])
        _set_path(out, key.split("."), parse_override(key, text))
    return out


def _set_path(node: Any, keys: list[str], value: Any) -> None:
    *parents, last = keys
    for key in parents:
        if isinstance(node, list):
            node = node[_index(node, key, keys)]
        else:
            node = node.setdefault(key, {})
            if not isinstance(node, (dict, list)):
                raise RecipeError([Problem(".".join(keys), f"`{key}` is not a section", "check the path")])
    if isinstance(node, list):
        node[_index(node, last, keys)] = value
    else:
        node[last] = value


def _index(node: list, key: str, keys: list[str]) -> int:
    if not key.isdigit() or int(key) >= len(node):
        raise RecipeError([Problem(".".join(keys), f"`{key}` is not an index of a {len(node)}-item list",
                                   f"use 0..{len(node) - 1}")])
    return int(key)


def without_keys(raw: dict, paths: list[str]) -> dict:
    """A copy of `raw` without the keys at these dotted paths (`a.b[1].c`); paths not found are skipped."""
    out = copy.deepcopy(raw)
    for path in paths:
        *parents, last = re.findall(r"[^.\[\]]+", path) or [""]
        node: Any = out
        for key in parents:
            node = node[int(key)] if isinstance(node, list) and key.isdigit() and int(key) < len(node) \
                else node.get(key) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(last, None)
    return out


def to_dict(obj: Any) -> Any:
    """Plain data for YAML/JSON output (dataclasses → dicts)."""

    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj
