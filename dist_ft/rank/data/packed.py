"""Packed rows computed from a token store's lengths alone, and materialized one at a time from its memory map.

The rows are exactly what pack_documents / pack_examples build from the same documents in the same
order (tests/unit/test_token_store.py compares them), but a rank holds only O(documents) integer arrays,
never the tokens: row i of a documents stage is the slice [i*L, (i+1)*L) of the shuffled documents'
concatenation (each with its EOS), positions restarting at each document and at the row start.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import numpy as np

from dist_ft.store import IGNORE_INDEX, BadRows, TokenStore
from dist_ft.store.bins import best_fit_decreasing, next_fit
from .pack import LONG_DOC_POLICIES

Row = dict[str, list[int]]


def shuffled(count: int, seed: int) -> np.ndarray:
    """The order `random.Random(seed).shuffle` gives a list of `count` items (the in-memory path's order):
    its Fisher-Yates loop, run on an int64 array rather than a list of `count` Python ints."""
    order = np.arange(count, dtype=np.int64)
    randbelow = random.Random(seed)._randbelow  # what Random.shuffle draws with
    for i in range(count - 1, 0, -1):
        j = randbelow(i + 1)
        order[i], order[j] = order[j], order[i]
    return order


class PackedDocuments(Sequence):
    """Rows of `seq_len` from a documents store, in the order of the documents shuffled with `seed`.

    `long_docs` as pack_documents (split, truncate, skip) plus "only": keep the documents at least
    seq_len tokens long, split. What is cut or left out is counted in `bad`. `upsample` (min_tokens,
    factor): each document of at least min_tokens appears `factor` times among those shuffled."""

    def __init__(self, store: TokenStore, seq_len: int, *, seed: int, long_docs: str, bad: BadRows,
                 upsample: tuple[int, int] | None = None) -> None:
        if long_docs not in (*LONG_DOC_POLICIES, "only"):
            raise ValueError(f"long_docs must be one of {LONG_DOC_POLICIES + ('only',)}, got {long_docs!r}")
        self.store, self.seq_len = store, seq_len
        self.eos, self.pad = store.manifest["eos_id"], store.manifest["pad_id"]
        self.upsample = upsample
        order = _candidates(store, upsample)[shuffled(store.count + _extra(store, upsample), seed)] \
            if upsample and upsample[1] > 1 else shuffled(store.count, seed)
        lengths = store.lengths()[order]
        self.order, lengths = self._policy(order, lengths, long_docs, bad)
        cut = (lengths + 1 > seq_len) if long_docs == "truncate" else np.zeros(len(lengths), bool)
        self.take = np.where(cut, seq_len, lengths)
        self.eos_flag = (~cut).astype(np.int64)  # a truncated document gets no EOS: its text did not end
        self.ends = np.cumsum(self.take + self.eos_flag)
        self.starts = self.ends - self.take - self.eos_flag
        self.total = int(self.ends[-1]) if len(self.ends) else 0

    def _policy(self, order: np.ndarray, lengths: np.ndarray, long_docs: str,
                bad: BadRows) -> tuple[np.ndarray, np.ndarray]:
        if long_docs == "only":
            short = lengths < self.seq_len
            _count(bad, "shorter_than_seq_len", short, lambda i: f"{lengths[i]} tokens")
            return order[~short], lengths[~short]
        long = lengths + 1 > self.seq_len
        if long_docs == "truncate":
            _count(bad, "truncated", long, lambda i: f"document {i} ({lengths[i]} tokens)")
        elif long_docs == "skip":
            _count(bad, "too_long", long, lambda i: f"document {i} ({lengths[i]} tokens)")
            return order[~long], lengths[~long]
        return order, lengths

    def __len__(self) -> int:
        return -(-self.total // self.seq_len)

    def __getitem__(self, index: int) -> Row:
        if not 0 <= index < len(self):
            raise IndexError(index)
        low, high = index * self.seq_len, min((index + 1) * self.seq_len, self.total)
        row = _RowBuilder()
        for j in range(int(np.searchsorted(self.ends, low, side="right")), len(self.ends)):
            start = int(self.starts[j])
            if start >= high:
                break
            begin, stop, take = max(low, start) - start, min(high, int(self.ends[j])) - start, int(self.take[j])
            first = int(self.store.offsets[self.order[j]])
            piece = self.store.tokens[first + begin:first + min(stop, take)].tolist()
            row.add(piece + [self.eos] * (stop > take), None)
        return row.padded(self.seq_len, self.pad)

    def long_share(self, min_tokens: int) -> float:
        """The share of this source's tokens that come from documents of at least min_tokens tokens."""
        long = self.store.lengths()[self.order] >= min_tokens
        return float(self.take[long].sum() / max(1, self.take.sum()))

    def scored(self, rows: np.ndarray) -> int:
        """Tokens with a label in `rows`: real tokens less one per segment (its first label is -100)."""
        low = rows * self.seq_len
        high = np.minimum(low + self.seq_len, self.total)
        inside = np.searchsorted(self.starts, high, side="left") - np.searchsorted(self.starts, low, side="right")
        return int(((high - low) - (1 + inside)).sum())


def _candidates(store: TokenStore, upsample: tuple[int, int]) -> np.ndarray:
    """Every document once, then factor - 1 more copies of each long one."""
    long = np.flatnonzero(store.lengths() >= upsample[0])
    return np.concatenate([np.arange(store.count), np.tile(long, upsample[1] - 1)])


def _extra(store: TokenStore, upsample: tuple[int, int]) -> int:
    return int((store.lengths() >= upsample[0]).sum()) * (upsample[1] - 1)


class PackedExamples(Sequence):
    """Rows of `seq_len` from an examples store: the stage's seq_len rules (a prompt that fills it drops the
    example, a longer one is cut), the examples shuffled with `seed`, then packed next-fit (or one per
    row; or best-fit decreasing, `method`), never split. Labels are the tokens where the store's mask says
    trained."""

    def __init__(self, store: TokenStore, seq_len: int, *, seed: int, packing: bool, bad: BadRows,
                 method: str = "next_fit") -> None:
        self.store, self.seq_len, self.pad = store, seq_len, store.manifest["pad_id"]
        lengths, prompts = store.lengths(), np.asarray(store.prompt_lengths)
        fits = prompts < seq_len
        _count(bad, "prompt_too_long", ~fits, lambda i: f"example {i} ({prompts[i]} prompt tokens)")
        _count(bad, "truncated", fits & (lengths > seq_len), lambda i: f"example {i} ({lengths[i]} tokens)")
        kept = np.flatnonzero(fits)
        self.order = kept[shuffled(len(kept), seed)]
        self.take = np.minimum(lengths[self.order], seq_len)
        if packing and method == "best_fit_decreasing":
            self.members, bounds = best_fit_decreasing(self.take, seq_len)
        else:
            self.members, bounds = np.arange(len(self.take)), next_fit(self.take.tolist(), seq_len, packing)
        self.bounds = np.asarray(bounds, dtype=np.int64)

    @property
    def efficiency(self) -> float:
        """Real tokens / row tokens: what packing left as padding."""
        return float(self.take.sum() / max(1, len(self) * self.seq_len))

    def __len__(self) -> int:
        return len(self.bounds) - 1

    def __getitem__(self, index: int) -> Row:
        if not 0 <= index < len(self):
            raise IndexError(index)
        row = _RowBuilder()
        for j in self.members[int(self.bounds[index]):int(self.bounds[index + 1])].tolist():
            first = int(self.store.offsets[self.order[j]])
            span = slice(first, first + int(self.take[j]))
            ids = self.store.tokens[span].astype(np.int64)
            row.add(ids.tolist(), np.where(self.store.mask[span] == 1, ids, IGNORE_INDEX).tolist())
        return row.padded(self.seq_len, self.pad)


class _RowBuilder:
    def __init__(self) -> None:
        self.ids: list[int] = []
        self.positions: list[int] = []
        self.labels: list[int] = []

    def add(self, ids: list[int], labels: list[int] | None) -> None:
        """A segment at positions 0..n-1; its first label is never predicted across the boundary."""
        self.ids += ids
        self.positions += range(len(ids))
        self.labels += [IGNORE_INDEX, *(ids if labels is None else labels)[1:]]

    def padded(self, seq_len: int, pad: int) -> Row:
        # as pack._Row: padding after every real token, positions continuing the last segment, label -100
        missing, start = seq_len - len(self.ids), self.positions[-1] + 1
        return {"input_ids": self.ids + [pad] * missing,
                "position_ids": self.positions + list(range(start, start + missing)),
                "labels": self.labels + [IGNORE_INDEX] * missing}


def _count(bad: BadRows, reason: str, where: np.ndarray, show) -> None:
    hits = np.flatnonzero(where)
    if len(hits):
        bad.counts[reason] += len(hits)
        bad.examples.setdefault(reason, []).extend(show(i)[:200] for i in hits[:3])
        del bad.examples[reason][3:]


class RowSet(Sequence):
    """Rows picked from packed sources by (source, row) index arrays: a split, a mixture, or all of one."""

    def __init__(self, parts: Sequence[Sequence[Row]], source: np.ndarray, row: np.ndarray) -> None:
        self.parts, self.source, self.row = parts, np.asarray(source, np.int64), np.asarray(row, np.int64)

    @classmethod
    def of(cls, part: Sequence[Row]) -> RowSet:
        return cls([part], np.zeros(len(part), np.int64), np.arange(len(part)))

    def __len__(self) -> int:
        return len(self.row)

    def __getitem__(self, index: int) -> Row:
        if not 0 <= index < len(self):
            raise IndexError(index)
        return self.parts[int(self.source[index])][int(self.row[index])]

    def pick(self, indices: Sequence[int]) -> RowSet:
        chosen = np.asarray(indices, np.int64)
        return RowSet(self.parts, self.source[chosen], self.row[chosen])
