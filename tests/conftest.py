"""Shared test helpers: recipes as dicts, written to tmp dirs, and the CLI run in-process."""

from __future__ import annotations

import copy
import os
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch"
RECIPES = sorted(LAUNCH.glob("*.yaml"))

os.environ.setdefault("OMP_NUM_THREADS", "1")


def demo_raw() -> dict:
    return yaml.safe_load((LAUNCH / "demo.yaml").read_text())


@pytest.fixture
def recipe_file(tmp_path):
    """Write a recipe dict next to a copy of the demo data and return its path."""
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    for name in ("tiny_instructions.jsonl", "demo_tasks.jsonl"):  # the demo's task, and the old tiny one
        (data_dir / name).write_text((LAUNCH / "data" / name).read_text())

    def write(raw: dict, name: str = "recipe.yaml") -> Path:
        raw = copy.deepcopy(raw)
        raw.setdefault("checkpointing", {})["output_root"] = str(tmp_path / "runs")
        path = tmp_path / name
        path.write_text(yaml.safe_dump(raw))
        return path

    return write


def pytest_collection_modifyitems(config, items):
    """`longrun` tests take many minutes on 2 cores: they run when DIST_FT_LONGRUN=1, not in CI."""
    if os.environ.get("DIST_FT_LONGRUN") == "1":
        return
    skip = pytest.mark.skip(reason="long run (minutes of CPU): set DIST_FT_LONGRUN=1 to run it")
    for item in items:
        if "longrun" in item.keywords:
            item.add_marker(skip)


def wait_for_pids(path: Path, count: int, timeout: float = 60) -> list[int]:
    """The first `count` process ids that started processes wrote, one per line, into `path`."""
    deadline = time.monotonic() + timeout
    while not (path.exists() and len(path.read_text().split()) >= count):
        assert time.monotonic() < deadline, f"{count} processes did not start: {path.read_text() if path.exists() else 'no pids'}"
        time.sleep(0.1)
    return [int(p) for p in path.read_text().split()]
