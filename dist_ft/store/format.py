"""A token store on disk: flat numpy arrays a rank memory-maps, and the manifest that says they are whole.

    STORE/tokens.bin     every token of every document (or example), concatenated: uint16 when the
                         vocabulary fits, else uint32
    STORE/offsets.bin    int64, documents + 1 entries: document i is tokens[offsets[i]:offsets[i+1]]
    STORE/mask.bin       (examples only) uint8 per token: 1 where the token is trained (a label)
    STORE/prompts.bin    (examples only) int64 per example: tokens before its first trained one
    STORE/manifest.json  written last, after every array is on disk: key, counts, dtype, sources, bad
                         rows, length histogram, each file's size

A store is built in a hidden folder beside its final name and renamed into place, so a folder at a
store's name either holds a whole store or is refused (no manifest, a size that disagrees).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

FORMAT_VERSION = 1
IGNORE_INDEX = -100  # a label that scores nothing (transformers' and torch's cross-entropy default)
MANIFEST = "manifest.json"
SUMMARY = "summary.json"
TOKENS, OFFSETS, MASK, PROMPTS = "tokens.bin", "offsets.bin", "mask.bin", "prompts.bin"
DOCUMENTS, EXAMPLES = "documents", "examples"  # what a store holds: pre-training text, or SFT examples


class StoreError(RuntimeError):
    """A token store is missing, stale or damaged; the message names the command that (re)builds it."""


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


@dataclass(frozen=True)
class TokenStore:
    """An opened store: memory maps, so opening costs no memory and no time with the corpus size."""
    path: Path
    manifest: dict[str, Any]
    tokens: np.ndarray
    offsets: np.ndarray
    mask: np.ndarray | None = None
    prompt_lengths: np.ndarray | None = None

    @property
    def count(self) -> int:
        """Documents (or examples) in the store."""
        return len(self.offsets) - 1

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)


def open_store(path: Path, rebuild: str) -> TokenStore:
    """The store at `path`, refused with a StoreError (naming the `rebuild` command) when it is missing or
    not whole: no manifest, another format version, or a file whose size disagrees with it."""
    manifest_file = path / MANIFEST
    if not manifest_file.is_file():
        what = "is missing" if not path.exists() else "has no manifest (a prepare that did not finish)"
        raise StoreError(f"the token store {path} {what}: run `{rebuild}`")
    try:
        manifest = json.loads(manifest_file.read_text())
    except (OSError, ValueError) as err:
        raise StoreError(f"the token store {path} has an unreadable manifest ({err}): run `{rebuild}`") from None
    if manifest.get("format_version") != FORMAT_VERSION:
        raise StoreError(f"the token store {path} has format version {manifest.get('format_version')}, this "
                         f"dist-ft reads {FORMAT_VERSION}: run `{rebuild}`")
    for name, size in manifest["files"].items():
        actual = (path / name).stat().st_size if (path / name).is_file() else None
        if actual != size:
            raise StoreError(f"the token store {path} is damaged: {name} has {actual} bytes, its manifest says "
                             f"{size}: run `{rebuild}`")
    examples = manifest["kind"] == EXAMPLES
    return TokenStore(path, manifest, _map(path / TOKENS, manifest["dtype"]), _map(path / OFFSETS, "int64"),
                      _map(path / MASK, "uint8") if examples else None,
                      _map(path / PROMPTS, "int64") if examples else None)


def _map(file: Path, dtype: str) -> np.ndarray:
    if file.stat().st_size == 0:  # np.memmap refuses an empty file
        return np.zeros(0, dtype=dtype)
    return np.memmap(file, dtype=dtype, mode="r")
