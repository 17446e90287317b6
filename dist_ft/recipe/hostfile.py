"""Hosts for the ssh backend: DeepSpeed's hostfile format and the names allowed in it. Pure: text in,
hosts out; reading the file is the launcher's preflight.

    # comments and blank lines are ignored
    node-a slots=8
    user@10.0.0.2 slots=8
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# Tame names only: they become ssh arguments and rendezvous endpoints, never shell text unquoted.
HOST_RE = re.compile(r"^(?:[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}@)?[A-Za-z0-9][A-Za-z0-9.-]{0,252}$")
SLOTS_RE = re.compile(r"^slots=([0-9]{1,6})$")


@dataclass(frozen=True)
class HostEntry:
    host: str
    slots: int | None
    line: int


def host_problem(host: str) -> str | None:
    """Why `host` is not a tame host name (user@ allowed), or None."""
    if not isinstance(host, str) or not HOST_RE.match(host):
        return (f"{host!r} is not a plain host name or address (letters, digits, '.', '-', optionally user@): "
                "no spaces, quotes or shell characters")
    return None


def address(host: str) -> str:
    """The machine part of `user@host`."""
    return host.rsplit("@", 1)[-1]


def parse_hostfile(text: str) -> list[HostEntry]:
    """Entries in order; ValueError naming the first bad line."""
    out: list[HostEntry] = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        host, *rest = line.split()
        if (why := host_problem(host)) is not None:
            raise ValueError(f"line {number}: {why}")
        slots = None
        for word in rest:
            match = SLOTS_RE.match(word)
            if not match or slots is not None:
                raise ValueError(f"line {number}: {word!r} is not understood (expected `HOST slots=N`)")
            slots = int(match.group(1))
            if slots < 1:
                raise ValueError(f"line {number}: slots must be at least 1")
        out.append(HostEntry(host, slots, number))
    if not out:
        raise ValueError("no hosts in it (only comments or blank lines)")
    return out
