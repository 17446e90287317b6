"""A hung job stops, with real torchrun and a real gloo collective (issue 11, item 0b).

- A rank blocked in an all-reduce its peer never joins gets SIGTERM: Python never runs the signal
  handler (the main thread waits in C++), yet the stop watchdog ends the rank after the grace period.
- The local launcher, stopped, takes torchrun and its ranks down with it, although torchrun starts
  each rank in a session of its own and these ranks ignore SIGTERM.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import wait_for_pids
from tests.helpers import alive, free_port

pytestmark = pytest.mark.integration

WORKER = """
import os, signal, sys, time
from pathlib import Path
mode, pids = sys.argv[1], Path(sys.argv[2])
with open(pids, "a") as f:
    f.write(f"{os.getpid()}\\n")
if mode == "deaf":  # a rank that never stops by itself
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    while True:
        time.sleep(1)
import torch, torch.distributed as dist
dist.init_process_group("gloo")
if dist.get_rank() == 0:
    print("rank 0 waits outside any collective", flush=True)
    time.sleep(300)
from dist_ft.rank.stop import StopRequest
StopRequest(pids.parent / "no.stop", grace_s=1.0)
print("rank 1 enters the all-reduce", flush=True)
dist.all_reduce(torch.ones(1))  # rank 0 never joins: blocked in C++ until the gloo timeout (30 min)
print("all-reduce returned", flush=True)
"""


def test_a_rank_stuck_in_a_collective_ends_after_the_grace_period(tmp_path):
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": "2"}
    ranks = [subprocess.Popen([sys.executable, str(worker), "collective", str(tmp_path / "pids")],
                              env={**env, "RANK": str(r)}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r in (0, 1)]
    try:
        assert ranks[1].stdout.readline() == "rank 1 enters the all-reduce\n", ranks[1].stderr.read()
        time.sleep(1.0)  # let it block inside gloo
        sent = time.monotonic()
        ranks[1].send_signal(signal.SIGTERM)
        out, err = ranks[1].communicate(timeout=60)
        assert ranks[1].returncode == 128 + signal.SIGTERM, (out, err)
        assert "not honoured" in err and "all-reduce returned" not in out
        assert time.monotonic() - sent < 20
    finally:
        for rank in ranks:
            rank.kill()
            rank.wait()


def test_stopping_the_launcher_takes_torchrun_and_its_ranks_down(tmp_path):
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    pids = tmp_path / "pids"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1", "--nproc_per_node=2",
                str(worker), "deaf", str(pids)]
    launcher = subprocess.Popen(
        [sys.executable, "-c", "import sys; from dist_ft.launcher.local_launch import run_supervised; "
                               f"sys.exit(run_supervised({torchrun!r}, kill_after_s=3))"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ranks = wait_for_pids(pids, 2, timeout=120)
    family = ranks + [int(p) for p in _children(launcher.pid)]
    assert len(family) == 3 and all(alive(pid) for pid in family)  # torchrun and its two ranks
    launcher.send_signal(signal.SIGTERM)
    launcher.communicate(timeout=60)
    assert launcher.returncode == 128 + signal.SIGTERM
    deadline = time.monotonic() + 10
    while any(alive(pid) for pid in family) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [pid for pid in family if alive(pid)], "torchrun or a rank outlived the launcher"


def _children(pid: int) -> list[str]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return f.read().split()
