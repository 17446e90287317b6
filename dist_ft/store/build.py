"""Building a token store (prepare's work) and opening one whose sources are unchanged (a rank's).

The source is streamed: records are read, tokenized a chunk at a time (in worker processes when
`workers` > 1, at most a few chunks in flight) and appended to the store's files, so memory stays
flat whatever the corpus size.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from collections import Counter, deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Callable

import numpy as np
from tqdm import tqdm

from dist_ft.durable import fsync_dir, write_atomic
from .format import (DOCUMENTS, EXAMPLES, FORMAT_VERSION, IGNORE_INDEX, MANIFEST, MASK, OFFSETS, PROMPTS, TOKENS,
                     StoreError, TokenStore, open_store, token_dtype)
from .key import SourceSpec, content_key, spec_json, source_stamps, stale_files, store_path, tokenizer_fingerprint
from .read import BadRows, DataError, iter_documents, read_records
from .sft import sft_example

CHUNK_RECORDS = 512  # records per tokenizer call: big enough to amortise the call, small enough to stream
# ... or this many characters: prepare's peak memory is one call's tokenizer output (hundreds of bytes a token)
# or its largest document's: 8 MB calls peaked at 1.24 GB RSS on 0.01 GB of text, 1 MB calls at 0.64 GB
# (byte tokenizer, docs/data.md)
CHUNK_CHARS = 1 << 20
NO_LIMIT = sys.maxsize  # prepare keeps whole examples; each stage applies its own seq_len when packing


def open_source(spec: SourceSpec, tokenizer: Any, root: Path, rebuild: str) -> TokenStore:
    """The store of `spec`, refused (StoreError naming `rebuild`) when missing, damaged, or built from
    files that have changed since."""
    store = open_store(store_path(root, spec, tokenizer_fingerprint(tokenizer)), rebuild)
    changed = stale_files(store.manifest["sources"], source_stamps(spec))
    if changed:
        shown = ", ".join(changed[:3]) + (f" and {len(changed) - 3} more" if len(changed) > 3 else "")
        raise StoreError(f"the token store {store.path} is stale: {shown} changed since it was built: run "
                         f"`{rebuild}`")
    return store


def build_store(spec: SourceSpec, tokenizer: Any, root: Path, *, workers: int = 1,
                progress: bool = True) -> tuple[TokenStore, bool]:
    """(the store of `spec`, whether it was built now): an existing whole, fresh store is reused."""
    try:
        return open_source(spec, tokenizer, root, "dist-ft prepare"), False
    except StoreError:
        pass
    fingerprint = tokenizer_fingerprint(tokenizer)
    path = store_path(root, spec, fingerprint)
    root.mkdir(parents=True, exist_ok=True)
    stamps = source_stamps(spec)  # before reading: a file changed meanwhile makes the store stale, not wrong
    tmp = root / f".{path.name}.tmp-{os.getpid()}-{time.time_ns()}"
    tmp.mkdir()
    try:
        writer = _Writer(tmp, token_dtype(len(tokenizer)), spec.kind == EXAMPLES)
        # progress in bytes of the source files (so it has an ETA), the tokens/s beside it
        with writer, tqdm(desc=f"tokenizing {spec.describe()}", total=sum(s[1] for s in stamps), unit="B",
                          unit_scale=True, file=sys.stderr, disable=not progress, mininterval=1.0) as bar:
            bad = _tokenize_into(writer, spec, tokenizer, workers, _Progress(bar))
        if spec.kind == EXAMPLES:
            check_format(spec, writer.count, bad)
        if not writer.count:
            raise DataError(f"no usable {spec.kind} in {', '.join(spec.paths)}: {bad}")
        manifest = {"format_version": FORMAT_VERSION, "key": content_key(spec, fingerprint, stamps),
                    "kind": spec.kind, "spec": spec_json(spec),
                    "tokenizer": fingerprint, "dtype": writer.dtype.name, "count": writer.count,
                    "tokens": writer.end, "eos_id": tokenizer.eos_token_id, "pad_id": tokenizer.pad_token_id,
                    "sources": stamps, "bad_rows": dict(bad.counts), "bad_examples": bad.examples,
                    "length_histogram": writer.histogram(), "files": writer.sizes()}
        write_atomic(tmp / MANIFEST, json.dumps(manifest, indent=1))  # last: the store is whole from here
        if not _same_store_there(path, manifest["key"]):  # another prepare may have finished it meanwhile
            _move_into_place(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return open_source(spec, tokenizer, root, "dist-ft prepare"), True


FORMAT_REASONS = ("missing_field", "bad_messages", "not_an_object")  # a row without the format's fields
FORMAT_WANTS = {"instruction": "`instruction` and `output` strings (`input` optional)",
                "chat": "`messages` [{role, content}] or ShareGPT `conversations` [{from, value}]"}


def check_format(spec: SourceSpec, kept: int, bad: BadRows) -> None:
    """Refuse (DataError) fine-tuning files of which more than half the rows lack their format's fields: the
    recipe names the wrong format (or the rows' columns need `data.columns`), not a few bad rows."""
    wrong = sum(bad.counts[reason] for reason in FORMAT_REASONS)
    if wrong <= kept:
        return
    example = next(e for reason in FORMAT_REASONS for e in bad.examples.get(reason, []))
    wants = FORMAT_WANTS.get(spec.fmt, f"a non-empty `{spec.text_field}` string")
    mapped = f" (columns mapped: {dict(spec.columns)})" if spec.columns else ""
    raise DataError(f"{wrong} of {wrong + kept} rows of {', '.join(spec.paths)} do not fit format {spec.fmt!r}, "
                    f"which reads {wants}{mapped}; e.g. {example}. Set `finetune.format` to what the rows are, or "
                    "map their fields with `data.columns` (e.g. `columns: {instruction: question, output: answer}`)")


def _same_store_there(path: Path, key: str) -> bool:
    try:
        return open_store(path, "dist-ft prepare").manifest["key"] == key
    except (StoreError, OSError):
        return False


def _move_into_place(tmp: Path, path: Path) -> None:
    """Rename the finished folder to the store's name; a stale or broken store there is moved aside first
    (a running job's memory maps keep reading the old files)."""
    if path.exists():
        old = path.with_name(f".{path.name}.old-{os.getpid()}-{time.time_ns()}")
        os.rename(path, old)
        shutil.rmtree(old, ignore_errors=True)
    os.rename(tmp, path)
    fsync_dir(path.parent)


class _Writer:
    """Appends tokenized chunks to the store's files; only counters and a histogram stay in memory."""

    def __init__(self, folder: Path, dtype: np.dtype, examples: bool) -> None:
        self.folder, self.dtype, self.examples = folder, dtype, examples
        names = [TOKENS, OFFSETS] + ([MASK, PROMPTS] if examples else [])
        self.files = {name: open(folder / name, "wb") for name in names}
        self.files[OFFSETS].write(np.zeros(1, np.int64).tobytes())
        self.end, self.count, self.bins = 0, 0, Counter()

    def add(self, token_lists: list[list[int]], masks: list[list[int]] | None = None,
            prompts: list[int] | None = None) -> None:
        lengths = np.fromiter(map(len, token_lists), np.int64, count=len(token_lists))
        flat = np.fromiter((t for ids in token_lists for t in ids), self.dtype, count=int(lengths.sum()))
        self.files[TOKENS].write(flat.tobytes())
        self.files[OFFSETS].write((self.end + np.cumsum(lengths)).tobytes())
        if self.examples:
            self.files[MASK].write(np.fromiter((m for mask in masks for m in mask), np.uint8,
                                               count=len(flat)).tobytes())
            self.files[PROMPTS].write(np.asarray(prompts, np.int64).tobytes())
        self.end += int(lengths.sum())
        self.count += len(token_lists)
        buckets, counts = np.unique(_bucket(lengths), return_counts=True)
        self.bins.update(dict(zip(buckets.tolist(), counts.tolist())))

    def histogram(self) -> dict[str, int]:
        """Documents per length band: key k counts lengths in (2^(k-1), 2^k] (0: empty)."""
        return {str(1 << int(k) if k else 0): int(n) for k, n in sorted(self.bins.items())}

    def sizes(self) -> dict[str, int]:
        return {name: (self.folder / name).stat().st_size for name in self.files}

    def __enter__(self) -> _Writer:
        return self

    def __exit__(self, *exc: Any) -> None:
        for handle in self.files.values():
            handle.flush()
            os.fsync(handle.fileno())
            handle.close()


def _bucket(lengths: np.ndarray) -> np.ndarray:
    """ceil(log2(length)), 0 for lengths 0 and 1."""
    return np.ceil(np.log2(np.maximum(lengths, 1))).astype(np.int64)


class _Progress:
    """The bar advances by the characters read (about the bytes of the files); tokens/s in its postfix."""

    def __init__(self, bar: tqdm) -> None:
        self.bar, self.tokens, self.start = bar, 0, time.perf_counter()

    def update(self, chars: int, tokens: int) -> None:
        self.tokens += tokens
        self.bar.set_postfix_str(f"{self.tokens / max(1e-9, time.perf_counter() - self.start) / 1e6:.2f}M tok/s",
                                 refresh=False)
        self.bar.update(chars)


def _tokenize_into(writer: _Writer, spec: SourceSpec, tokenizer: Any, workers: int, bar: _Progress) -> BadRows:
    bad = BadRows()
    if spec.kind == DOCUMENTS:
        chunks, encode, args = _chunks(iter_documents(spec.paths, spec.text_field, bad), len), encode_texts, ()
    else:
        chunks, encode = _chunks(_example_rows(spec, bad), lambda row: len(str(row))), encode_rows
        args = (spec.fmt, spec.template, spec.text_field)
    for result, chars in _mapped(encode, chunks, args, tokenizer, workers):
        if spec.kind == DOCUMENTS:
            writer.add(result)
            bar.update(chars, sum(map(len, result)))
        else:
            examples, chunk_bad = result
            bad.merge(chunk_bad)
            if examples:
                writer.add([e[0] for e in examples], [e[1] for e in examples], [e[2] for e in examples])
            bar.update(chars, sum(len(e[0]) for e in examples))
    return bad


def _example_rows(spec: SourceSpec, bad: BadRows) -> Iterator[dict]:
    """Fine-tuning rows as sft_rows reads them: a text file is one {text_field: content} row."""
    for _, record in read_records(spec.paths, bad):
        row = {spec.text_field: record} if isinstance(record, str) else record
        if isinstance(row, dict):
            yield spec.renamed(row)
        else:
            bad.add("not_an_object", repr(row)[:120])


def _chunks(items: Iterable[Any], size: Callable[[Any], int]) -> Iterator[tuple[list[Any], int]]:
    """(records, their characters) of at most CHUNK_RECORDS records or about CHUNK_CHARS characters."""
    chunk, chars = [], 0
    for item in items:
        chunk.append(item)
        chars += size(item)
        if len(chunk) >= CHUNK_RECORDS or chars >= CHUNK_CHARS:
            yield chunk, chars
            chunk, chars = [], 0
    if chunk:
        yield chunk, chars


# ---- tokenizing, in this process or a pool of them -----------------------------------------------

_TOKENIZER: Any = None  # a worker's own copy, set once by _start_worker


def _start_worker(tokenizer: Any) -> None:
    global _TOKENIZER
    _TOKENIZER = tokenizer


def encode_texts(texts: list[str], tokenizer: Any = None) -> list[list[int]]:
    """Token ids per text, as training saw them: no special tokens added (packing appends EOS), and
    special-token text inside a document (a literal "<|eos|>") stays text."""
    tokenizer = tokenizer or _TOKENIZER
    return tokenizer(texts, add_special_tokens=False, split_special_tokens=True,
                     return_attention_mask=False)["input_ids"]


def encode_rows(rows: list[dict], fmt: str, template: str | None, text_field: str,
                tokenizer: Any = None) -> tuple[list[tuple[list[int], list[int], int]], BadRows]:
    """(ids, trained mask, prompt length) per usable fine-tuning row, and the rows left out by reason."""
    tokenizer, bad, examples = tokenizer or _TOKENIZER, BadRows(), []
    for row in rows:
        example = sft_example(row, tokenizer, fmt, template, NO_LIMIT, text_field=text_field, bad=bad)
        if example is not None:
            mask = [int(label != IGNORE_INDEX) for label in example["labels"]]
            examples.append((example["input_ids"], mask, mask.index(1)))
    return examples, bad


def _mapped(encode: Callable, chunks: Iterator[tuple[list, int]], args: tuple, tokenizer: Any,
            workers: int) -> Iterator[tuple[Any, int]]:
    """(encode(chunk, *args), its characters) for every chunk, in order; with workers > 1 in a process pool
    that never holds more than 2 chunks per worker (the reader waits for the tokenizers: flat memory)."""
    if workers <= 1:
        for chunk, chars in chunks:
            yield encode(chunk, *args, tokenizer), chars
        return
    # spawn, not fork: a fast tokenizer's thread pool does not survive a fork
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=_start_worker,
                             initargs=(tokenizer,)) as pool:
        pending: deque[tuple[Future, int]] = deque()
        for chunk, chars in chunks:
            pending.append((pool.submit(encode, chunk, *args), chars))
            if len(pending) >= 2 * workers:
                future, done = pending.popleft()
                yield future.result(), done
        while pending:
            future, done = pending.popleft()
            yield future.result(), done
