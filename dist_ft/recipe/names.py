"""Run and stage names: they become file, folder and job names, so they stay tame."""

from __future__ import annotations

import re

from .limits import MAX_NAME
from .strict import Invalid

_PORTABLE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def check_name(name: str) -> None:
    """Names become file names and job names: keep them tame."""
    if len(name) > MAX_NAME:  # file systems refuse names over 255 bytes: fail here, not when writing
        raise Invalid("name", f"is {len(name)} characters long, more than {MAX_NAME}",
                      "use a shorter name (it becomes file, folder and job names)")
    # ASCII only, and a letter or digit first: `-x` would read as an option on a command line,
    # `.x` is hidden, and other scripts' characters are not portable across file and job systems.
    if not _PORTABLE_NAME.fullmatch(name):
        raise Invalid("name", f"{name!r} is not a valid name",
                      "start with a letter or digit; then use ASCII letters, digits, '-', '_' and '.' only")
