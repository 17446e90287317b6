"""SLURM time-limit strings → seconds, with the formats `sbatch --time` accepts."""

from __future__ import annotations

import re

_FORMS = [
    (re.compile(r"^(\d+)$"), ("m",)),
    (re.compile(r"^(\d+):(\d{1,2})$"), ("m", "s")),
    (re.compile(r"^(\d+):(\d{1,2}):(\d{1,2})$"), ("h", "m", "s")),
    (re.compile(r"^(\d+)-(\d{1,2})$"), ("d", "h")),
    (re.compile(r"^(\d+)-(\d{1,2}):(\d{1,2})$"), ("d", "h", "m")),
    (re.compile(r"^(\d+)-(\d{1,2}):(\d{1,2}):(\d{1,2})$"), ("d", "h", "m", "s")),
]
_SECONDS = {"d": 86400, "h": 3600, "m": 60, "s": 1}
UNLIMITED = ("unlimited", "infinite")
MAX_DAYS = 366  # beyond a year a limit is a typo, not a plan (write `unlimited` for none)


def parse_time_limit(limit: str | int) -> int | None:
    """Seconds, or None for no limit. Raises ValueError for what SLURM would reject.
    An integer is minutes, as `sbatch --time=90` reads it (YAML and --set give `90` as one)."""
    text = str(limit).strip()
    if text.lower() in UNLIMITED:
        return None
    if len(text) > 32:  # 20-digit minutes would be parsed into an absurd number of seconds first
        raise ValueError(f"{text[:40]!r} is too long for a SLURM time")
    for pattern, units in _FORMS:
        match = pattern.match(text)
        if match:
            seconds = sum(int(v) * _SECONDS[u] for v, u in zip(match.groups(), units))
            if seconds <= 0:
                raise ValueError("a time limit must be positive")
            if seconds > MAX_DAYS * 86400:
                raise ValueError(f"{text!r} is more than {MAX_DAYS} days (write `unlimited` for no limit)")
            return seconds
    raise ValueError(f"{text!r} is not a SLURM time (MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS)")
