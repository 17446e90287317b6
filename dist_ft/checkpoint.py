"""Checkpoint layout and bookkeeping around DeepSpeed's own files.

    stages/<stage>/checkpoints/step_00000010/   DeepSpeed shards + dist_ft.json (written last)
    stages/<stage>/checkpoints/latest           the newest complete tag, replaced atomically

A tag counts only once its dist_ft.json exists, and `latest` moves only after
that, so a crash mid-write leaves the previous checkpoint as the latest.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

META = "dist_ft.json"
LATEST = "latest"


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    with open(tmp, "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def commit(folder: Path, tag: str, meta: dict[str, Any], keep_last: int) -> None:
    """Mark `tag` complete and make it the latest (rank 0, after every rank saved)."""
    write_atomic(folder / tag / META, json.dumps(meta, indent=2))
    write_atomic(folder / LATEST, tag)
    for old in complete_tags(folder)[:-keep_last]:
        shutil.rmtree(folder / old, ignore_errors=True)


def complete_tags(folder: Path) -> list[str]:
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and (p / META).is_file())


def latest_tag(folder: Path) -> str | None:
    named = (folder / LATEST).read_text().strip() if (folder / LATEST).is_file() else None
    complete = complete_tags(folder)
    if named in complete:
        return named
    return complete[-1] if complete else None


def read_meta(folder: Path, tag: str) -> dict[str, Any]:
    return json.loads((folder / tag / META).read_text())
