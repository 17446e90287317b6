"""From data files to packed rows: the two paths a stage takes (pre-training text, SFT)."""

from __future__ import annotations

import random
from collections.abc import Sequence

from datasets import Dataset
from transformers import PreTrainedTokenizerBase

from .pack import pack_documents, pack_examples
from .read import BadRows, DataError, read_documents, read_records
from .sft import sft_example


def tokenize_documents(texts: Sequence[str], tokenizer: PreTrainedTokenizerBase, *, batch_size: int = 1000,
                       num_proc: int | None = None) -> list[list[int]]:
    """Token ids per text, through `datasets.Dataset.map` so large corpora can use several processes.

    No special tokens are added (packing appends EOS), and special-token text
    inside a document (a literal "<|eos|>") stays text.
    """
    def encode(batch: dict[str, list[str]]) -> dict[str, list[list[int]]]:
        return {"input_ids": tokenizer(batch["text"], add_special_tokens=False, split_special_tokens=True)["input_ids"]}

    dataset = Dataset.from_dict({"text": list(texts)})
    encoded = dataset.map(encode, batched=True, batch_size=batch_size, num_proc=num_proc, remove_columns=["text"],
                          desc="tokenizing")
    return list(encoded["input_ids"])


def pretraining_rows(paths: Sequence[str], text_field: str, tokenizer: PreTrainedTokenizerBase, seq_len: int, *,
                     seed: int, long_docs: str = "split", num_proc: int | None = None
                     ) -> tuple[list[dict[str, list[int]]], BadRows]:
    """Read, shuffle documents (so sources mix within rows; same seed, same rows), tokenize, pack."""
    documents, bad = read_documents(paths, text_field)
    random.Random(seed).shuffle(documents)
    token_lists = tokenize_documents(documents, tokenizer, num_proc=num_proc)
    rows = pack_documents(token_lists, seq_len, tokenizer.eos_token_id, long_docs,
                          pad_id=tokenizer.pad_token_id, bad=bad)
    if not rows:
        raise DataError(f"no rows left to train on from {', '.join(map(str, paths))}: {bad}")
    return rows, bad


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
