"""Fine-tuning examples into rows of seq_len (never split): row boundaries from the examples' lengths alone.
Below both `prepare` (which reports the packing efficiency per stage) and the ranks (which pack by them)."""

from __future__ import annotations

import bisect

import numpy as np


def next_fit(lengths: list[int], seq_len: int, packing: bool) -> list[int]:
    """Row boundaries (indices into the examples): each row takes examples while they fit."""
    bounds, used = [0], 0
    for index, length in enumerate(lengths):
        if used and (not packing or used + length > seq_len):
            bounds.append(index)
            used = 0
        used += length
    return bounds + [len(lengths)] if lengths else bounds


def best_fit_decreasing(lengths: np.ndarray, seq_len: int) -> tuple[np.ndarray, list[int]]:
    """(examples grouped by row, row boundaries): longest first, each into the open row it fills best
    (the least room left that still fits), else a new row. Never worse than first-fit decreasing's bound
    (11/9 of the optimum + 6/9 rows). O(n log n + n * distinct room values)."""
    rows: list[list[int]] = []
    by_room: dict[int, list[int]] = {}  # room left -> rows with that room
    rooms: list[int] = []  # the distinct rooms with a row, sorted
    for example in np.argsort(-lengths, kind="stable").tolist():
        need = int(lengths[example])
        at = bisect.bisect_left(rooms, need)
        if at < len(rooms):
            room = rooms[at]
            row = by_room[room].pop()
            if not by_room[room]:
                del by_room[room], rooms[at]
        else:
            room, row = seq_len, len(rows)
            rows.append([])
        rows[row].append(example)
        left = room - need
        if left not in by_room:
            by_room[left] = []
            bisect.insort(rooms, left)
        by_room[left].append(row)
    bounds = np.cumsum([0] + [len(r) for r in rows]).tolist()
    return np.asarray([e for r in rows for e in r], dtype=np.int64), bounds


def packing_efficiency(lengths: np.ndarray, prompts: np.ndarray, seq_len: int, method: str) -> tuple[int, float]:
    """(rows, real tokens / row tokens) of examples packed at seq_len, as a stage does (a prompt that fills
    seq_len drops the example, a longer one is cut); next_fit in the store's order (a stage shuffles first)."""
    take = np.minimum(lengths[prompts < seq_len], seq_len)
    rows = len(best_fit_decreasing(take, seq_len)[1]) - 1 if method == "best_fit_decreasing" else \
        len(next_fit(take.tolist(), seq_len, True)) - 1
    return rows, float(take.sum() / max(1, rows * seq_len))
