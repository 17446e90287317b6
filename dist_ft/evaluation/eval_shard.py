"""One evaluation divided among the ranks of a job: perplexity windows and passkey trials.

Every (length, window) and every (length, depth, trial) is one piece of work. The pieces are dealt to
ranks by the same rule everywhere (longest first, to the least-loaded rank), each rank writes its
pieces' numbers into its own slots of one float64 vector laid out identically on all ranks, and one
all-reduce (a sum: every slot is written by exactly one rank, the rest add zeros) gives every rank
the numbers one process would have. A rank with no pieces issues the same single all-reduce: the
collectives never depend on the data (FACTS: a data-dependent collective count deadlocks ZeRO-3 jobs).

Without a process group (`dist-ft eval` from the command line) the world is one rank and nothing is
sent anywhere.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from dist_ft.decoding.bands import Band, band_edges
from .eval_nll import greedy_matches, token_nll, windows
from .eval_passkey import make_haystack, random_keys


@dataclass(frozen=True)
class Shard:
    """This process's place among the ranks that share an evaluation."""
    rank: int = 0
    world: int = 1

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        """The element-wise sum over ranks (gloo: on the CPU; NCCL: on this rank's GPU)."""
        if self.world == 1:
            return values
        device = "cuda" if torch.distributed.get_backend() == "nccl" else "cpu"
        values = values.to(device)
        torch.distributed.all_reduce(values)
        return values.cpu()

    def merge(self, parts: dict) -> dict:
        """Every rank's dict merged (each rank holds the entries it computed): one all-gather of objects."""
        if self.world == 1:
            return dict(parts)
        gathered: list[dict] = [{} for _ in range(self.world)]
        torch.distributed.all_gather_object(gathered, parts)
        return {key: value for part in gathered for key, value in part.items()}

    def agree(self, value: Any) -> Any:
        """Rank 0's value on every rank: one decision where ranks could see a shared file system differently."""
        if self.world == 1:
            return value
        box = [value]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]


def current_shard() -> Shard:
    """The job's ranks when a process group is up (the train command after its stage), else one rank."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return Shard(dist.get_rank(), dist.get_world_size())
    return Shard()


def deal(costs: Sequence[int], world: int) -> list[int]:
    """The rank of each piece: longest first to the least-loaded rank (ties: the lower rank), so two ranks
    share 4 windows of each length 2 + 2 and 1 window of each of two lengths one each."""
    owner = [0] * len(costs)
    load = [0] * world
    for index in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        rank = min(range(world), key=lambda r: (load[r], r))
        owner[index] = rank
        load[rank] += costs[index]
    return owner


@dataclass(frozen=True)
class PerplexityJob:
    length: int
    windows: list[torch.Tensor]
    bands: list[Band]
    native: int | None = None  # the model's native context: bands past it are flagged

    @property
    def slots(self) -> int:
        return len(self.windows) * len(self.bands) * 2  # (nll sum, tokens) per window and band


@dataclass(frozen=True)
class PasskeyJob:
    length: int
    depth: float
    keys: list[str]


def perplexity_jobs(token_ids: list[int], lengths: Sequence[int], count: int, native: int | None,
                    on_short=None) -> list[PerplexityJob]:
    jobs = []
    for length in lengths:
        chosen = windows(token_ids, length, count)
        if not chosen and on_short is not None:
            on_short(length, len(token_ids))
        jobs.append(PerplexityJob(length, chosen, band_edges(length, lengths, native), native))
    return jobs


def passkey_jobs(lengths: Sequence[int], depths: Sequence[float], trials: int, seed: int) -> list[PasskeyJob]:
    # The key seed of each cell as `eval_passkey.passkey_grid` always drew it: results stay comparable.
    return [PasskeyJob(n, d, random_keys(trials, seed * 100_003 + n * 101 + i))
            for n in lengths for i, d in enumerate(depths)]


def run_shared(model, tokenizer, ppl: list[PerplexityJob], passkey: list[PasskeyJob],
               shard: Shard) -> tuple[dict[str, Any], dict[str, dict[str, float]]]:
    """({str(length): perplexity row}, {str(length): {str(depth): accuracy}}), the same on every rank."""
    pieces = [(job, w) for job in ppl for w in range(len(job.windows))]
    trials = [(job, t) for job in passkey for t in range(len(job.keys))]
    owner = deal([job.length for job, _ in pieces] + [job.length for job, _ in trials], shard.world)
    values = torch.zeros(sum(job.slots for job in ppl) + len(trials), dtype=torch.float64)
    offsets = _offsets(ppl)
    for i, (job, w) in enumerate(pieces):
        if owner[i] == shard.rank:
            _score_window(model, job, w, values, offsets[id(job)])
    base = sum(job.slots for job in ppl)
    for i, (job, t) in enumerate(trials):
        if owner[len(pieces) + i] == shard.rank:
            hay = make_haystack(tokenizer, job.length, job.depth, job.keys[t])
            values[base + i] = float(greedy_matches(model, torch.tensor([hay.input_ids]), hay.answer_len))
    values = shard.sum(values)
    return _perplexity_rows(ppl, values, offsets), _passkey_grid(passkey, values[base:])


def _offsets(ppl: list[PerplexityJob]) -> dict[int, int]:
    offsets, at = {}, 0
    for job in ppl:
        offsets[id(job)] = at
        at += job.slots
    return offsets


def _score_window(model, job: PerplexityJob, w: int, values: torch.Tensor, offset: int) -> None:
    nll = token_nll(model, job.windows[w]).double().cpu()
    at = offset + w * len(job.bands) * 2
    for b, band in enumerate(job.bands):
        piece = nll[max(band.start, 1) - 1:band.end - 1]  # entry i is token position i+1; 0 is never predicted
        values[at + 2 * b] = piece.sum()
        values[at + 2 * b + 1] = piece.numel()


def _perplexity_rows(ppl: list[PerplexityJob], values: torch.Tensor, offsets: dict[int, int]) -> dict[str, Any]:
    rows = {}
    for job in ppl:
        if not job.windows:
            continue
        cells = values[offsets[id(job)]:offsets[id(job)] + job.slots].view(len(job.windows), len(job.bands), 2)
        per_window = [math.exp(float(c[:, 0].sum() / c[:, 1].sum())) for c in cells]
        nll, tokens = cells[..., 0].sum(0), cells[..., 1].sum(0)
        rows[str(job.length)] = {
            "windows": len(job.windows), "tokens": int(tokens.sum()), "ppl": _ppl(nll.sum(), tokens.sum()),
            "window_ppl": per_window,
            "bands": [{"band": b.label, "start": b.start, "end": b.end, "tokens": int(tokens[i]),
                       "ppl": _ppl(nll[i], tokens[i]), "beyond_native": bool(job.native and b.start >= job.native)}
                      for i, b in enumerate(job.bands)]}
    return rows


def _ppl(nll_sum: torch.Tensor, tokens: torch.Tensor) -> float:
    return math.exp(float(nll_sum) / float(tokens)) if float(tokens) else float("nan")


def _passkey_grid(passkey: list[PasskeyJob], hits: torch.Tensor) -> dict[str, dict[str, float]]:
    grid: dict[str, dict[str, float]] = {}
    at = 0
    for job in passkey:
        grid.setdefault(str(job.length), {})[str(job.depth)] = float(hits[at:at + len(job.keys)].sum()) / len(job.keys)
        at += len(job.keys)
    return grid
