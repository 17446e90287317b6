"""`dist-ft launch --backend ssh`: plain machines listed in `cluster.hostfile` / `cluster.hosts`.

For each stage, in order, one `ssh HOST` per host runs the node agent (`ssh_node.py`), which runs one
elastic `torchrun` (c10d rendezvous on the first host, `cluster.max_restarts`) under the local
backend's supervision. Before the first stage every host proves it sees the run dir: the launcher
writes a fresh token into it and each host must read the same token back.

Stopping: the launcher keeps each ssh's stdin open; when it closes (the launcher stops, fails or dies)
the node agent SIGTERMs its torchrun, whose ranks checkpoint at the next step boundary (rank/stop.py).
Pure parts (commands, scripts) are separate from the process handling at the bottom.
"""

from __future__ import annotations

import os
import secrets
import shlex
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

from dist_ft.plan.plan import Plan, StagePlan
from dist_ft.plan.run_dir import RunDir
from dist_ft.plan.run_records import LauncherProcess, SshRecord, StageAttempt, read_record, write_record
from dist_ft.recipe.hostfile import address
from .heartbeat_status import EXIT_SILENT_RANK, HangWatch
from .local_launch import (_die_with_parent, _grace, collective_timeout_s, crashed_after_done, kill_descendants,
                           prelude)

SSH_BASE = ("ssh", "-o", "BatchMode=yes", "-o", "ConnectTimeout=20", "-o", "ServerAliveInterval=15",
            "-o", "ServerAliveCountMax=4")
EXIT_NO_RUN_DIR = 3
SSH_FAILED = 255  # what ssh itself exits with when it cannot connect or log in
PREFLIGHT_TIMEOUT_S = 120.0


def ssh_argv(plan: Plan, host: str, remote_script: str) -> list[str]:
    """ssh to `host` running `remote_script` with bash. The remote login shell parses the command
    line, so the script reaches it as one quoted word."""
    return [*SSH_BASE, *plan.cluster.ssh_options, "--", host, "bash -c " + shlex.quote(remote_script)]


def dry_run_text(plan: Plan, python: str) -> list[str]:
    """What each host would run for each stage, as a person can read and paste it: `ssh ... HOST bash -s`
    with the node's script on stdin (a quoted here-document: nothing in it is expanded locally), instead of
    the script quoted into one word of the command line. The rendezvous port and token are chosen at launch."""
    rdzv = Rendezvous(f"{address(plan.cluster.hosts[0])}:PORT", f"{plan.name}-TOKEN")
    lines = [f"# ssh backend, {len(plan.stages)} stage(s) x {plan.nodes} host(s); PORT and TOKEN are chosen "
             "at launch"]
    for stage in plan.stages:
        for rank, host in enumerate(plan.cluster.hosts):
            script = node_script(plan, stage, python, rank, rdzv, 1).rstrip("\n")
            end = _heredoc_end(script)
            command = shlex.join([*SSH_BASE, *plan.cluster.ssh_options, "--", host, "bash", "-s"])
            lines += ["", f"# [{stage.name}] node {rank} on {host}", f"{command} <<'{end}'", script, end]
    return lines


def _heredoc_end(script: str) -> str:
    """A here-document delimiter no line of the script equals."""
    end, taken = "DIST_FT_NODE", set(script.splitlines())
    while end in taken:
        end += "_"
    return end


def preflight_script(plan: Plan, python: str, token: str) -> str:
    """Runs on every host before the first stage: the recipe's setup, then the run dir's token read back
    (exit 3 when it differs), then a free port from the training interpreter (dist_ft importable)."""
    token_file = shlex.quote(str(RunDir(Path(plan.run_dir)).ssh_token))
    python = shlex.quote(python)
    probe = ("import socket, dist_ft; s = socket.socket(); s.bind(('', 0)); "
             "print('dist-ft-port', s.getsockname()[1])")
    return "\n".join([
        "set -euo pipefail", *prelude(plan),
        f'if [ "$(cat {token_file} 2>/dev/null)" != {shlex.quote(token)} ]; then '
        f'echo "dist-ft: $(hostname) cannot read" {token_file} >&2; exit {EXIT_NO_RUN_DIR}; fi',
        f"exec {python} -c {shlex.quote(probe)}"]) + "\n"


@dataclass(frozen=True)
class Rendezvous:
    endpoint: str  # HOST:PORT on the first host
    run_id: str


def node_script(plan: Plan, stage: StagePlan, python: str, node_rank: int, rdzv: Rendezvous, attempt: int) -> str:
    """What one host runs for one stage: setup and env, then the node agent (which runs torchrun) on the
    training interpreter `python` (`launch_script.training_python`, resolved once by the command)."""
    agent = [python, "-m", "dist_ft.launcher.ssh_node", f"--run-dir={plan.run_dir}", f"--stage={stage.name}",
             f"--node-rank={node_rank}", f"--endpoint={rdzv.endpoint}", f"--rdzv-id={rdzv.run_id}",
             f"--attempt={attempt}", f"--host={plan.cluster.hosts[node_rank]}"]
    return "\n".join(["set -euo pipefail", *prelude(plan), "exec " + shlex.join(agent)]) + "\n"


