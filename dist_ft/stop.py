"""A stop request every rank agrees on at a step boundary: a signal to this rank (SIGUSR1/SIGTERM
from SLURM or torchrun) or the run's stop file (touched by the sbatch script on any node)."""

from __future__ import annotations

import signal
from pathlib import Path

from . import engine as ds


class StopRequest:
    def __init__(self, stop_file: Path):
        self.stop_file = stop_file
        self.signalled: str | None = None
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum: int, _frame) -> None:
        self.signalled = signal.Signals(signum).name

    def agreed(self) -> bool:
        local = 1.0 if self.signalled or self.stop_file.exists() else 0.0
        return ds.all_reduce_max(local) > 0
