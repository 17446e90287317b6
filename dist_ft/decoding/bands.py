"""Position bands: which token positions each perplexity covers. Shared by `dist-ft eval` (per window length)
and the validation of a long-context stage (at the stage's seq_len), so both name bands alike ("8k-16k")."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class Band:
    start: int  # first token position (inclusive)
    end: int  # last token position (exclusive)

    @property
    def label(self) -> str:
        return f"{_short(self.start)}-{_short(self.end)}"


def _short(n: int) -> str:
    return f"{n // 1024}k" if n and n % 1024 == 0 else str(n)


def band_edges(length: int, lengths: Iterable[int] = (), native: int | None = None) -> list[Band]:
    """Bands for a window of `length` tokens.

    Quarters [0, L/4), [L/4, L/2), [L/2, L), split further at every shorter evaluated
    length and at the model's native context, so e.g. at 16k with native 8k the
    8k–16k band is exactly the positions the model never saw in pre-training.
    """
    cuts = {0, length // 4, length // 2, length, *(n for n in lengths if 0 < n < length)}
    if native and 0 < native < length:
        cuts.add(native)
    edges = sorted(c for c in cuts if c >= 0)
    return [Band(a, b) for a, b in zip(edges, edges[1:]) if b > a]
