"""The house around evaluation: the ranks sit below evaluation/, the launcher and the CLI, and the
decoding/scoring core both sides use sits below the ranks."""

from __future__ import annotations

import ast

from tests.conftest import ROOT

PACKAGE = ROOT / "dist_ft"


def imported_modules(folder: str) -> dict[str, set[str]]:
    """{file: dist_ft modules it imports anywhere (function-level imports too)} for every file under `folder`."""
    found = {}
    for path in sorted((PACKAGE / folder).rglob("*.py")):
        package = ".".join(path.relative_to(ROOT).parent.parts)
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = package.split(".")[:len(package.split(".")) - node.level + 1] if node.level else []
                names.add(".".join(base + ([node.module] if node.module else [])))
        found[str(path.relative_to(ROOT))] = {n for n in names if n.startswith("dist_ft")}
    return found


def test_the_ranks_import_neither_evaluation_nor_the_launcher_nor_the_cli():
    banned = ("dist_ft.evaluation", "dist_ft.launcher", "dist_ft.cli")
    found = [f"{path} imports {name}" for path, names in imported_modules("rank").items()
             for name in sorted(names) if name.startswith(banned)]
    assert found == []


def test_the_decoding_core_imports_nothing_else_from_dist_ft():
    found = [f"{path} imports {name}" for path, names in imported_modules("decoding").items()
             for name in sorted(names) if not name.startswith("dist_ft.decoding")]
    assert found == []
    ranks = set().union(*imported_modules("rank").values())
    assert {"dist_ft.decoding.generate", "dist_ft.decoding.task_metrics"} <= ranks  # the ranks do use it
