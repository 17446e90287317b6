"""`dist-ft status` and `dist-ft cancel` for a run launched with `--backend ssh` (RUN/ssh.json).

Status: which hosts run which stage, since when, the attempt, the last step (the ranks' heartbeats are
added by the CLI for every backend). Cancel: SIGTERM to each host's node agent over ssh (it passes the
signal to torchrun and the ranks, which checkpoint at the next step boundary, so the run resumes from
there), and to the launcher when it runs on this machine.
"""

from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import time
from pathlib import Path

from dist_ft.plan.plan import Plan
from dist_ft.plan.run_dir import RunDir
from dist_ft.plan.run_records import NodeRecord, SshRecord, read_record
from dist_ft.recipe.hostfile import host_problem
from .ssh_launch import ssh_argv
from .summary import read_metrics

AGENT_MODULE = "dist_ft.launcher.ssh_node"


def is_ssh_run(run_dir: Path) -> bool:
    return RunDir(run_dir).ssh_file.is_file()


def _launcher_alive(record: SshRecord | None) -> bool | None:
    """None: it runs on another machine, or the record is unreadable (cannot tell from here)."""
    if record is None or record.launcher.host != socket.gethostname():
        return None
    try:
        cmdline = Path(f"/proc/{record.launcher.pid}/cmdline").read_bytes()
    except OSError:
        return False
    return b"dist_ft" in cmdline or b"dist-ft" in cmdline


def node_records(run: RunDir, stage: str, attempt: int | None) -> list[NodeRecord]:
    """The node agents' records of `stage` (of one attempt, unless None) that can be read."""
    rows = [read_record(path, NodeRecord) for path in run.node_record_files(stage)]
    return [row for row in rows if row is not None and (attempt is None or row.attempt == attempt)]


def ssh_status_lines(run_dir: Path, plan: Plan) -> list[str]:
    run = RunDir(run_dir)
    record = read_record(run.ssh_file, SshRecord)
    alive = _launcher_alive(record)
    state = {True: "running", False: "not running", None: "on another machine"}[alive]
    hosts, launcher = (", ".join(record.hosts), record.launcher) if record else ("?", None)
    lines = [f"run {plan.name} in {run_dir}: ssh backend on {hosts}; launcher pid "
             f"{launcher.pid if launcher else '?'} on {launcher.host if launcher else '?'} ({state})"]
    for stage in plan.stages:
        info = record.stages.get(stage.name) if record else None
        rows = read_metrics(run.stage(stage.name).metrics)
        last = f"; last step {rows[-1]['step']} loss {rows[-1]['loss']:.4f}" if rows else ""
        if run.stage(stage.name).finished():
            lines.append(f"[{stage.name}] DONE{last}")
            continue
        if not info:
            lines.append(f"[{stage.name}] not started")
            continue
        st = info.state
        if st == "running" and alive is False:
            st = "interrupted (the launcher is gone)"
        lines.append(f"[{stage.name}] {st}, attempt {info.attempt or '?'}, since {info.started or '?'}"
                     f"{' until ' + info.ended if info.ended else ''}{last}")
        for node in node_records(run, stage.name, info.attempt):
            since = time.strftime("%H:%M:%S", time.localtime(node.started))
            lines.append(f"  node {node.node_rank} on {node.host}: agent pid {node.pid} since {since}")
    return lines


def ssh_cancel(run_dir: Path, plan: Plan) -> int:
    run = RunDir(run_dir)
    record = read_record(run.ssh_file, SshRecord)
    running = {name: info for name, info in (record.stages if record else {}).items() if info.state == "running"}
    if not running:
        print("nothing to cancel: no stage of this run is running")
        return 0
    status = 0
    for name, info in running.items():
        for node in node_records(run, name, info.attempt):
            host, pid = node.host, node.pid
            if host_problem(host):
                continue
            result = subprocess.run(ssh_argv(plan, host, _stop_agent_script(pid)), capture_output=True, text=True,
                                    timeout=60, stdin=subprocess.DEVNULL)
            said = (result.stdout.strip() or result.stderr.strip() or f"exit {result.returncode}").splitlines()[-1]
            print(f"[{name}] node {node.node_rank} on {host}: {said}")
            status = status or (0 if result.returncode == 0 else 1)
    if _launcher_alive(record):
        try:
            os.kill(record.launcher.pid, signal.SIGTERM)
            print(f"sent SIGTERM to the launcher (pid {record.launcher.pid})")
        except ProcessLookupError:
            pass  # it saw its hosts stop and exited meanwhile
    print("the ranks checkpoint at their next step; `dist-ft launch` with the same recipe resumes from there")
    return status


def _stop_agent_script(pid: int) -> str:
    """SIGTERM to the node agent, if that pid still is one (a pid may have been reused)."""
    return (f"if tr '\\0' ' ' < /proc/{pid}/cmdline 2>/dev/null | grep -q {shlex.quote(AGENT_MODULE)}; then "
            f"kill -TERM {pid} && echo 'stopping (SIGTERM to the node agent, pid {pid})'; "
            f"else echo 'not running (agent pid {pid} is gone)'; fi")


def print_ssh_status(run_dir: Path, plan: Plan) -> int:
    print("\n".join(ssh_status_lines(run_dir, plan)))
    return 0

