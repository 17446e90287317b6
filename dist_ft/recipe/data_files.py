"""Which local files are data, and the plan-time check that a data path names at least one.

Kept apart from `dist_ft.rank.data` (which imports torch) so `plan` stays quick; the reader takes
its suffixes from here, so what plan accepts and what the ranks read cannot drift apart.
"""

from __future__ import annotations

import os
from pathlib import Path

RECORD_SUFFIXES = (".jsonl", ".json", ".parquet")
TEXT_SUFFIXES = (".txt", ".md", ".rst", ".tex", ".py", ".c", ".h", ".cc", ".cpp", ".hpp", ".java", ".js", ".ts",
                 ".go", ".rs", ".rb", ".sh", ".sql", ".html", ".css", ".yaml", ".yml", ".toml", ".ini", ".cfg")
DATA_SUFFIXES = RECORD_SUFFIXES + TEXT_SUFFIXES
MAX_SCANNED = 100_000  # directory entries looked at before giving up: plan must return within seconds


def data_path_problem(entry: str) -> tuple[str, str] | None:
    """(what, fix) when `entry` names no readable, non-empty data file of a supported kind; else None."""
    try:
        return _path_problem(entry)
    except OSError as err:  # a name too long for the file system, a folder without permission, ...
        return f"{entry[:100]} cannot be looked at: {err.strerror}", "check the path and its permissions"


def _path_problem(entry: str) -> tuple[str, str] | None:
    path = Path(entry)
    if not path.exists():
        return f"{entry} does not exist", "fix the path (relative paths are read from the recipe's folder)"
    if path.is_dir():
        if first_data_file(path) is None:
            return (f"{entry} holds no readable, non-empty data file ({', '.join(DATA_SUFFIXES[:4])}, ...)",
                    "point at the folder that holds the data files (hidden files and folders are skipped)")
        return None
    if not path.is_file():  # /dev/null, a FIFO (reading it could block), a socket
        return f"{entry} is not a regular file", "give a data file or a folder of them"
    if path.suffix.lower() not in DATA_SUFFIXES:
        return (f"{entry} is not a supported kind of data file",
                f"use one of {', '.join(RECORD_SUFFIXES)} or a text file ({', '.join(TEXT_SUFFIXES[:4])}, ...)")
    if not _readable(path):
        return f"{entry} is empty or not readable", "check the file and its permissions"
    return None


def first_data_file(folder: Path) -> Path | None:
    """The first readable, non-empty data file under `folder`, as the reader would take it (hidden
    entries skipped); looks at MAX_SCANNED entries at most and follows no directory links (loops)."""
    scanned = 0
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            scanned += 1
            candidate = Path(root, name)
            if not name.startswith(".") and candidate.suffix.lower() in DATA_SUFFIXES and _readable(candidate):
                return candidate
            if scanned >= MAX_SCANNED:
                return None
    return None


def _readable(path: Path) -> bool:
    try:
        return path.is_file() and path.stat().st_size > 0 and os.access(path, os.R_OK)
    except OSError:
        return False
