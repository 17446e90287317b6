"""Packing token sequences into fixed-length rows that keep documents apart.

transformers 5 isolates packed documents by `position_ids` restarting at 0 —
but only when the forward gets no attention_mask and no cache. So every row here
carries `position_ids`, and no row carries an attention mask.

Labels follow the model's shift (logits at i predict the token at i + 1, i.e.
`labels[i]` is predicted from position i - 1). Wherever a segment starts
(position 0), the previous position belongs to another document, so that label
is -100.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from dist_ft.rank.labels import IGNORE_INDEX
from dist_ft.store.read import BadRows
LONG_DOC_POLICIES = ("split", "truncate", "skip")


class _Row:
    def __init__(self) -> None:
        self.input_ids: list[int] = []
        self.position_ids: list[int] = []
        self.labels: list[int] = []

    def __len__(self) -> int:
        return len(self.input_ids)

    def add_segment(self, input_ids: Sequence[int], labels: Sequence[int]) -> None:
        """Append one segment at positions 0..n-1; its first label is never predicted across the boundary."""
        self.input_ids.extend(input_ids)
        self.position_ids.extend(range(len(input_ids)))
        self.labels.extend([IGNORE_INDEX, *labels[1:]])

    def padded(self, seq_len: int, pad_id: int) -> dict[str, list[int]]:
        # Padding sits after every real token, so causal attention keeps it out of their
        # logits; its positions continue the last segment so it stays one segment.
        missing = seq_len - len(self)
        start = self.position_ids[-1] + 1
        return {"input_ids": self.input_ids + [pad_id] * missing,
                "position_ids": self.position_ids + list(range(start, start + missing)),
                "labels": self.labels + [IGNORE_INDEX] * missing}


def pack_documents(token_lists: Sequence[Sequence[int]], seq_len: int, eos_id: int, long_docs: str = "split", *,
                   pad_id: int | None = None, bad: BadRows | None = None) -> list[dict[str, list[int]]]:
    """Rows of exactly `seq_len` tokens: each document plus EOS, concatenated.

    A document that crosses a row boundary continues in the next row as a new
    segment at position 0 (it cannot see its own head there, so positions restart
    rather than continue). Documents longer than `seq_len` (EOS included):
    "split" cuts them the same way; "truncate" keeps the first `seq_len` tokens
    (no EOS: the text did not end); "skip" drops them (counted in `bad`). The last
    row is padded with `pad_id` (default EOS), label -100, so no data is dropped.
    """
    if long_docs not in LONG_DOC_POLICIES:
        raise ValueError(f"long_docs must be one of {LONG_DOC_POLICIES}, got {long_docs!r}")
    rows, row = [], _Row()
    for document in _with_eos(token_lists, seq_len, eos_id, long_docs, bad):
        while document:
            piece, document = document[:seq_len - len(row)], document[seq_len - len(row):]
            row.add_segment(piece, piece)
            if len(row) == seq_len:
                rows.append(row.padded(seq_len, pad_id if pad_id is not None else eos_id))
                row = _Row()
    if len(row):
        rows.append(row.padded(seq_len, pad_id if pad_id is not None else eos_id))
    return rows


def _with_eos(token_lists: Sequence[Sequence[int]], seq_len: int, eos_id: int, long_docs: str,
              bad: BadRows | None) -> Iterator[list[int]]:
    for index, tokens in enumerate(token_lists):
        document = [*tokens, eos_id]
        if len(document) <= seq_len or long_docs == "split":
            yield document
        elif long_docs == "truncate":
            _count(bad, "truncated", f"document {index} ({len(tokens)} tokens)")
            yield list(tokens[:seq_len])
        else:
            _count(bad, "too_long", f"document {index} ({len(tokens)} tokens)")


def pack_examples(examples: Sequence[dict[str, Any]], seq_len: int, pad_id: int,
                  packing: bool = True) -> list[dict[str, list[int]]]:
    """Rows of `seq_len` from SFT examples (`input_ids`, `labels`, each at most seq_len long).

    Examples are never split: with `packing`, each goes into the current row
    while it fits, else starts a new one; without, one example per row. Rows are
    padded (label -100). Each example's own labels are kept, except at its first
    position, which would be predicted from the previous example.
    """
    rows, row = [], _Row()
    for example in examples:
        if len(example["input_ids"]) > seq_len:
            raise ValueError(f"an example of {len(example['input_ids'])} tokens exceeds seq_len {seq_len}")
        if len(row) and (not packing or len(row) + len(example["input_ids"]) > seq_len):
            rows.append(row.padded(seq_len, pad_id))
            row = _Row()
        row.add_segment(example["input_ids"], example["labels"])
    if len(row):
        rows.append(row.padded(seq_len, pad_id))
    return rows


def _count(bad: BadRows | None, reason: str, example: str) -> None:
    if bad is not None:
        bad.add(reason, example)
