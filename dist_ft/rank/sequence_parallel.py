"""Ulysses sequence parallelism on our side of the model: each rank's slice of a batch, and the
group's loss. (DeepSpeed's attention does the rest; `engine.enable_sequence_parallel` installs it.)

Every rank of a sequence-parallel group reads the same micro-batch from the data stream
(`stage_data.load_stage_data` gives them the same data-parallel rank) and takes its own contiguous
slice of the sequence here. DeepSpeed's `UlyssesSPDataLoaderAdapter` would instead read one batch
per rank and trade slices; its refill queue then spans optimizer steps and reads world-size
streams, which breaks our resumable per-data-parallel-rank stream. The batch contract is the
adapter's: labels are shifted before slicing (`shift_labels`, so a slice's last token is scored
against the next slice's first), and position_ids stay global positions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from .attention import SDPA_VARLEN
from .attention import register as register_sdpa_varlen
from .labels import IGNORE_INDEX, SHIFT_LABELS


@dataclass(frozen=True)
class SequenceParallel:
    group: Any  # torch.distributed.ProcessGroup of the ranks sharing one sequence
    rank: int
    size: int

    def shard(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return shard_batch(batch, self.rank, self.size)


def shard_batch(batch: dict[str, torch.Tensor], rank: int, size: int) -> dict[str, torch.Tensor]:
    """Rank `rank`'s slice (of `size`) of every tensor along the sequence, labels shifted first.

    A length that `size` does not divide is padded at the end (unscored tokens whose positions
    continue the last one): causal attention keeps them out of every real token's logits."""
    out = {k: v for k, v in batch.items() if k != "labels"}
    out[SHIFT_LABELS] = F.pad(batch["labels"], (0, 1), value=IGNORE_INDEX)[..., 1:]
    out = _pad_to_multiple(out, size)
    chunk = out["input_ids"].shape[1] // size
    return {k: v[:, rank * chunk:(rank + 1) * chunk].contiguous() for k, v in out.items()}


def _pad_to_multiple(batch: dict[str, torch.Tensor], size: int) -> dict[str, torch.Tensor]:
    missing = -batch["input_ids"].shape[1] % size
    if not missing:
        return batch
    out = {}
    for key, value in batch.items():
        if key == "position_ids":
            tail = value[:, -1:] + torch.arange(1, missing + 1, device=value.device)
            out[key] = torch.cat([value, tail], dim=1)
        else:
            out[key] = F.pad(value, (0, missing), value=IGNORE_INDEX if key == SHIFT_LABELS else 0)
    return out


def use_document_attention(lm: torch.nn.Module) -> None:
    """Keep packed documents apart under Ulysses with sdpa.

    DeepSpeed's Ulysses attention drops every 4D mask (transformers builds it for the local slice,
    and it is O(n^2)) and hands the core attention the whole sequence's position_ids. flash
    attention and sdpa_varlen find the documents in those; transformers' sdpa would be plainly
    causal across them (measured: loss 4.5753 instead of 4.5786 on two packed rows). So sdpa models
    switch to sdpa_varlen (the same attention per document, memory linear in seq_len)."""
    if lm.config._attn_implementation != "sdpa":
        return
    register_sdpa_varlen()
    lm.set_attn_implementation(SDPA_VARLEN)
