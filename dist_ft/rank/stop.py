"""A stop request every rank agrees on at a step boundary: a signal to this rank (SIGUSR1/SIGTERM
from SLURM or torchrun) or the run's stop file (touched by the sbatch script on any node).

A rank stuck in a collective never reaches that boundary, and Python runs signal handlers only
between bytecodes, which a thread blocked in C++ never does. So a signal also arms a watchdog
thread: if the ranks have not agreed to stop within the grace period, it ends the process.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Mapping

STOP_GRACE_ENV = "DIST_FT_STOP_GRACE_S"
DEFAULT_STOP_GRACE_S = 60.0
STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


def stop_grace_s(environ: Mapping[str, str] | None = None) -> float:
    """Seconds a signalled rank may take to reach a step boundary (`DIST_FT_STOP_GRACE_S`, via
    `cluster.env`); 0 turns the watchdog off."""
    text = (os.environ if environ is None else environ).get(STOP_GRACE_ENV, "")
    try:
        value = float(text) if text.strip() else DEFAULT_STOP_GRACE_S
    except ValueError:
        value = -1.0
    if not value >= 0 or value == float("inf"):
        print(f"dist-ft: {STOP_GRACE_ENV}={text!r} is not a number of seconds; using {DEFAULT_STOP_GRACE_S:g}",
              file=sys.stderr)
        return DEFAULT_STOP_GRACE_S
    return value


class StopWatchdog:
    """Ends the process (exit 128 + signal) when a stop signal is not honoured in time.

    CPython's C-level handler writes each signal's number to the wakeup fd at once, even while the
    main thread waits in C++; this thread reads it there. The wait is `grace_s`, or twice the
    longest step seen so far when steps are slower, so a healthy slow step is not cut short.
    """

    def __init__(self, grace_s: float, signals=STOP_SIGNALS):
        self.grace_s = grace_s
        self.longest_step_s = 0.0
        self._signals = {int(s) for s in signals}
        self._honoured = threading.Event()
        read_fd, write_fd = os.pipe()
        os.set_blocking(write_fd, False)
        signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
        threading.Thread(target=self._watch, args=(read_fd,), name="dist-ft-stop-watchdog", daemon=True).start()

    def honoured(self) -> None:
        self._honoured.set()

    def _watch(self, read_fd: int) -> None:
        signum = self._next_stop_signal(read_fd)
        wait_s = max(self.grace_s, 2 * self.longest_step_s)
        if self._honoured.wait(wait_s):
            return
        name = signal.Signals(signum).name
        print(f"dist-ft: {name} received {wait_s:.0f} s ago and not honoured (no step boundary reached: stuck "
              f"in a collective?); ending this rank without a checkpoint. Raise {STOP_GRACE_ENV} if steps are "
              "slower than that.", file=sys.stderr, flush=True)
        os._exit(128 + signum)

    def _next_stop_signal(self, read_fd: int) -> int:
        while True:
            for signum in os.read(read_fd, 64):
                if signum in self._signals:
                    return signum


class StopRequest:
    def __init__(self, stop_file: Path, grace_s: float | None = None):
        self.stop_file = stop_file
        self.signalled: str | None = None
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._on_signal)
        grace_s = stop_grace_s() if grace_s is None else grace_s
        self.watchdog = StopWatchdog(grace_s) if grace_s > 0 else None
        self._last_boundary = time.monotonic()

    def _on_signal(self, signum: int, _frame) -> None:
        self.signalled = signal.Signals(signum).name

    def agreed(self) -> bool:
        from . import engine as ds  # here, not at import: the watchdog is testable without DeepSpeed

        self._time_step()
        local = 1.0 if self.signalled or self.stop_file.exists() else 0.0
        stop = ds.all_reduce_max(local) > 0
        if stop and self.watchdog:
            self.watchdog.honoured()  # every rank reached the boundary: the checkpoint may take its time
        return stop

    def _time_step(self) -> None:
        now = time.monotonic()
        if self.watchdog:
            self.watchdog.longest_step_s = max(self.watchdog.longest_step_s, now - self._last_boundary)
        self._last_boundary = now
