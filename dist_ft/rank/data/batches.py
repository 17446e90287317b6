"""Deterministic, resumable micro-batches for one data-parallel rank."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from dist_ft.plan import batching

BATCH_KEYS = ("input_ids", "position_ids", "labels")


class BatchStream:
    """Endless micro-batches of packed rows: this rank's share, in a new order every epoch.

    Epoch e shuffles all rows with seed + e. Global step k takes the next
    `micro_batch_size * dp_size` rows of that order and rank r gets every
    dp_size-th of them, so ranks are disjoint and step in lockstep; rows left
    over at the end of an epoch wait for the next permutation.

    The state is (epoch, position), position being how many rows of the epoch's
    order all ranks together have consumed. It does not depend on the rank, so
    a run may resume with another dp_size when position divides evenly.
    Batches carry no attention_mask: packed rows rely on position_ids.
    """

    def __init__(self, rows: Sequence[Mapping[str, Sequence[int]]], micro_batch_size: int, *, seed: int,
                 dp_rank: int = 0, dp_size: int = 1) -> None:
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} is outside 0..{dp_size - 1}")
        if micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be at least 1, got {micro_batch_size}")
        self.rows, self.micro_batch_size, self.seed = rows, micro_batch_size, seed
        self.dp_rank, self.dp_size = dp_rank, dp_size
        if len(rows) < self.rows_per_step:
            raise ValueError(f"{len(rows)} rows cannot fill one step of {dp_size} ranks × {micro_batch_size} rows")
        self.epoch, self.position = 0, 0
        self._order: tuple[int, torch.Tensor] | None = None

    @property
    def rows_per_step(self) -> int:
        """Rows all data-parallel ranks take per micro-step."""
        return batching.train_batch_size(self.micro_batch_size, 1, self.dp_size)

    @property
    def steps_per_epoch(self) -> int:
        return len(self.rows) // self.rows_per_step

    def __iter__(self) -> BatchStream:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        if self.position + self.rows_per_step > len(self.rows):
            self.epoch, self.position = self.epoch + 1, 0
        step_rows = self._epoch_order()[self.position:self.position + self.rows_per_step]
        self.position += self.rows_per_step
        return collate([self.rows[i] for i in step_rows[self.dp_rank::self.dp_size].tolist()])

    def _epoch_order(self) -> torch.Tensor:
        """The epoch's permutation, kept as a tensor (8 bytes a row, not a list of Python ints)."""
        if self._order is None or self._order[0] != self.epoch:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            self._order = (self.epoch, torch.randperm(len(self.rows), generator=generator))
        return self._order[1]

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "num_rows": len(self.rows)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if (state["seed"], state["num_rows"]) != (self.seed, len(self.rows)):
            raise ValueError(f"the saved stream had seed {state['seed']} over {state['num_rows']} rows; this one "
                             f"has seed {self.seed} over {len(self.rows)}: resuming needs the same data and seed")
        if state["position"] % self.rows_per_step:
            raise ValueError(f"position {state['position']} is not a whole number of steps of "
                             f"{self.rows_per_step} rows ({self.dp_size} ranks × {self.micro_batch_size})")
        self.epoch, self.position = state["epoch"], state["position"]


def collate(rows: Sequence[Mapping[str, Sequence[int]]]) -> dict[str, torch.Tensor]:
    """Stack equal-length rows into long tensors (input_ids, position_ids, labels)."""
    return {key: torch.tensor([list(row[key]) for row in rows], dtype=torch.long) for key in BATCH_KEYS}
