"""Strict construction of frozen dataclasses from plain YAML data.

Every problem is collected with the dotted path of the field, what was wrong
and how to fix it, so a user sees all mistakes of a recipe at once.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal, Union


# The largest integer any field may hold: torch, DeepSpeed and JSON readers take 64-bit integers.
MAX_INT = 2**63 - 1


class NumberTooLong(str):
    """An integer literal beyond MAX_INT, kept as its text by the YAML loader so that validation
    reports it with its dotted path (building it may fail: Python refuses 4300+ digit strings)."""


@dataclass(frozen=True)
class Problem:
    path: str
    what: str
    fix: str = ""

    def __str__(self) -> str:
        text = f"{self.path or '<recipe>'}: {self.what}"
        return f"{text}\n    fix: {self.fix}" if self.fix else text


class RecipeError(Exception):
    """A recipe that cannot be run; carries every problem found."""

    def __init__(self, problems: list[Problem]):
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


class Invalid(Exception):
    """Raised by a dataclass's __post_init__; the loader adds the dotted path."""

    def __init__(self, field: str, what: str, fix: str = ""):
        self.field, self.what, self.fix = field, what, fix
        super().__init__(f"{field}: {what}")


def spec(default: Any = dataclasses.MISSING, *, doc: str = "", min: float | None = None,
         max: float | None = None, factory: Any = None) -> Any:
    """A dataclass field with its documentation and numeric bounds."""
    meta = {"doc": doc, "min": min, "max": max}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


def build(cls: type, data: Any, path: str = "") -> Any:
    """Build `cls` from `data`, raising RecipeError with every problem found."""
    problems = list(_unusable_values(data, path))
    if problems:  # NaN passes every bound (each comparison is False); validate nothing until they are gone
        raise RecipeError(problems)
    value = _convert(cls, data, path, problems)
    if problems:
        raise RecipeError(problems)
    return value


# What a recipe may hold: what JSON holds (plan.json carries the recipe's values to every rank).
PLAIN_TYPES = (str, int, float, bool, type(None), list, dict)


def _unusable_values(data: Any, path: str) -> Iterator[Problem]:
    """Every NaN, infinity, integer beyond 64 bits and non-plain value (a date, bytes, a set) in the
    data, keys included, with its dotted path."""
    problem = _unusable_value(data, path)
    if problem:
        yield problem
    elif isinstance(data, dict):
        for key, value in data.items():
            key_problem = _unusable_value(key, path)
            if key_problem:
                yield key_problem
            else:
                yield from _unusable_values(value, join(path, str(key)))
    elif isinstance(data, list):
        for index, value in enumerate(data):
            yield from _unusable_values(value, join(path, index))


def _unusable_value(value: Any, path: str) -> Problem | None:
    if isinstance(value, float) and not math.isfinite(value):
        return Problem(path, f"{value} is not a finite number", "write a finite number")
    if isinstance(value, NumberTooLong) or (isinstance(value, int) and abs(value) > MAX_INT):
        return Problem(path, "the integer is beyond the 64-bit range (more than 9.2e18)", "write a smaller number")
    if not isinstance(value, PLAIN_TYPES):
        return Problem(path, f"a {type(value).__name__} value cannot be used", "write text, a number, true/false, "
                       "a list or a mapping (quote dates)")
    return None


