"""Reading the ranks' heartbeats (rank/heartbeat.py) for `dist-ft status` and the launchers' failure
messages. A heartbeat is stale when it is older than STALE_BEATS intervals and the rank did not say it
ended: the process is stopped, frozen, swapping or gone without a word."""

from __future__ import annotations

import json
import time
from pathlib import Path

from dist_ft.plan.run_dir import RunDir

STALE_BEATS = 6
MIN_STALE_S = 30.0
EXIT_SILENT_RANK = 124  # a launcher's status when its watch stopped a stage (as timeout(1) exits)


def read_heartbeats(run: RunDir, stage: str) -> list[dict]:
    folder = run.path / "heartbeats" / stage
    out = []
    for path in sorted(folder.glob("rank*.json")) if folder.is_dir() else []:
        try:
            row = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(row, dict) and isinstance(row.get("rank"), int) and isinstance(row.get("time"), (int, float)):
            out.append(row)
    return sorted(out, key=lambda r: r["rank"])


def stale_after_s(row: dict) -> float:
    interval = row.get("interval_s")
    return max(MIN_STALE_S, STALE_BEATS * interval) if isinstance(interval, (int, float)) else MIN_STALE_S


def is_stale(row: dict, now: float) -> bool:
    return not row.get("ended") and now - row["time"] > stale_after_s(row)


def describe(row: dict, now: float) -> str:
    step = row.get("step")
    where = f"rank {row['rank']} on {row.get('host', '?')} (pid {row.get('pid', '?')})"
    at = f"step {step}" if step is not None else "before its first step"
    age = now - row["time"]
    if row.get("ended"):
        return f"{where}: {row['ended']} at {at}"
    state = f"STALE: no heartbeat for {age:.0f} s (stopped, frozen or killed)" if is_stale(row, now) else \
        f"alive {age:.0f} s ago"
    return f"{where}: {at}, {state}"


def stale_lines(run: RunDir, stage: str, world_size: int | None = None, now: float | None = None) -> list[str]:
    """One line per rank whose heartbeat is stale; empty when every rank beats (or none ever did)."""
    now = time.time() if now is None else now
    return ["stuck: " + describe(row, now) for row in read_heartbeats(run, stage) if is_stale(row, now)]


class HangWatch:
    """The launchers' watchdog for one attempt of a stage: names the first rank whose heartbeat has been
    silent for longer than `after_s` (the recipe's collective timeout). A stopped or frozen rank stalls
    the others in whatever collective comes next, and DeepSpeed's own process groups wait torch's default
    30 minutes, not the recipe's timeout; the heartbeat does not depend on which collective it is.
    Heartbeats older than the watch (a previous launch's) are not this attempt's and are ignored."""

    def __init__(self, run: RunDir, stage: str, after_s: float, every_s: float = 5.0, since: float | None = None):
        self.run, self.stage, self.after_s, self.every_s = run, stage, after_s, every_s
        self.since = time.time() if since is None else since
        self._next_look = 0.0

    def silent_rank(self, now: float | None = None) -> dict | None:
        """The first silent rank's heartbeat row (looked at every `every_s` at most), or None."""
        now = time.time() if now is None else now
        if now < self._next_look:
            return None
        self._next_look = now + self.every_s
        return next((row for row in read_heartbeats(self.run, self.stage)
                     if not row.get("ended") and row.get("started", 0) >= self.since
                     and now - row["time"] > self.after_s), None)

    def message(self, row: dict, now: float | None = None) -> str:
        now = time.time() if now is None else now
        return (f"dist-ft: rank {row['rank']} on {row.get('host', '?')} (pid {row.get('pid', '?')}) sent no "
                f"heartbeat for {now - row['time']:.0f} s, more than the collective timeout "
                f"({self.after_s:.0f} s): it is stopped, frozen or swapping; stopping the stage")


def heartbeat_report(run_dir: Path, stages: list[str], now: float | None = None) -> list[str]:
    """For `dist-ft status`: every rank of the stages that have heartbeats, stale ones flagged."""
    now = time.time() if now is None else now
    lines = []
    for stage in stages:
        rows = read_heartbeats(RunDir(run_dir), stage)
        if not rows:
            continue
        stale = sum(is_stale(r, now) for r in rows)
        lines.append(f"[{stage}] heartbeats: {len(rows)} rank(s)" + (f", {stale} STALE" if stale else ""))
        lines += ["  " + describe(r, now) for r in rows]
    return lines