def torchrun_command(plan: Plan, stage: StagePlan, python: str, node_rank: int, endpoint: str,
                     run_id: str, local_addr: str) -> list[str]:
    """One node's elastic torchrun: c10d rendezvous hosted by node 0's agent, restarts per the recipe."""
    return [python, "-m", "torch.distributed.run", f"--nnodes={plan.nodes}", f"--nproc_per_node={plan.ranks_per_node}",
            "--rdzv_backend=c10d", f"--rdzv_endpoint={endpoint}", f"--rdzv_id={run_id}",
            f"--rdzv_conf=is_host={1 if node_rank == 0 else 0}", f"--local_addr={local_addr}",
            f"--max_restarts={plan.cluster.max_restarts}", "-m", "dist_ft", "train", f"--run-dir={plan.run_dir}",
            f"--stage={stage.name}"]


def next_attempt(run: RunDir, stage: str) -> int:
    """1 + the highest attempt with a log for this stage (launches of it so far)."""
    return max(run.node_log_attempts(stage), default=0) + 1


# ---- running ------------------------------------------------------------------------------------

def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def run_stages_ssh(plan: Plan, python: str, dry_run: bool) -> int:
    run, hosts = plan.run, plan.cluster.hosts
    token = secrets.token_hex(16)
    if dry_run:
        print("\n".join(dry_run_text(plan, python)))
        return 0
    run.ssh_token.parent.mkdir(parents=True, exist_ok=True)
    run.ssh_token.write_text(token + "\n")
    port, error = _preflight(plan, python, token)
    if error:
        print(error, file=sys.stderr)
        return 2 if "shared filesystem" in error else 1
    port = plan.cluster.rdzv_port or port
    previous = read_record(run.ssh_file, SshRecord)  # for `dist-ft status` / `cancel` (ssh_control.py)
    record = SshRecord(hosts=list(hosts), launcher=LauncherProcess(socket.gethostname(), os.getpid()),
                       started=_now(), stages=previous.stages if previous else {})
    write_record(run.ssh_file, record)
    for stage in plan.stages:
        if run.stage(stage.name).finished():
            print(f"[{stage.name}] already complete; skipped", flush=True)
            record = record.with_stage(stage.name, replace(record.stages.get(stage.name, StageAttempt("done")),
                                                           state="done"))
            continue
        attempt = next_attempt(run, stage.name)
        rdzv = Rendezvous(f"{address(hosts[0])}:{port}", f"{plan.name}-{stage.name}-{token[:8]}-{attempt}")
        running = StageAttempt("running", attempt=attempt, started=_now(), endpoint=rdzv.endpoint, hosts=list(hosts))
        write_record(run.ssh_file, record := record.with_stage(stage.name, running))
        print(f"[{stage.name}] attempt {attempt} on {', '.join(hosts)} (rendezvous {rdzv.endpoint}); logs: "
              f"{run.node_log(stage.name, 0, hosts[0], attempt).name} ...", flush=True)
        status, failed_host = _run_stage(plan, stage, python, rdzv, attempt)
        finished = run.stage(stage.name).finished()
        if finished and status != 0:
            print(crashed_after_done(stage.name, status), file=sys.stderr, flush=True)
        state = "done" if finished else "stopped" if status in (0, 130, 143) else "failed"
        record = record.with_stage(stage.name, replace(running, state=state, ended=_now(), exit=status))
        write_record(run.ssh_file, record)
        if not finished:
            _explain_failure(plan, stage, status, failed_host, attempt)
            return status or 1
        if stage is not plan.stages[-1]:
            port = plan.cluster.rdzv_port or _fresh_port(plan, python, token) or port
    return 0


def _explain_failure(plan: Plan, stage: StagePlan, status: int, failed_host: str | None, attempt: int) -> None:
    from .heartbeat_status import stale_lines

    run = plan.run
    if status == 0:
        print(f"error: stage {stage.name} stopped before its end (checkpointed); later stages were not run. "
              "Re-run the same command to resume.", file=sys.stderr)
        return
    where = f" on {failed_host}" if failed_host else ""
    if status - 128 in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        print(f"error: stage {stage.name} was stopped by {signal.Signals(status - 128).name}{where}: its ranks "
              "checkpoint at their next step boundary before they exit. Re-run the same command to resume.",
              file=sys.stderr)
        return
    print(f"error: stage {stage.name} failed{where} with exit status {status}; later stages were not run. "
          f"Re-run the same command to resume from its last checkpoint.", file=sys.stderr)
    for line in stale_lines(run, stage.name, plan.world_size):
        print("  " + line, file=sys.stderr)
    if failed_host:
        node = plan.cluster.hosts.index(failed_host)
        log = run.node_log(stage.name, node, failed_host, attempt)
        print(f"  last lines of {log}:", file=sys.stderr)
        for line in _tail(log, 8):
            print("    " + line, file=sys.stderr)


def _tail(path: Path, n: int) -> list[str]:
    try:
        return path.read_text(errors="replace").splitlines()[-n:]
    except OSError:
        return []


