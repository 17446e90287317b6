"""A recipe rendered into a run dir that already holds another plan: what changed, and what the user meant.

Two intents are named on the command line, never guessed: `--fresh` starts over (the old run dir is moved
aside, nothing is deleted) and `--continue` keeps the finished stages and resumes the others from their
checkpoints under the new plan. A change confined to `cluster` (more or fewer nodes or ranks, another
partition, time limit or interpreter) needs neither: where a run trains is not what it trains, so the run
resumes on the new shape from its checkpoints, which DeepSpeed converts for another data-parallel size.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from dist_ft.plan.run_dir import RunDir

FRESH, CONTINUE = "fresh", "continue"
WHERE_IT_RUNS = "cluster"  # the recipe section whose changes leave the training itself as it was


@dataclass(frozen=True)
class Change:
    path: str
    old: Any
    new: Any

    def __str__(self) -> str:
        return f"{self.path}: {_short(self.old)} -> {_short(self.new)}"


def recipe_changes(old_yaml: str, new_yaml: str) -> list[Change]:
    """Every dotted key whose value differs between two resolved recipes, in the new recipe's order."""
    old, new = _flat(yaml.safe_load(old_yaml) or {}), _flat(yaml.safe_load(new_yaml) or {})
    keys = list(new) + [k for k in old if k not in new]
    return [Change(k, old.get(k), new.get(k)) for k in keys if old.get(k) != new.get(k)]


def only_where_it_runs(changes: list[Change]) -> bool:
    return bool(changes) and all(c.path.split(".")[0] == WHERE_IT_RUNS for c in changes)


def what_continues(run: RunDir, stages: list[str]) -> list[str]:
    """Per stage: kept as finished, resumed from a checkpoint, or started (what `--continue` will do)."""
    lines = []
    for name in stages:
        folder = run.stage(name)
        steps = sorted(p.name for p in folder.checkpoints.glob("step_*") if p.is_dir()) \
            if folder.checkpoints.is_dir() else []
        if folder.finished():
            lines.append(f"{name}: finished under the old plan; kept and skipped")
        elif steps:
            lines.append(f"{name}: resumes from its checkpoint {steps[-1]} with the new settings")
        else:
            lines.append(f"{name}: starts from the beginning")
    return lines


def set_aside(run_dir: Path, now: datetime.datetime | None = None) -> Path:
    """Rename the old run dir beside itself (same file system: one atomic rename, nothing copied or lost)."""
    stamp = (now or datetime.datetime.now()).strftime("%Y%m%d-%H%M%S")
    target = run_dir.with_name(f"{run_dir.name}.replaced-{stamp}")
    n = 1
    while target.exists():
        n += 1
        target = run_dir.with_name(f"{run_dir.name}.replaced-{stamp}-{n}")
    run_dir.rename(target)
    return target


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix: tree}
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        flat.update(_flat(value, path) if isinstance(value, dict) and value else {path: value})
    return flat


def _short(value: Any) -> str:
    text = "(unset)" if value is None else repr(value) if isinstance(value, str) else str(value)
    return text if len(text) <= 60 else text[:57] + "..."
