"""Rows for the bundled fine-tuning tasks: each maker draws one instruction row from a seeded RNG."""

from __future__ import annotations

import random
from typing import Callable, Sequence

Row = dict[str, str]


def unique_rows(makers: Sequence[Callable[[random.Random], Row]], count: int, rng: random.Random,
                seen: set[str]) -> list[Row]:
    """`count` rows cycling through `makers`; an (instruction, input) pair in `seen` (or drawn twice) is drawn
    again, so splits that share `seen` never share an input."""
    out: list[Row] = []
    while len(out) < count:
        row = makers[len(out) % len(makers)](rng)
        key = row["instruction"] + row["input"]
        if key not in seen:
            seen.add(key)
            out.append(row)
    return out
