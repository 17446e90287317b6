"""Choosing rows by index: the validation split and a weighted mixture of sources. Functions of the row
counts and the seed only, so every rank, a resume and another world size pick the same rows."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .packed import PackedDocuments, RowSet, shuffled


def split_rows(rows: list, fraction: float, seed: int) -> tuple[list, list]:
    """(training, validation): a seeded `fraction` of the rows held out (at least one when asked)."""
    if not fraction:
        return rows, []
    order = list(range(len(rows)))
    random.Random(seed + 1).shuffle(order)
    count = max(1, int(len(rows) * fraction))
    return [rows[i] for i in order[count:]], [rows[i] for i in order[:count]]


def draw(rows: list, count: int, rng: random.Random) -> list:
    """`count` of `rows`: whole copies first, then a seeded sample without repeats for the rest."""
    copies, rest = divmod(count, len(rows))
    return rows * copies + rng.sample(rows, rest)


def split_set(rows: RowSet, fraction: float, seed: int) -> tuple[RowSet, RowSet]:
    """split_rows over a RowSet's positions: the same choice as over a list of its rows."""
    if not fraction:
        return rows, rows.pick([])
    order = shuffled(len(rows), seed + 1)
    count = max(1, int(len(rows) * fraction))
    return rows.pick(order[count:]), rows.pick(order[:count])


@dataclass(frozen=True)
class SourceRows:
    """What one source of a mixture gave: its rows, and how many of them the mixture took."""
    paths: tuple[str, ...]
    weight: float
    available: int
    taken: int
    scored_tokens: int
    long_share: float | None = None  # with upsample_long: the share of its tokens in long documents


def mix(sources: Sequence[tuple[Sequence[str], float, PackedDocuments]], seed: int,
        validation_fraction: float) -> tuple[RowSet, RowSet, list[SourceRows]]:
    """(training rows, validation rows, the realised mixture) of (paths, weight, packed rows) sources.

    Each source is split (validation_fraction, seed + its index) on its own; its training rows are then
    drawn so that source i makes up weight_i / sum(weights) of the training rows (as many as all sources
    have together): a source with fewer repeats rows (up-sampling), one with more leaves some out.
    Validation keeps each source's natural share, never a copy of a training row."""
    parts = [packed for _, _, packed in sources]
    splits, held = [], []
    for index, packed in enumerate(parts):
        train, validation = split_rows(list(range(len(packed))), validation_fraction, seed + index)
        splits.append(train)
        held += [(index, row) for row in validation]
    total, weights = sum(map(len, splits)), [weight for _, weight, _ in sources]
    mixed, report = [], []
    for index, ((paths, weight, packed), rows) in enumerate(zip(sources, splits)):
        taken = draw(rows, round(total * weight / sum(weights)), random.Random(seed + 7919 * (index + 1)))
        mixed += [(index, row) for row in taken]
        report.append(SourceRows(tuple(map(str, paths)), weight, len(rows), len(taken),
                                 packed.scored(np.asarray(taken, np.int64)),
                                 packed.long_share(packed.upsample[0]) if packed.upsample else None))
    random.Random(seed).shuffle(mixed)
    return _set(parts, mixed), _set(parts, held), report


def _set(parts: list, pairs: list[tuple[int, int]]) -> RowSet:
    table = np.asarray(pairs, np.int64).reshape(-1, 2)
    return RowSet(parts, table[:, 0], table[:, 1])
