"""What README.md and docs/ name exists: every repository file they mention, every `dist-ft` command in
their code (inline or fenced) and each flag given to it, every `make` target; and every test or doc the
code cites. Docs drift silently otherwise (a test file that was renamed, a flag that never existed)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from dist_ft.cli import _parser
from tests.conftest import ROOT

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# Paths the docs name on purpose as missing: the error a bad recipe gets.
NAMED_AS_MISSING = {"launch/data/nope.jsonl"}
TOP = "launch|docs|tests|benchmarks|dist_ft|slurm|ds_configs"
REPO_PATH = re.compile(rf"(?<![\w/.-])((?:{TOP})/[\w./-]*\w)(?![\w{{*<$-])")  # not a pattern (x-*, {a,b})
CODE_SPAN = re.compile(r"`([^`\n]+)`")
# where a command starts: the code's start (after a prompt or a venv path) or after ; && | (
COMMAND = re.compile(r"(?:^\s*(?:\$\s*)?(?:[\w./]*/)?|[;&|(]\s*)dist-ft ([a-z][\w-]*)(.*)")
FLAG = re.compile(r"(?<![\w-])(--[a-z][\w-]*)")
MAKE = re.compile(r"(?<![\w-])make ([a-z][\w-]*)")


def code_of(text: str) -> list[tuple[int, str]]:
    """(line number, code) for each inline code span and each line of a fenced block."""
    found, fenced = [], False
    for number, line in enumerate(text.splitlines(), start=1):
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        found += [(number, line)] if fenced else [(number, span) for span in CODE_SPAN.findall(line)]
    return found


def subcommands() -> dict:
    sub = next(action for action in _parser()._actions if action.__class__.__name__ == "_SubParsersAction")
    return sub.choices


def make_targets() -> set[str]:
    return set(re.findall(r"^([a-z][\w-]*):", (ROOT / "Makefile").read_text(), re.M))


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_file_named_exists(doc: Path):
    missing = [f"{doc.name}:{n}: {path}" for n, line in enumerate(doc.read_text().splitlines(), start=1)
               for path in REPO_PATH.findall(line)
               if path not in NAMED_AS_MISSING and not (ROOT / path).exists()]
    assert missing == []


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_command_flag_and_make_target_exists(doc: Path):
    commands, targets, wrong = subcommands(), make_targets(), []
    for number, code in code_of(doc.read_text()):
        for name, rest in COMMAND.findall(code):
            if name not in commands:
                wrong.append(f"{doc.name}:{number}: no command `dist-ft {name}`")
                continue
            rest = rest.split("#")[0]  # a shell comment may mention other commands' flags
            wrong += [f"{doc.name}:{number}: `dist-ft {name}` has no {flag}" for flag in FLAG.findall(rest)
                      if flag not in commands[name]._option_string_actions]
        wrong += [f"{doc.name}:{number}: no make target {target}" for target in MAKE.findall(code)
                  if target not in targets]
    assert wrong == []


def test_every_file_the_code_cites_exists():
    """Docstrings and comments cite tests and docs as evidence; a renamed file leaves them pointing nowhere."""
    sources = [*sorted((ROOT / "dist_ft").rglob("*.py")), *sorted((ROOT / "benchmarks").glob("*.py"))]
    missing = [f"{source.relative_to(ROOT)}: {path}" for source in sources
               for path in REPO_PATH.findall(source.read_text())
               if path.startswith(("tests/", "docs/")) and not (ROOT / path).exists()]
    assert missing == []


DOTTED = re.compile(r"(?<![\w/.-])(dist_ft(?:\.[A-Za-z_]\w*)+)")


def resolves(dotted: str) -> bool:
    """`dist_ft.a.b.name`: the longest prefix that is a module of the checkout, then attributes of it."""
    import importlib

    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        path = ROOT.joinpath(*parts[:cut])
        if path.with_suffix(".py").is_file() or (path / "__init__.py").is_file():
            target = importlib.import_module(".".join(parts[:cut]))
            for name in parts[cut:]:
                if not hasattr(target, name):
                    return False
                target = getattr(target, name)
            return True
    return False


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_module_and_function_named_exists(doc: Path):
    named = {m for _, code in code_of(doc.read_text()) for m in DOTTED.findall(code)} - {"dist_ft.json"}
    assert sorted(m for m in named if not resolves(m)) == []
