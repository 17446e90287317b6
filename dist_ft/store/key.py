"""What a token store is a function of, and where it lives.

A store's folder is named by its *spec*: the kind (documents or examples), the source paths, the
tokenizer's fingerprint, text field, format, template and column mapping, and the format version. Its manifest also
records each source file's (resolved path, size, mtime_ns): a store whose files changed since is
refused as stale, with the command that rebuilds it, rather than silently read. A second stage, run or
recipe with the same spec finds the same folder and reuses it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .format import DOCUMENTS, FORMAT_VERSION
from .read import data_files


@dataclass(frozen=True)
class SourceSpec:
    """One store's inputs, as a recipe gives them (paths already absolute)."""
    kind: str  # DOCUMENTS (pre-training text) or EXAMPLES (fine-tuning rows)
    paths: tuple[str, ...]
    text_field: str = "text"
    fmt: str | None = None  # examples: instruction, chat or text
    template: str | None = None
    columns: tuple[tuple[str, str], ...] = ()  # examples: (format field, the rows' column), sorted

    def renamed(self, row: dict) -> dict:
        """`row` with each mapped column also under its format field's name."""
        return {**row, **{field: row[column] for field, column in self.columns if column in row}} \
            if self.columns else row

    def describe(self) -> str:
        what = "documents" if self.kind == DOCUMENTS else f"{self.fmt} examples"
        return f"{what} of {', '.join(Path(p).name for p in self.paths)}"


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """sha256 over what decides the tokens: the backend's full JSON (vocabulary, merges, normalizer,
    pre-tokenizer, added tokens) or, for a slow tokenizer, its vocabulary; the special tokens and their
    ids; the chat template. Not the name: a renamed copy is the same tokenizer, a retrained one is not."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    body = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    extra = {"class": type(tokenizer).__name__, "special": {k: str(v) for k, v in tokenizer.special_tokens_map.items()},
             "eos": tokenizer.eos_token_id, "pad": tokenizer.pad_token_id, "size": len(tokenizer),
             "chat_template": tokenizer.chat_template}
    return hashlib.sha256(body.encode() + json.dumps(extra, sort_keys=True, default=str).encode()).hexdigest()


def spec_json(spec: SourceSpec) -> dict[str, Any]:
    """The spec as its manifest records it (JSON types); no `columns` when none are mapped, so stores built
    before column mappings existed keep their names."""
    fields = json.loads(json.dumps(asdict(spec)))
    if not spec.columns:
        del fields["columns"]
    return fields


def spec_id(spec: SourceSpec, fingerprint: str) -> str:
    text = json.dumps({"version": FORMAT_VERSION, **spec_json(spec), "tokenizer": fingerprint}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def store_path(root: Path, spec: SourceSpec, fingerprint: str) -> Path:
    """Where the store of `spec` lives under a cache dir (data.cache_dir)."""
    return root / f"{spec.kind}-{spec_id(spec, fingerprint)}"


def source_stamps(spec: SourceSpec) -> list[list[Any]]:
    """[resolved path, size, mtime_ns] of every file the reader takes, in its order."""
    stamps = []
    for file in data_files(spec.paths):
        stat = file.stat()
        stamps.append([str(file.resolve()), stat.st_size, stat.st_mtime_ns])
    return stamps


def content_key(spec: SourceSpec, fingerprint: str, stamps: list[list[Any]]) -> str:
    """The store's full key: its spec and the state of its files."""
    return hashlib.sha256(json.dumps([spec_id(spec, fingerprint), stamps]).encode()).hexdigest()


def stale_files(recorded: list[list[Any]], current: list[list[Any]]) -> list[str]:
    """Files added, removed or changed (size or mtime) since the store was built."""
    old, new = {s[0]: s[1:] for s in recorded}, {s[0]: s[1:] for s in current}
    return sorted(p for p in old.keys() | new.keys() if old.get(p) != new.get(p))
