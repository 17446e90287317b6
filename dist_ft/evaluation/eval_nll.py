"""Per-token NLL over long windows, without ever holding full-vocabulary logits for a whole window.

At 32k tokens SmolLM2's logits alone would be 32768 × 49152 floats (6.4 GB), so the
decoder runs once for the hidden states and the LM head runs over them chunk by chunk.
"""

from __future__ import annotations

import math
import sysconfig
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from dist_ft.decoding.bands import Band
from dist_ft.rank.head_loss import head_logits

HEAD_CHUNK = 1024
# The demo trains on these packages (and tests are huge and repetitive): keep them out of held-out text.
EXCLUDED_PARTS = frozenset({"json", "email", "test", "tests", "idlelib", "site-packages", "dist-packages",
                            "__pycache__"})


@torch.no_grad()
def hidden_states(model: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """Last hidden states (1, L, H). No attention mask and no cache: plain causal attention."""
    return model.get_decoder()(input_ids=input_ids, use_cache=False).last_hidden_state


def on_model_device(model: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """Token ids are built on the CPU; the model may sit on a GPU (eval_model.eval_device)."""
    return input_ids.to(next(model.parameters()).device)


@torch.no_grad()
def token_nll(model: torch.nn.Module, input_ids: torch.Tensor, chunk: int = HEAD_CHUNK) -> torch.Tensor:
    """NLL of tokens 1..L-1 of one window (shape (L-1,), fp32); entry i belongs to token position i+1."""
    input_ids = on_model_device(model, input_ids)
    hidden = hidden_states(model, input_ids)[0]
    logits = head_logits(model)
    targets = input_ids[0, 1:]
    parts = []
    for start in range(0, targets.numel(), chunk):
        end = min(start + chunk, targets.numel())
        parts.append(F.cross_entropy(logits(hidden[start:end]).float(), targets[start:end], reduction="none"))
    return torch.cat(parts)


@torch.no_grad()
def greedy_matches(model: torch.nn.Module, input_ids: torch.Tensor, answer_len: int) -> bool:
    """Teacher forcing: does the argmax at each of the last `answer_len` tokens' positions predict that token?

    Equivalent to greedy decoding emitting exactly the answer first, at the cost of one forward.
    """
    input_ids = on_model_device(model, input_ids)
    hidden = hidden_states(model, input_ids)[0, -answer_len - 1:-1]
    predicted = head_logits(model)(hidden).argmax(-1)
    return bool(torch.equal(predicted, input_ids[0, -answer_len:]))


# ---- bands: which token positions each perplexity covers -------------------------------------

@dataclass
class BandTotal:
    nll_sum: float = 0.0
    tokens: int = 0

    @property
    def ppl(self) -> float:
        return math.exp(self.nll_sum / self.tokens) if self.tokens else float("nan")


def add_to_bands(totals: dict[Band, BandTotal], nll: torch.Tensor, bands: Sequence[Band]) -> None:
    """Add one window's NLL (entry i = token position i+1; position 0 is never predicted) to each band."""
    for band in bands:
        lo, hi = max(band.start, 1) - 1, band.end - 1
        piece = nll[lo:hi].double()
        total = totals.setdefault(band, BandTotal())
        total.nll_sum += float(piece.sum())
        total.tokens += piece.numel()


# ---- held-out text ----------------------------------------------------------------------------

def stdlib_files(root: Path | None = None) -> list[Path]:
    """Python standard-library sources in sorted order, minus what the demo trains on."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    return [p for p in sorted(root.rglob("*.py"))
            if not EXCLUDED_PARTS.intersection(p.relative_to(root).parts[:-1])]


def read_text(paths: Sequence[Path], max_chars: int) -> str:
    """Files concatenated (blank line between them) until `max_chars` is reached; folders are walked sorted."""
    pieces, size = [], 0
    for path in _expand(paths):
        text = path.read_text(encoding="utf-8", errors="replace")
        pieces.append(text)
        size += len(text) + 2
        if size >= max_chars:
            break
    return "\n\n".join(pieces)


def _expand(paths: Sequence[Path]) -> Iterable[Path]:
    for path in paths:
        if path.is_dir():
            yield from (p for p in sorted(path.rglob("*")) if p.is_file())
        else:
            yield path


def heldout_tokens(tokenizer, needed: int, paths: Sequence[Path] | None = None) -> list[int]:
    """At least `needed` token ids of held-out text if the sources have them (fewer otherwise)."""
    sources = list(paths) if paths else stdlib_files()
    chars = needed * 6 + 4096  # code is ~3–4 characters per BPE token, 1 per byte token
    while True:
        ids = tokenizer(read_text(sources, chars), add_special_tokens=False)["input_ids"]
        if len(ids) >= needed or chars > 64 * needed + 1_000_000:
            return ids
        chars *= 4


def windows(ids: Sequence[int], length: int, count: int) -> list[torch.Tensor]:
    """Up to `count` non-overlapping windows of exactly `length` tokens, shape (1, length)."""
    usable = min(count, len(ids) // length)
    return [torch.tensor([ids[i * length:(i + 1) * length]]) for i in range(usable)]
