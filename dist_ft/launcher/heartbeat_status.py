"""Reading the ranks' heartbeats (rank/heartbeat.py) for `dist-ft status` and the launchers' failure
messages. A heartbeat is stale when it is older than STALE_BEATS intervals and the rank did not say it
ended: the process is stopped, frozen, swapping or gone without a word."""

from __future__ import annotations

import time
from pathlib import Path

from dist_ft.plan.run_dir import RunDir
from dist_ft.plan.run_records import HeartbeatRow, read_record

STALE_BEATS = 6
MIN_STALE_S = 30.0
EXIT_SILENT_RANK = 124  # a launcher's status when its watch stopped a stage (as timeout(1) exits)


def read_heartbeats(run: RunDir, stage: str) -> list[HeartbeatRow]:
    """Every rank's last beat that can be read (a file cut short or of another shape is left out), by rank."""
    rows = [read_record(path, HeartbeatRow) for path in run.heartbeat_files(stage)]
    return sorted((row for row in rows if row is not None), key=lambda r: r.rank)


def stale_after_s(row: HeartbeatRow) -> float:
    return max(MIN_STALE_S, STALE_BEATS * row.interval_s)


def is_stale(row: HeartbeatRow, now: float) -> bool:
    return not row.ended and now - row.time > stale_after_s(row)


def describe(row: HeartbeatRow, now: float) -> str:
    step = row.step
    where = f"rank {row.rank} on {row.host} (pid {row.pid})"
    at = f"step {step}" if step is not None else "before its first step"
    age = now - row.time
    if row.ended:
        return f"{where}: {row.ended} at {at}"
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

    def silent_rank(self, now: float | None = None) -> HeartbeatRow | None:
        """The first silent rank's heartbeat row (looked at every `every_s` at most), or None."""
        now = time.time() if now is None else now
        if now < self._next_look:
            return None
        self._next_look = now + self.every_s
        return next((row for row in read_heartbeats(self.run, self.stage)
                     if not row.ended and row.started >= self.since
                     and now - row.time > self.after_s), None)

    def message(self, row: HeartbeatRow, now: float | None = None) -> str:
        now = time.time() if now is None else now
        return (f"dist-ft: rank {row.rank} on {row.host} (pid {row.pid}) sent no "
                f"heartbeat for {now - row.time:.0f} s, more than the collective timeout "
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
