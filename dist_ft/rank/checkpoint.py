"""Checkpoint layout and bookkeeping around DeepSpeed's own files.

    stages/<stage>/checkpoints/step_00000010/   DeepSpeed shards + dist_ft.json (written last)
    stages/<stage>/checkpoints/latest           the newest complete tag, replaced atomically
    stages/<stage>/checkpoints/best             the tag of the best evaluation (early stopping), kept out of
                                                keep_last rotation until a better one replaces it
    stages/<stage>/universal/step_00000010/     a conversion for another data-parallel size
    stages/<stage>/universal/step_00000010.converted   written when that conversion finished

A tag counts only once its dist_ft.json exists and reads back, and that file is
written only after every rank's shards are on disk; `latest` moves after it. A
crash mid-write, or a damaged dist_ft.json, leaves the previous checkpoint in charge.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any, Callable

from dist_ft.durable import fsync_dir, fsync_tree, write_atomic

META = "dist_ft.json"
LATEST = "latest"
BEST = "best"
CONVERTED = ".converted"
_TAG = re.compile(r"step_\d{8}")


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def clear_tag(folder: Path, tag: str) -> None:
    """Before saving `tag` (rank 0, then a barrier): an old folder of that name (a crash mid-save, or
    a save at another world size) would mix its files into the new checkpoint."""
    shutil.rmtree(folder / tag, ignore_errors=True)


def commit(folder: Path, tag: str, meta: dict[str, Any], keep_last: int, best: bool = False) -> None:
    """Mark `tag` complete and make it the latest (rank 0, after every rank saved and synced its shards);
    `best`: also the best, protected from rotation (the previous best loses that protection)."""
    fsync_dir(folder / tag)
    write_atomic(folder / tag / META, json.dumps(meta, indent=2))
    write_atomic(folder / LATEST, tag)
    if best:
        write_atomic(folder / BEST, tag)
    prune(folder, keep_last)


def prune(folder: Path, keep_last: int) -> None:
    """Keep the newest keep_last complete tags and the best one; drop every other tag folder, the incomplete
    ones too (no later step finishes them, and each may hold a model's worth of shards)."""
    keep = set(complete_tags(folder)[-keep_last:]) | {best_tag(folder)}
    for name in tag_folders(folder):
        if name not in keep:
            shutil.rmtree(folder / name, ignore_errors=True)


def tag_folders(folder: Path) -> list[str]:
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if _TAG.fullmatch(p.name) and p.is_dir())


def complete_tags(folder: Path) -> list[str]:
    return [tag for tag in tag_folders(folder) if read_meta(folder, tag) is not None]


def read_meta(folder: Path, tag: str) -> dict[str, Any] | None:
    """The tag's dist_ft.json, or None when it is missing or damaged (the tag is then incomplete)."""
    try:
        meta = json.loads((folder / tag / META).read_text())
    except (OSError, ValueError):  # ValueError: bad JSON or bad UTF-8
        return None
    if not isinstance(meta, dict) or not all(isinstance(meta.get(k), int) for k in ("step", "dp")):
        return None
    return meta


def latest_tag(folder: Path) -> str | None:
    named = _read_text(folder / LATEST)
    complete = complete_tags(folder)
    if named in complete:
        return named
    return complete[-1] if complete else None


def best_tag(folder: Path) -> str | None:
    """The complete tag `best` names, or None (no best recorded, or its checkpoint is gone or incomplete)."""
    named = _read_text(folder / BEST)
    return named if named and _TAG.fullmatch(named) and read_meta(folder, named) is not None else None


def resume_choice(folder: Path) -> tuple[str, int] | None:
    """(tag, the data-parallel size it was saved at) to resume from, or None: decided on rank 0 only."""
    tag = latest_tag(folder)
    return None if tag is None else (tag, read_meta(folder, tag)["dp"])


def ensure_universal(folder: Path, tag: str, universal: Path, convert: Callable[[Path, str, Path], None]) -> None:
    """Convert `tag` into universal/<tag> once (rank 0). The marker is written after the converted files
    are on disk, so a conversion cut short (a killed rank, a full disk) is found and done again."""
    out, marker = universal / tag, universal / f"{tag}{CONVERTED}"
    if marker.is_file() and out.is_dir():
        return
    marker.unlink(missing_ok=True)
    shutil.rmtree(out, ignore_errors=True)
    universal.mkdir(parents=True, exist_ok=True)
    convert(folder, tag, out)
    fsync_tree(out)
    write_atomic(marker, tag)


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except (OSError, ValueError):
        return None
