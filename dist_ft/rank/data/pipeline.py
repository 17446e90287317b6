"""From data files to packed rows, all in memory: the path the ranks took before the token store.

Kept as the reference the store's rows are tested against (tests/unit/test_token_store.py) and for
benchmarks/data_scale.py's "before" column; no rank calls it.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from transformers import PreTrainedTokenizerBase

from .pack import IGNORE_INDEX, pack_documents, pack_examples
from .select import SourceRows, draw, split_rows
from dist_ft.store.read import BadRows, DataError, read_documents, read_records
from dist_ft.store.sft import sft_example


def tokenize_documents(texts: Sequence[str], tokenizer: PreTrainedTokenizerBase, *, batch_size: int = 1000,
                       num_proc: int | None = None) -> list[list[int]]:
    """Token ids per text, through `datasets.Dataset.map` so large corpora can use several processes.

    No special tokens are added (packing appends EOS), and special-token text
    inside a document (a literal "<|eos|>") stays text.
    """
    def encode(batch: dict[str, list[str]]) -> dict[str, list[list[int]]]:
        return {"input_ids": tokenizer(batch["text"], add_special_tokens=False, split_special_tokens=True)["input_ids"]}

    from datasets import Dataset  # not at import: a rank reads token stores and never needs it (0.4 s)

    dataset = Dataset.from_dict({"text": list(texts)})
    encoded = dataset.map(encode, batched=True, batch_size=batch_size, num_proc=num_proc, remove_columns=["text"],
                          desc="tokenizing")
    return list(encoded["input_ids"])


def pretraining_rows(paths: Sequence[str], text_field: str, tokenizer: PreTrainedTokenizerBase, seq_len: int, *,
                     seed: int, long_docs: str = "split", num_proc: int | None = None
                     ) -> tuple[list[dict[str, list[int]]], BadRows]:
    """Read, shuffle documents (so sources mix within rows; same seed, same rows), tokenize, pack.
    `long_docs` "only" keeps just the documents at least `seq_len` tokens long (split into rows)."""
    documents, bad = read_documents(paths, text_field)
    random.Random(seed).shuffle(documents)
    token_lists = tokenize_documents(documents, tokenizer, num_proc=num_proc)
    if long_docs == "only":
        kept = [ids for ids in token_lists if len(ids) >= seq_len]
        for ids in token_lists:
            if len(ids) < seq_len:
                bad.add("shorter_than_seq_len", f"{len(ids)} tokens")
        token_lists, long_docs = kept, "split"
    rows = pack_documents(token_lists, seq_len, tokenizer.eos_token_id, long_docs,
                          pad_id=tokenizer.pad_token_id, bad=bad)
    if not rows:
        raise DataError(f"no rows left to train on from {', '.join(map(str, paths))}: {bad}")
    return rows, bad


def mixture_rows(sources: Sequence[tuple[Sequence[str], float, str]], text_field: str,
                 tokenizer: PreTrainedTokenizerBase, seq_len: int, *, seed: int, validation_fraction: float = 0.0
                 ) -> tuple[list[dict[str, list[int]]], list[dict[str, list[int]]], BadRows, list[SourceRows]]:
    """(training rows, validation rows, bad rows, the realised mixture) from several (paths, weight,
    long_documents) sources. Each source is packed and split (validation_fraction) on its own; its
    training rows are then drawn so that source i makes up weight_i / sum(weights) of the training
    rows (as many as all sources have together): a source with fewer repeats its rows (up-sampling),
    one with more leaves some out. Validation keeps each source's natural share, and never a copy of a
    training row. A function of the data and the seed only: the same rows on every rank, after a
    resume and at another world size (BatchStream then serves them deterministically)."""
    splits, validation, bad = [], [], BadRows()
    for index, (paths, _, long_docs) in enumerate(sources):
        rows, source_bad = pretraining_rows(paths, text_field, tokenizer, seq_len, seed=seed + index,
                                            long_docs=long_docs)
        train, held_out = split_rows(rows, validation_fraction, seed + index)
        splits.append(train)
        validation += held_out
        bad.merge(source_bad)
    total, weights = sum(map(len, splits)), [weight for _, weight, _ in sources]
    mixed, report = [], []
    for index, ((paths, weight, _), rows) in enumerate(zip(sources, splits)):
        taken = draw(rows, round(total * weight / sum(weights)), random.Random(seed + 7919 * (index + 1)))
        mixed += taken
        report.append(SourceRows(tuple(map(str, paths)), weight, len(rows), len(taken),
                                 sum(_scored(row) for row in taken)))
    random.Random(seed).shuffle(mixed)
    return mixed, validation, bad, report


def _scored(row: dict[str, list[int]]) -> int:
    """The row's scored tokens (list.count runs in C: a mixture of millions of rows is counted in seconds)."""
    labels = row["labels"]
    return len(labels) - labels.count(IGNORE_INDEX)


def sft_rows(paths: Sequence[str], tokenizer: PreTrainedTokenizerBase, fmt: str, template: str | None,
             seq_len: int, *, seed: int, packing: bool = True, text_field: str = "text"
             ) -> tuple[list[dict[str, list[int]]], BadRows]:
    """SFT examples from record files (text files count as {text_field: content}), shuffled, then packed or padded."""
    bad = BadRows()
    examples = []
    for _, record in read_records(paths, bad):
        row = {text_field: record} if isinstance(record, str) else record
        if not isinstance(row, dict):
            bad.add("not_an_object", repr(row)[:120])
        elif (example := sft_example(row, tokenizer, fmt, template, seq_len, text_field=text_field,
                                     bad=bad)) is not None:
            examples.append(example)
    if not examples:
        raise DataError(f"no usable SFT examples in {', '.join(map(str, paths))}: {bad}")
    random.Random(seed).shuffle(examples)
    return pack_examples(examples, seq_len, tokenizer.pad_token_id, packing), bad
