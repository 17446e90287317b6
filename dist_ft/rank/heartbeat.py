"""Each rank's heartbeat: a thread rewrites RUN/heartbeats/<stage>/rank<N>.json every few seconds with
the rank's host, pid and last step. A rank stuck in a collective keeps beating (its thread runs while the
main thread waits in C++); a stopped, frozen or dead process does not, so `dist-ft status` and the
launchers can name the rank, and its host, whose heartbeat went stale."""

from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path
from typing import Any

from dist_ft.plan.run_records import HeartbeatRow, write_record

HEARTBEAT_INTERVAL_S = 5.0
HOST_ENV = "DIST_FT_HOST"  # the hostfile's name for this host, set by the ssh node agent


class Heartbeat:
    def __init__(self, path: Path, rank: int, restart: int, interval_s: float = HEARTBEAT_INTERVAL_S):
        self.path, self.interval_s = path, interval_s
        self.state: Any = None  # the loop's state (its .step), once there is one
        self._stopped = threading.Event()
        self._info = {"rank": rank, "host": os.environ.get(HOST_ENV) or socket.gethostname(),
                      "hostname": socket.gethostname(), "pid": os.getpid(), "restart": restart,
                      "started": time.time(), "interval_s": interval_s}
        path.parent.mkdir(parents=True, exist_ok=True)
        self._write()
        threading.Thread(target=self._run, name="dist-ft-heartbeat", daemon=True).start()

    def follow(self, state: Any) -> None:
        self.state = state

    def close(self, outcome: str) -> None:
        """The rank is done with the stage: a final beat that says so (not stale, whatever its age)."""
        self._stopped.set()
        self._write(ended=outcome)

    def _run(self) -> None:
        while not self._stopped.wait(self.interval_s):
            self._write()

    def _write(self, ended: str | None = None) -> None:
        step = getattr(self.state, "step", None)
        try:
            write_record(self.path, HeartbeatRow(**self._info, step=step, time=time.time(), ended=ended))
        except OSError:
            pass  # a full or vanished disk must not take training down; status will call it stale