def _preflight(plan: Plan, python: str, token: str) -> tuple[int, str | None]:
    """(a free port on the first host, None), or (0, a one-line error naming the host)."""
    script = preflight_script(plan, python, token)
    procs = [(host, subprocess.Popen(ssh_argv(plan, host, script), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)) for host in plan.cluster.hosts]
    port, errors = 0, []
    deadline = time.monotonic() + PREFLIGHT_TIMEOUT_S
    for i, (host, proc) in enumerate(procs):
        try:
            out, err = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            errors.append(f"error: {host} did not answer within {PREFLIGHT_TIMEOUT_S:.0f} s (ssh or the recipe's "
                          "setup lines hang)")
            continue
        last = (err.strip().splitlines() or [""])[-1]
        if proc.returncode == EXIT_NO_RUN_DIR:
            errors.append(f"error: host {host} does not see the run dir {plan.run_dir}: it must be on a shared "
                          "filesystem that every host mounts at the same path (NFS, Lustre, a shared volume)")
        elif proc.returncode == SSH_FAILED:
            errors.append(f"error: cannot ssh to {host} (BatchMode, no password prompts): {last}")
        elif proc.returncode != 0:
            errors.append(f"error: the setup on host {host} failed (exit {proc.returncode}): {last}")
        elif i == 0:
            words = [line.split() for line in out.splitlines() if line.startswith("dist-ft-port ")]
            port = int(words[-1][1]) if words and words[-1][1].isdigit() else 0
    if errors:
        return 0, "\n".join(errors)
    if not port:
        return 0, f"error: host {plan.cluster.hosts[0]} did not report a free port"
    return port, None


def _fresh_port(plan: Plan, python: str, token: str) -> int:
    port, error = _preflight(plan, python, token)
    return 0 if error else port


def _run_stage(plan: Plan, stage: StagePlan, python: str, rdzv: Rendezvous,
               attempt: int) -> tuple[int, str | None]:
    """One ssh per host; the first host to fail takes the others down. Returns (exit status, failed host)."""
    run, hosts = plan.run, plan.cluster.hosts
    run.logs.mkdir(parents=True, exist_ok=True)
    procs: list[subprocess.Popen] = []
    for i, host in enumerate(hosts):
        with open(run.node_log(stage.name, i, host, attempt), "ab") as log:
            procs.append(subprocess.Popen(ssh_argv(plan, host, node_script(plan, stage, python, i, rdzv, attempt)),
                                          stdin=subprocess.PIPE, stdout=log, stderr=subprocess.STDOUT,
                                          start_new_session=True, preexec_fn=_die_with_parent(os.getpid())))
    watch = HangWatch(run, stage.name, after_s=collective_timeout_s(plan))
    return supervise_hosts(procs, hosts, kill_after_s=2 * _grace(plan) + 30, watch=watch)


def supervise_hosts(procs: list[subprocess.Popen], hosts: list[str], kill_after_s: float,
                    watch: HangWatch | None = None) -> tuple[int, str | None]:
    """Wait for every host. A signal to the launcher, a host that fails, or a rank the watch finds silent
    closes every ssh's stdin (the node agents stop their ranks, which checkpoint); what is still running
    `kill_after_s` later, or at a second signal, is killed. Returns (status, first failed host)."""
    received: list[int] = []

    def on_signal(signum: int, _frame) -> None:
        received.append(signum)
        if len(received) == 1:
            print(f"\ndist-ft: {signal.Signals(signum).name}: stopping every host's ranks (they checkpoint at the "
                  f"next step); anything left in {kill_after_s:.0f} s is killed, at once on a second signal",
                  file=sys.stderr, flush=True)

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    failed: tuple[int, str] | None = None
    stopping_since: float | None = None
    try:
        while [p.poll() for p in procs].count(None):  # poll every one: each sets its returncode
            if failed is None:
                failed = next(((p.returncode, h) for p, h in zip(procs, hosts)
                               if p.returncode not in (None, 0)), None)
            if failed is None and watch is not None and (silent := watch.silent_rank()):
                print(watch.message(silent), file=sys.stderr, flush=True)
                failed = (EXIT_SILENT_RANK, silent.host if silent.host in hosts else None)
            if (received or failed) and stopping_since is None:
                stopping_since = time.monotonic()
                for p in procs:
                    _close_stdin(p)
            if stopping_since is not None and (time.monotonic() - stopping_since > kill_after_s or len(received) > 1):
                for p in procs:
                    if p.poll() is None:
                        p.kill()
            time.sleep(0.2)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for p in procs:
            _close_stdin(p)
        kill_descendants()
    if failed is None:
        failed = next(((p.returncode, h) for p, h in zip(procs, hosts) if p.returncode != 0), None)
    if received:
        return 128 + received[0], None
    return (failed[0], failed[1]) if failed else (0, None)


def _close_stdin(proc: subprocess.Popen) -> None:
    try:
        if proc.stdin and not proc.stdin.closed:
            proc.stdin.close()
    except OSError:
        pass
