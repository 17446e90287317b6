"""Reading recipe YAML a careless or hostile user wrote: bounded in size, nesting and alias expansion.

PyYAML shares one object per alias, so a few lines of `&a [*a, *a]` describe a document whose
expansion (what deepcopy, validation and json.dumps walk) has billions of nodes, and `&a [*a]`
one that never ends. Both are refused on the node graph, before anything is constructed.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from .strict import MAX_INT, NumberTooLong, Problem, RecipeError

MAX_BYTES = 1 << 20  # real recipes are a few KiB; a big one is a mistake (or a data file)
MAX_NODES = 100_000  # expanded nodes, aliases counted in full; real recipes have a few hundred
MAX_DEPTH = 64  # nesting levels; a recipe is about 5 deep, a model config a few more
MAX_INT_TEXT = 70  # characters of an integer literal: 0b + 64 binary digits, with room for a sign


class UnsafeYaml(ValueError):
    """YAML whose expansion is too big, too deep, or infinite."""


class _BoundedLoader(yaml.SafeLoader):
    def compose_document(self) -> yaml.Node:
        node = super().compose_document()
        _check_expansion(node)
        return node

    def construct_yaml_int(self, node: yaml.ScalarNode) -> int | NumberTooLong:
        # An integer no field can hold is kept as text, so validation reports it with its dotted path;
        # building it could fail (Python's 4300-digit limit) or take quadratic time (base-60 literals).
        if len(node.value.replace("_", "")) > MAX_INT_TEXT:
            return NumberTooLong(node.value)
        value = super().construct_yaml_int(node)
        return value if abs(value) <= MAX_INT else NumberTooLong(node.value)


_BoundedLoader.add_constructor("tag:yaml.org,2002:int", _BoundedLoader.construct_yaml_int)

# YAML 1.1 reads `12:00:00` as the base-60 integer 43200 and `2024-01-01` as a date. A recipe means text
# there (a time limit, a name): plain scalars resolve as in YAML 1.2, without base 60 or timestamps.
_YAML12 = {
    "tag:yaml.org,2002:int": re.compile(r"""^(?:[-+]?0b[0-1_]+|[-+]?0[0-7_]+|[-+]?(?:0|[1-9][0-9_]*)
                                         |[-+]?0x[0-9a-fA-F_]+)$""", re.X),
    "tag:yaml.org,2002:float": re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+][0-9]+)?
                                           |\.[0-9][0-9_]*(?:[eE][-+][0-9]+)?
                                           |[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$""", re.X),
}
_BoundedLoader.yaml_implicit_resolvers = {
    first: [(tag, _YAML12.get(tag, regexp)) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


def parse_yaml(text: str) -> Any:
    """safe_load with limits. Raises yaml.YAMLError or UnsafeYaml."""
    try:
        return yaml.load(text, Loader=_BoundedLoader)  # noqa: S506 - a SafeLoader subclass
    except RecursionError:  # PyYAML composes nested collections recursively
        raise UnsafeYaml(f"is nested more than {MAX_DEPTH} levels deep") from None
    except UnsafeYaml:
        raise
    except (KeyError, TypeError, ValueError) as err:  # a tag its constructor refuses: `!!bool maybe`, `!!int x`
        raise yaml.YAMLError(f"a tagged value cannot be read ({type(err).__name__}: {err})") from None


def read_recipe(path: Path) -> dict:
    """The recipe file as a mapping, or RecipeError naming what is wrong with the file."""
    text = _read_text(path)
    try:
        raw = parse_yaml(text)
    except yaml.YAMLError as err:
        raise _file_error(f"is not valid YAML: {describe_yaml_error(err)}", "fix the YAML syntax") from None
    except UnsafeYaml as err:
        raise _file_error(str(err), "write plain sections, without aliases that repeat large parts") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise _file_error(f"holds {type(raw).__name__}, not a mapping of sections",
                          "start with `name: ...` and `model: ...` lines")
    return raw


def parse_override(key: str, text: str) -> Any:
    """The YAML value of `--set key=text` (an empty text is the empty string)."""
    if not text:
        return ""
    try:
        return parse_yaml(text)
    except yaml.YAMLError as err:
        problem = Problem(key, f"--set value {text[:40]!r} is not valid YAML: {describe_yaml_error(err)}",
                          "quote a text value, e.g. --set 'key=\"[text\"'")
    except UnsafeYaml as err:  # "is nested ...", "expands to ..."
        problem = Problem(key, f"--set value {err}", "give a plain value")
    raise RecipeError([problem])


def describe_yaml_error(err: yaml.YAMLError) -> str:
    """One line: what and where (PyYAML's own message spans several lines with a caret)."""
    problem = getattr(err, "problem", None) or _first_line(err)
    mark = getattr(err, "problem_mark", None)
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark else problem


def _read_text(path: Path) -> str:
    try:
        if not path.exists():
            raise _file_error(f"file {path} does not exist", "check the path")
        if not path.is_file():  # a directory, or a FIFO/device that could block the planner forever
            raise _file_error(f"{path} is not a regular file", "give the path of a .yaml recipe")
        with path.open("rb") as handle:
            data = handle.read(MAX_BYTES + 1)
    except OSError as err:  # permissions, a name too long for the file system, ...
        raise _file_error(f"cannot be read: {err.strerror}", "check the path and the file's permissions") from None
    if len(data) > MAX_BYTES:
        raise _file_error(f"is larger than {MAX_BYTES >> 20} MiB", "a recipe is a few KiB: check the path")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise _file_error(f"is not UTF-8 text (byte {err.start})", "save the recipe as UTF-8") from None


def _file_error(what: str, fix: str) -> RecipeError:
    return RecipeError([Problem("<recipe>", what, fix)])


def _first_line(err: Exception) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    return []


def _check_expansion(root: yaml.Node | None) -> None:
    """Refuse a node graph that is cyclic, deeper than MAX_DEPTH or bigger than MAX_NODES expanded.

    Iterative post-order walk; each node's expanded size is computed once (memo by id), so a
    bomb is measured in time linear in its text. A node met again while still open is its own ancestor.
    """
    if root is None:
        return
    size: dict[int, int] = {}
    open_nodes: set[int] = set()
    stack: list[tuple[yaml.Node, int, bool]] = [(root, 1, False)]
    while stack:
        node, depth, closing = stack.pop()
        key = id(node)
        if closing:
            open_nodes.discard(key)
            size[key] = 1 + sum(size[id(child)] for child in _children(node))
            if size[key] > MAX_NODES:
                raise UnsafeYaml(f"expands to more than {MAX_NODES} values (aliases repeat their anchor)")
            continue
        if key in size:
            continue
        if key in open_nodes:
            raise UnsafeYaml("has an alias inside its own anchor (a structure that never ends)")
        if depth > MAX_DEPTH:
            raise UnsafeYaml(f"is nested more than {MAX_DEPTH} levels deep")
        open_nodes.add(key)
        stack.append((node, depth, True))
        stack.extend((child, depth + 1, False) for child in _children(node))
