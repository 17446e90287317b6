"""Reading local data files, counting whatever cannot be used instead of failing on it.

A bad row is a fact about the data to report, not a reason to stop a run; only
a missing path, or nothing usable at all, is a `DataError`.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from dist_ft.recipe.data_files import RECORD_SUFFIXES, TEXT_SUFFIXES  # plan checks paths with the same kinds

EXAMPLES_PER_REASON = 3
# Real rows nest a few levels (chat messages: 3). A row nested deeper is refused here, before any
# later repr() or walk of it could recurse past Python's limit.
MAX_NESTING = 64


class DataError(ValueError):
    """The data cannot feed a run: a path is missing, or no usable row remains."""


@dataclass
class BadRows:
    """Rows and files left out, counted per reason, with a few examples of each.

    'truncated' counts rows that were kept, shortened to fit.
    """

    counts: Counter[str] = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def add(self, reason: str, example: str) -> None:
        self.counts[reason] += 1
        shown = self.examples.setdefault(reason, [])
        if len(shown) < EXAMPLES_PER_REASON:
            shown.append(example[:200])

    def merge(self, other: BadRows) -> None:
        for reason, count in other.counts.items():
            self.counts[reason] += count
            shown = self.examples.setdefault(reason, [])
            shown += other.examples.get(reason, [])[:EXAMPLES_PER_REASON - len(shown)]

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def __str__(self) -> str:
        if not self.counts:
            return "no bad rows"
        return "; ".join(f"{n} {reason} (e.g. {', '.join(self.examples[reason])})"
                         for reason, n in sorted(self.counts.items()))


def read_documents(paths: Sequence[str], text_field: str) -> tuple[list[str], BadRows]:
    """Texts from jsonl/json/parquet rows (`text_field`), text files, and directories of them."""
    bad = BadRows()
    documents = list(iter_documents(paths, text_field, bad))
    if not documents:
        raise DataError(f"no usable documents in {', '.join(map(str, paths))}: {bad}")
    return documents, bad


def iter_documents(paths: Sequence[str], text_field: str, bad: BadRows) -> Iterator[str]:
    """The texts one at a time, in file order; what cannot be used is counted in `bad`."""
    for where, record in read_records(paths, bad):
        if (text := _text(record, text_field, where, bad)) is not None:
            yield text


def data_files(paths: Sequence[str]) -> list[Path]:
    """The files the reader takes from `paths`, in its order (directories expanded, hidden entries
    skipped): what a token store's key covers."""
    return [file for path in paths for file in _files(Path(path), BadRows())]


def read_records(paths: Sequence[str], bad: BadRows) -> Iterator[tuple[str, Any]]:
    """(location, record) pairs: a parsed row from a record file, or a whole text file as one string."""
    files = [file for path in paths for file in _files(Path(path), bad)]
    for file in files:
        for where, record in _file_records(file, bad):
            if _nested_deeper_than(record, MAX_NESTING):
                bad.add("too_deeply_nested", where)
            else:
                yield where, record


def _nested_deeper_than(value: Any, limit: int) -> bool:
    """Whether lists/dicts nest more than `limit` levels; iterative, so any depth is safe to measure."""
    todo = [(value, 1)]
    while todo:
        item, depth = todo.pop()
        if isinstance(item, (list, dict)):
            if depth > limit:
                return True
            todo.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return False


def _files(path: Path, bad: BadRows) -> list[Path]:
    if not path.exists():
        raise DataError(f"data path not found: {path}")
    if path.is_file():
        return [path]
    files = []
    # Hidden entries (.git, .cache, ...) and Python's bytecode caches are tooling, not data.
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        if any(part.startswith(".") or part == "__pycache__" for part in file.relative_to(path).parts):
            continue
        if file.suffix.lower() in RECORD_SUFFIXES + TEXT_SUFFIXES:
            files.append(file)
        else:
            bad.add("unsupported_file", str(file))
    return files