def join(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else key


def _convert(tp: Any, data: Any, path: str, problems: list[Problem]) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return _convert_dataclass(tp, data, path, problems)
    if origin in (Union, types.UnionType):
        return _convert_optional(tp, data, path, problems)
    if origin is Literal:
        return _convert_literal(tp, data, path, problems)
    if origin is list:
        return _convert_list(tp, data, path, problems)
    if origin is dict:
        return _convert_dict(tp, data, path, problems)
    return _convert_scalar(tp, data, path, problems)


def _convert_dataclass(cls: type, data: Any, path: str, problems: list[Problem]) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        problems.append(Problem(path, f"expected a mapping, got {_kind(data)}",
                                f"write the fields of {path or 'the recipe'} as `key: value` lines"))
        return None
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    replaced = getattr(cls, "replaced_keys", {})
    for key in data:
        if key in replaced:
            problems.append(Problem(join(path, str(key)), "was replaced", replaced[key]))
        elif key not in fields:
            problems.append(_unknown_key(key, path, list(fields)))
    before = len(problems)
    kwargs = {}
    for name, fld in fields.items():
        fpath = join(path, name)
        if name not in data:
            if fld.default is dataclasses.MISSING and fld.default_factory is dataclasses.MISSING:
                problems.append(Problem(fpath, "is required but missing",
                                        f"add `{name}:` ({_describe(hints[name])})"))
            continue
        value = _convert(hints[name], data[name], fpath, problems)
        _check_bounds(fld, value, fpath, problems)
        kwargs[name] = value
    if len(problems) > before:
        return None
    try:
        return cls(**kwargs)
    except Invalid as err:
        problems.append(Problem(join(path, err.field), err.what, err.fix))
        return None


def _unknown_key(key: Any, path: str, known: list[str]) -> Problem:
    close = difflib.get_close_matches(str(key), known, n=1, cutoff=0.6)
    fix = f"did you mean `{close[0]}`?" if close else f"valid keys here: {', '.join(sorted(known))}"
    return Problem(join(path, str(key)), "unknown key", fix)


def _convert_optional(tp: Any, data: Any, path: str, problems: list[Problem]) -> Any:
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if data is None and len(args) < len(typing.get_args(tp)):
        return None
    if len(args) == 1:
        return _convert(args[0], data, path, problems)
    for arg in args:  # first alternative that converts cleanly wins
        trial: list[Problem] = []
        value = _convert(arg, data, path, trial)
        if not trial:
            return value
    problems.append(Problem(path, f"got {_kind(data)} {data!r}", f"use {_describe(tp)}"))
    return None


def _convert_literal(tp: Any, data: Any, path: str, problems: list[Problem]) -> Any:
    choices = typing.get_args(tp)
    if data in choices and type(data) is type(choices[choices.index(data)]):
        return data
    close = difflib.get_close_matches(str(data), [str(c) for c in choices], n=1, cutoff=0.6)
    hint = f"did you mean `{close[0]}`? " if close else ""
    problems.append(Problem(path, f"{data!r} is not one of {', '.join(map(str, choices))}",
                            f"{hint}choose one of: {', '.join(map(str, choices))}"))
    return None


def _convert_list(tp: Any, data: Any, path: str, problems: list[Problem]) -> Any:
    (item,) = typing.get_args(tp)
    if not isinstance(data, list):
        problems.append(Problem(path, f"expected a list, got {_kind(data)}",
                                "write a YAML list (`- item` lines or `[a, b]`)"))
        return None
    return [_convert(item, v, join(path, i), problems) for i, v in enumerate(data)]


def _convert_dict(tp: Any, data: Any, path: str, problems: list[Problem]) -> Any:
    key_t, value_t = typing.get_args(tp)
    if not isinstance(data, dict):
        problems.append(Problem(path, f"expected a mapping, got {_kind(data)}",
                                "write `key: value` lines"))
        return None
    if value_t is str:  # environment-style maps: numbers are fine, rendered as text
        return {str(k): _env_value(v, join(path, str(k)), problems) for k, v in data.items()}
    return {str(k): _convert(value_t, v, join(path, str(k)), problems) for k, v in data.items()}


def _env_value(value: Any, path: str, problems: list[Problem]) -> str:
    if isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return str(value)
    problems.append(Problem(path, f"expected a string or number, got {_kind(value)}",
                            "quote the value"))
    return ""


def _convert_scalar(tp: Any, data: Any, path: str, problems: list[Problem]) -> Any:
    if tp is Any:
        return data
    if tp is float and isinstance(data, int) and not isinstance(data, bool):
        return float(data)
    if tp is float and isinstance(data, str):
        try:  # YAML 1.1 reads `2e-5` as a string
            value = float(data)
        except ValueError:
            value = None
        if value is not None and math.isfinite(value):
            return value
        if value is not None:  # "nan", "inf", "1e999"
            problems.append(Problem(path, f"{data!r} is not a finite number", "write a finite number"))
            return None
    if isinstance(data, tp) and not (tp is int and isinstance(data, bool)):
        return data
    problems.append(Problem(path, f"expected {_describe(tp)}, got {_kind(data)} {data!r}",
                            f"write {path.rsplit('.', 1)[-1]} as {_describe(tp)}"))
    return None


def _check_bounds(fld: dataclasses.Field, value: Any, path: str, problems: list[Problem]) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return
    low, high = fld.metadata.get("min"), fld.metadata.get("max")
    if low is not None and value < low:
        problems.append(Problem(path, f"must be >= {number_text(low)}, got {number_text(value)}",
                                f"set it to {number_text(low)} or more"))
    if high is not None and value > high:
        problems.append(Problem(path, f"must be <= {number_text(high)}, got {number_text(value)}",
                                f"set it to {number_text(high)} or less"))


def number_text(value: float) -> str:
    """Whole numbers in full (a bound of 16777216 must not read 1.67772e+07), others as %g."""
    return str(int(value)) if float(value).is_integer() and abs(value) < 1e18 else f"{value:g}"


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(map(str, typing.get_args(tp)))
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(tp) if a is not type(None))
    if origin is list:
        return "a list"
    if origin is dict or dataclasses.is_dataclass(tp):
        return "a mapping"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(tp, str(tp))


def _kind(data: Any) -> str:
    return {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean",
            int: "an integer", float: "a number", type(None): "nothing"}.get(type(data), type(data).__name__)
