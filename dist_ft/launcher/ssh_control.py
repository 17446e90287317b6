"""`dist-ft status` and `dist-ft cancel` for a run launched with `--backend ssh` (RUN/ssh.json).

Status: which hosts run which stage, since when, the attempt, the last step (the ranks' heartbeats are
added by the CLI for every backend). Cancel: SIGTERM to each host's node agent over ssh (it passes the
signal to torchrun and the ranks, which checkpoint at the next step boundary, so the run resumes from
there), and to the launcher when it runs on this machine.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import subprocess
import time
from pathlib import Path

from dist_ft.plan.plan import Plan
from dist_ft.plan.run_dir import RunDir
from dist_ft.recipe.hostfile import host_problem
from .ssh_launch import read_record, ssh_argv
from .summary import read_metrics

AGENT_MODULE = "dist_ft.launcher.ssh_node"


def is_ssh_run(run_dir: Path) -> bool:
    return RunDir(run_dir).ssh_file.is_file()


def _launcher_alive(record: dict) -> bool | None:
    """None: it runs on another machine (cannot tell from here)."""
    launcher = record.get("launcher") or {}
    if launcher.get("host") != socket.gethostname() or not isinstance(launcher.get("pid"), int):
        return None
    try:
        cmdline = Path(f"/proc/{launcher['pid']}/cmdline").read_bytes()
    except OSError:
        return False
    return b"dist_ft" in cmdline or b"dist-ft" in cmdline


def node_records(run: RunDir, stage: str, attempt: int | None) -> list[dict]:
    out = []
    for path in sorted((run.control / "nodes").glob(f"{stage}.node*.json")):
        try:
            row = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(row, dict) and (attempt is None or row.get("attempt") == attempt):
            out.append(row)
    return out


def ssh_status_lines(run_dir: Path, plan: Plan) -> list[str]:
    run, record = RunDir(run_dir), read_record(RunDir(run_dir))
    alive = _launcher_alive(record)
    launcher = record.get("launcher") or {}
    state = {True: "running", False: "not running", None: "on another machine"}[alive]
    lines = [f"run {plan.name} in {run_dir}: ssh backend on {', '.join(record.get('hosts', []))}; launcher pid "
             f"{launcher.get('pid', '?')} on {launcher.get('host', '?')} ({state})"]
    for stage in plan.stages:
        info = (record.get("stages") or {}).get(stage.name)
        rows = read_metrics(run.stage(stage.name).metrics)
        last = f"; last step {rows[-1]['step']} loss {rows[-1]['loss']:.4f}" if rows else ""
        if run.stage(stage.name).finished():
            lines.append(f"[{stage.name}] DONE{last}")
            continue
        if not info:
            lines.append(f"[{stage.name}] not started")
            continue
        st = info.get("state", "?")
        if st == "running" and alive is False:
            st = "interrupted (the launcher is gone)"
        lines.append(f"[{stage.name}] {st}, attempt {info.get('attempt', '?')}, since {info.get('started', '?')}"
                     f"{' until ' + info['ended'] if info.get('ended') else ''}{last}")
        for node in node_records(run, stage.name, info.get("attempt")):
            since = time.strftime("%H:%M:%S", time.localtime(node.get("started", 0)))
            lines.append(f"  node {node.get('node_rank')} on {node.get('host')}: agent pid {node.get('pid')} "
                         f"since {since}")
    return lines


def ssh_cancel(run_dir: Path, plan: Plan) -> int:
    run, record = RunDir(run_dir), read_record(RunDir(run_dir))
    running = {name: info for name, info in (record.get("stages") or {}).items() if info.get("state") == "running"}
    if not running:
        print("nothing to cancel: no stage of this run is running")
        return 0
    status = 0
    for name, info in running.items():
        for node in node_records(run, name, info.get("attempt")):
            host, pid = node.get("host"), node.get("pid")
            if not isinstance(host, str) or host_problem(host) or not isinstance(pid, int):
                continue
            result = subprocess.run(ssh_argv(plan, host, _stop_agent_script(pid)), capture_output=True, text=True,
                                    timeout=60, stdin=subprocess.DEVNULL)
            said = (result.stdout.strip() or result.stderr.strip() or f"exit {result.returncode}").splitlines()[-1]
            print(f"[{name}] node {node.get('node_rank')} on {host}: {said}")
            status = status or (0 if result.returncode == 0 else 1)
    if _launcher_alive(record):
        try:
            os.kill(record["launcher"]["pid"], signal.SIGTERM)
            print(f"sent SIGTERM to the launcher (pid {record['launcher']['pid']})")
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