def _file_records(file: Path, bad: BadRows) -> Iterator[tuple[str, Any]]:
    """A file's records, streamed where the format allows: JSON Lines line by line, parquet by row group;
    a .json array or a text file (one document) is read once, whole."""
    suffix = file.suffix.lower()
    if suffix == ".parquet":
        yield from _parquet_records(file, bad)
    elif suffix == ".jsonl":
        yield from _jsonl_file(file, bad)
    else:
        data = file.read_bytes()
        if not data.strip():
            bad.add("empty_file", str(file))
        elif suffix == ".json":
            yield from _json_records(file, data, bad)
        elif (text := _decode(data, str(file), bad)) is not None:
            yield str(file), text


def _jsonl_file(file: Path, bad: BadRows) -> Iterator[tuple[str, Any]]:
    blank = True
    with open(file, "rb") as handle:
        for where, record, empty in _jsonl_lines(file, handle):
            blank = blank and empty
            if record is not _BLANK:
                yield from _parsed(where, record, bad)
    if blank:
        bad.add("empty_file", str(file))


_BLANK = object()


def _jsonl_lines(file: Path, lines: Iterable[bytes]) -> Iterator[tuple[str, Any, bool]]:
    """(location, line or _BLANK, whether blank) per line; a line is read, judged and dropped."""
    for number, line in enumerate(lines, start=1):
        empty = not line.strip()
        yield f"{file}:{number}", (_BLANK if empty else line), empty


def _parsed(where: str, line: bytes, bad: BadRows) -> Iterator[tuple[str, Any]]:
    if (text := _decode(line, where, bad)) is not None:
        record = _parse_json(text, where, bad)
        if record is not _UNPARSED:
            yield where, record


def _decode(data: bytes, where: str, bad: BadRows) -> str | None:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        bad.add("undecodable", f"{where} (byte {error.start})")
        return None


def _jsonl_records(file: Path, data: bytes, bad: BadRows) -> Iterator[tuple[str, Any]]:
    for where, line, _ in _jsonl_lines(file, data.split(b"\n")):
        if line is not _BLANK:
            yield from _parsed(where, line, bad)


_UNPARSED = object()


def _parse_json(text: str, where: str, bad: BadRows) -> Any:
    """The parsed value, or _UNPARSED once the row is counted as bad."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        bad.add("bad_json", where)
    except RecursionError:  # nested deeper than Python's recursion limit, e.g. [[[[...]]]] 200k deep
        bad.add("too_deeply_nested", where)
    return _UNPARSED


def _json_records(file: Path, data: bytes, bad: BadRows) -> Iterator[tuple[str, Any]]:
    text = _decode(data, str(file), bad)
    if text is None:
        return
    try:
        parsed = json.loads(text)
    except (json.JSONDecodeError, RecursionError):
        # JSON Lines under a .json name, as `datasets` accepts; there each line is judged on its own
        # (one over-deep line must not cost the others).
        yield from _jsonl_records(file, data, bad)
        return
    rows = parsed if isinstance(parsed, list) else [parsed]
    for index, row in enumerate(rows):
        yield f"{file}[{index}]", row


def _parquet_records(file: Path, bad: BadRows) -> Iterator[tuple[str, Any]]:
    """Rows one row group at a time: a file larger than memory is never held whole."""
    index = 0
    try:
        parquet = pq.ParquetFile(file)
        for group in range(parquet.num_row_groups):
            for row in parquet.read_row_group(group).to_pylist():
                yield f"{file}[{index}]", row
                index += 1
    except Exception as error:  # pyarrow raises several unrelated types for a corrupt file
        bad.add("unreadable_file", f"{file} ({type(error).__name__})")
        return
    if not index:
        bad.add("empty_file", str(file))


def _text(record: Any, text_field: str, where: str, bad: BadRows) -> str | None:
    if isinstance(record, str):
        text = record
    elif not isinstance(record, dict):
        bad.add("not_an_object", where)
        return None
    elif text_field not in record:
        bad.add("missing_field", where)
        return None
    else:
        text = record[text_field]
    if not isinstance(text, str):
        bad.add("not_a_string", where)
        return None
    if not text.strip():
        bad.add("empty_text", where)
        return None
    return text
