"""Validation loss by position band during a long-context stage (issue 27 item 4), and the warnings that
watch the losses (spikes in training loss, a validation loss that rises).

The band of a token is its position in its document (the row's position_ids), so "256-512" of a 512-token
stage is the positions beyond a 256-token model's native context whatever the packing. Every rank runs the
same rows (as `stage_eval.evaluate_loss` does: ZeRO-3 gathers each layer on every forward) and the LM head
over the same number of fixed-size chunks per row, so the collectives never depend on the data; the
full-vocabulary logits exist for one chunk at a time.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from dist_ft.decoding.bands import Band
from .data import collate
from .labels import IGNORE_INDEX
from .head_loss import head_logits

HEAD_CHUNK = 1024  # rows of logits alive at once


@torch.no_grad()
def band_losses(model: torch.nn.Module, rows: Sequence[dict[str, list[int]]], bands: Sequence[Band],
                device) -> dict[str, float]:
    """{loss_<band>: mean NLL, ppl_<band>: its perplexity} over the scored tokens of `rows`."""
    sums = torch.zeros(len(bands), 2, dtype=torch.float64)
    starts = torch.tensor([b.start for b in bands])
    ends = torch.tensor([b.end for b in bands])
    for row in rows:
        batch = {k: v.to(device) for k, v in collate([row]).items()}
        hidden = model.get_decoder()(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                                     use_cache=False).last_hidden_state[0, :-1]
        targets, positions = batch["labels"][0, 1:], batch["position_ids"][0, 1:].cpu()
        logits = head_logits(model)
        for start in range(0, targets.numel(), HEAD_CHUNK):
            end = start + HEAD_CHUNK
            nll = F.cross_entropy(logits(hidden[start:end]).float(), targets[start:end], reduction="none",
                                  ignore_index=IGNORE_INDEX).double().cpu()
            scored = (targets[start:end] != IGNORE_INDEX).cpu()
            inside = (positions[start:end, None] >= starts) & (positions[start:end, None] < ends) & scored[:, None]
            sums[:, 0] += (nll[:, None] * inside).sum(0)
            sums[:, 1] += inside.sum(0)
    values = {}
    for band, (total, count) in zip(bands, sums.tolist()):
        if count:
            values[f"loss_{band.label}"] = total / count
            values[f"ppl_{band.label}"] = math.exp(min(total / count, 700.0))
    return values


SPIKE_FACTOR = 1.5  # a training loss this many times the mean of the last SPIKE_WINDOW steps is a spike
SPIKE_WINDOW = 10
SPIKE_MIN_HISTORY = 5
RISE_FRACTION = 0.02  # a validation loss 2 % above the previous evaluation's is a rise


@dataclass
class LossWatch:
    """Reads each logged row; returns the warnings it calls for (the same on every rank: the rows are)."""
    recent: deque = field(default_factory=lambda: deque(maxlen=SPIKE_WINDOW))
    last_eval: tuple[int, float] | None = None

    def observe(self, row: dict) -> list[str]:
        warnings = []
        step, loss, eval_loss = row.get("step"), row.get("loss"), row.get("eval_loss")
        if isinstance(loss, float) and math.isfinite(loss):
            if len(self.recent) >= SPIKE_MIN_HISTORY and loss > SPIKE_FACTOR * (mean := sum(self.recent) / len(self.recent)):
                warnings.append(f"loss spike at step {step}: {loss:.4f}, {loss / mean:.1f}x the mean of the last "
                                f"{len(self.recent)} steps ({mean:.4f})")
            self.recent.append(loss)
        if isinstance(eval_loss, float):
            if self.last_eval is not None and eval_loss > self.last_eval[1] * (1 + RISE_FRACTION):
                warnings.append(f"validation loss rose from {self.last_eval[1]:.4f} (step {self.last_eval[0]}) to "
                                f"{eval_loss:.4f} (step {step}), more than {RISE_FRACTION:.0%}")
            self.last_eval = (step, eval_loss)
        return warnings
