"""The node agent of the ssh backend: what `ssh HOST` runs for one stage on one host.

It records itself in the run dir (host, pid, since when: `dist-ft status` and `cancel` read it), runs
the node's elastic torchrun under the local backend's supervision (`run_supervised`: a SIGTERM reaches
every rank, which checkpoints at the next step; nothing outlives the agent), and treats the end of its
stdin as a stop request: the launcher closes it to stop the run, and so does a dropped connection.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import threading
import time
from pathlib import Path

from dist_ft.plan.plan import Plan
from dist_ft.plan.run_dir import RunDir
from dist_ft.plan.run_records import NodeRecord, write_record
from dist_ft.rank.heartbeat import HOST_ENV
from dist_ft.recipe.hostfile import address
from .local_launch import _grace, run_supervised
from .ssh_launch import torchrun_command


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dist_ft.launcher.ssh_node")
    p.add_argument("--run-dir", required=True)
    p.add_argument("--stage", required=True)
    p.add_argument("--node-rank", type=int, required=True)
    p.add_argument("--endpoint", required=True)
    p.add_argument("--rdzv-id", required=True)
    p.add_argument("--attempt", type=int, required=True)
    p.add_argument("--host", required=True)
    args = p.parse_args(argv)
    run = RunDir(Path(args.run_dir))
    plan = Plan.from_json(run.plan_file.read_text())
    stage = plan.stage(args.stage)
    cmd = torchrun_command(plan, stage, sys.executable, args.node_rank, args.endpoint, args.rdzv_id,
                           address(args.host))
    record = run.node_record(args.stage, args.node_rank)
    record.parent.mkdir(parents=True, exist_ok=True)
    write_record(record, NodeRecord(host=args.host, hostname=socket.gethostname(), pid=os.getpid(),
                                    node_rank=args.node_rank, attempt=args.attempt, started=time.time(),
                                    endpoint=args.endpoint))
    print(f"dist-ft node {args.node_rank} on {socket.gethostname()} (pid {os.getpid()}): {' '.join(cmd)}",
          flush=True)
    stop = threading.Event()
    threading.Thread(target=_stop_at_end_of_stdin, args=(stop,), name="dist-ft-stdin", daemon=True).start()
    # Each rendezvous round gets a fresh store for the workers: with torch's shared agent store, keys of the
    # previous round (the old ranks' gloo addresses) were read after an elastic restart ("connection refused").
    env = {**os.environ, HOST_ENV: args.host, "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    status = run_supervised(cmd, kill_after_s=2 * _grace(plan), env=env, stop=stop)
    print(f"dist-ft node {args.node_rank}: torchrun exited with status {status}", flush=True)
    return status


def _stop_at_end_of_stdin(stop: threading.Event) -> None:
    """The launcher holds our stdin open while it wants the stage to run. Its end is a stop request, not a
    signal: `dist-ft cancel` SIGTERMs this agent and the launcher at once, and the launcher then closes
    our stdin — as a second signal that would kill the ranks before their checkpoint."""
    try:
        while os.read(0, 4096):  # the raw fd: a buffered reader's lock would trouble the interpreter's exit
            pass
    except OSError:
        pass
    stop.set()


if __name__ == "__main__":
    raise SystemExit(main())
