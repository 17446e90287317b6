"""The records one process of a run writes and another reads back: typed, frozen, strictly reloaded.

    DoneMarker    RUN/stages/<stage>/DONE                      rank 0 (trainer) -> summary, status
    HeartbeatRow  RUN/heartbeats/<stage>/rank<N>.json          every rank -> status, the launchers' watch
    SshRecord     RUN/ssh.json                                 the ssh launcher -> status, cancel
    NodeRecord    RUN/control/nodes/<stage>.node<N>.json       the ssh node agent -> status, cancel

As with plan.json (`Plan.from_json`), `from_json` rebuilds a record through the recipe's strict loader: an
unknown key, a missing field or a wrong type is an error, never a silently empty value. `write_record` is
the one writer (whole file, tmp + rename: a reader never sees half a record) and `read_record` the one
reader (None when the file is missing, cut short or not such a record). Where each file lives is RunDir's.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, TypeVar

from dist_ft.recipe.strict import RecipeError, build

R = TypeVar("R", bound="RunRecord")


class RunRecord:
    """JSON in and out, for the frozen dataclasses below."""

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls: type[R], text: str) -> R:
        """The record, every field checked by the loader that reads recipes and plans. Raises ValueError."""
        try:
            return build(cls, json.loads(text))
        except (ValueError, RecipeError) as err:
            raise ValueError(f"not a valid {cls.__name__}: {err}") from None


def write_record(path: Path, record: RunRecord) -> None:
    """`record` as `path`, whole: written beside it under this process's name, then renamed over it."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(record.to_json() + "\n")
    os.replace(tmp, path)


def read_record(path: Path, kind: type[R]) -> R | None:
    """The `kind` record in `path`, or None when there is none, it is cut short or it is not one."""
    try:
        return kind.from_json(path.read_text())
    except (OSError, ValueError):
        return None


@dataclass(frozen=True)
class BestWeights:
    """Under early stopping: the evaluation whose weights the stage exported."""
    step: int
    metric: str
    value: float


@dataclass(frozen=True)
class DoneMarker(RunRecord):
    """The stage's export is complete (written by rank 0 last, so a DONE stage has its model on disk)."""
    step: int
    outcome: Literal["finished", "early_stopped"]
    best: BestWeights | None = None
    test: dict[str, float | None] | None = None  # the test metrics on the exported weights (`finite_values`)


def finite_values(values: dict[str, float]) -> dict[str, float | None]:
    """Metric values as a record holds them: a non-finite one (a perplexity over no tokens) as None, since
    JSON has no NaN and the strict loader refuses one."""
    return {name: value if math.isfinite(value) else None for name, value in values.items()}


@dataclass(frozen=True)
class HeartbeatRow(RunRecord):
    """A rank's beat: who it is, where, and the step it is at (None: before its first)."""
    rank: int
    host: str  # the hostfile's name for the host (DIST_FT_HOST), else its hostname
    hostname: str
    pid: int
    restart: int
    started: float  # when the rank started beating (epoch seconds)
    interval_s: float
    step: int | None
    time: float  # this beat (epoch seconds)
    ended: str | None = None  # the rank's last word: the loop's outcome (no longer beating, never stale)


@dataclass(frozen=True)
class LauncherProcess:
    host: str
    pid: int


@dataclass(frozen=True)
class StageAttempt:
    """One stage as the ssh launcher last ran it."""
    state: Literal["running", "done", "stopped", "failed"]
    attempt: int | None = None
    started: str | None = None  # local time, ISO 8601
    endpoint: str | None = None  # the rendezvous HOST:PORT
    hosts: list[str] = field(default_factory=list)
    ended: str | None = None
    exit: int | None = None


@dataclass(frozen=True)
class SshRecord(RunRecord):
    """The ssh backend's run: its hosts, the launcher process and each stage's last attempt."""
    hosts: list[str]
    launcher: LauncherProcess
    started: str
    stages: dict[str, StageAttempt] = field(default_factory=dict)
    backend: Literal["ssh"] = "ssh"

    def with_stage(self, name: str, attempt: StageAttempt) -> "SshRecord":
        return dataclasses.replace(self, stages={**self.stages, name: attempt})


@dataclass(frozen=True)
class NodeRecord(RunRecord):
    """One host's node agent for one attempt of a stage (`dist-ft cancel` signals its pid)."""
    host: str
    hostname: str
    pid: int
    node_rank: int
    attempt: int
    started: float
    endpoint: str
