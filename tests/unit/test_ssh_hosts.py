"""The ssh backend's pure parts: hostfile, plan-time checks, the scripts sent to hosts, supervision of
several hosts, heartbeats. The real sshd runs are in tests/integration/test_ssh_backend.py."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time

import pytest

from dist_ft.cli import main
from dist_ft.launcher.heartbeat_status import EXIT_SILENT_RANK, HangWatch, heartbeat_report, is_stale, stale_lines
from dist_ft.launcher.local_launch import run_supervised
from dist_ft.launcher.ssh_launch import (EXIT_NO_RUN_DIR, Rendezvous, next_attempt, node_script, preflight_script,
                                         ssh_argv, supervise_hosts, torchrun_command)
from dist_ft.plan.plan import Plan
from dist_ft.plan.run_dir import RunDir
from dist_ft.plan.run_records import (HeartbeatRow, LauncherProcess, NodeRecord, SshRecord, StageAttempt,
                                      write_record)
from dist_ft.rank.heartbeat import Heartbeat
from dist_ft.recipe.hostfile import parse_hostfile
from tests.conftest import demo_raw

NASTY = "it's $(touch pwned) `id` \"q\""


def ssh_raw(**cluster) -> dict:
    raw = demo_raw()
    raw["cluster"] = {**raw.get("cluster", {}), "nodes": 2, "procs_per_node": 1, **cluster}
    return raw


def test_hostfile_format_of_deepspeed_with_comments():
    entries = parse_hostfile("# workers\n\nnode-a slots=4   # the first\nuser@10.0.0.2 slots=4\nnode-c\n")
    assert [(e.host, e.slots, e.line) for e in entries] == [("node-a", 4, 3), ("user@10.0.0.2", 4, 4),
                                                            ("node-c", None, 5)]


@pytest.mark.parametrize("text, words", [
    ("node-a;reboot slots=1\n", "line 1"), ("a slots=x\n", "slots=x"), ("a b\n", "'b'"),
    ("a slots=1 slots=1\n", "slots=1"), ("# nothing\n\n", "no hosts"), ("$(id) slots=1\n", "line 1"),
    ("-oProxyCommand=x\n", "line 1"), ("a slots=0\n", "at least 1")])
def test_bad_hostfile_lines_are_named(text, words):
    with pytest.raises(ValueError, match=None) as err:
        parse_hostfile(text)
    assert words in str(err.value)


def test_a_good_hostfile_becomes_the_plans_hosts(tmp_path, recipe_file, capsys):
    (tmp_path / "hosts").write_text("# two\nnode-a slots=1\nnode-b slots=1\n")
    recipe = recipe_file(ssh_raw(hostfile="hosts"))  # relative to the recipe's folder
    assert main(["plan", str(recipe), "--json"]) == 0
    plan = Plan.from_json(capsys.readouterr().out)
    assert plan.cluster.hosts == ["node-a", "node-b"] and plan.cluster.hostfile == str(tmp_path / "hosts")


@pytest.mark.parametrize("hostfile, cluster, words", [
    (None, {"hostfile": "missing"}, "cannot read"),
    ("a slots=1\nb slots=2\n", {}, "b has slots=2 but every node runs 1 rank"),
    ("a slots=1\nb;x slots=1\n", {}, "line 2"),
    ("a\nb\nc\n", {}, "the hostfile list(s) 3 host(s)"),
    ("a\na\n", {}, "lists a host twice"),
    ("a\nb\n", {"hosts": ["a", "b"]}, "both cluster.hosts and cluster.hostfile"),
    (None, {"hosts": ["a", "$(reboot)"]}, "hosts[1]"),
    (None, {"hosts": ["a"]}, "the hosts list(s) 1 host(s)"),
    (None, {"hosts": ["a", "b"], "ssh_options": ["-p\n22"]}, "ssh_options[0]"),
])
def test_hostfile_and_hosts_problems_are_refused_at_plan_time(tmp_path, recipe_file, capsys, hostfile, cluster,
                                                              words):
    if hostfile is not None:
        (tmp_path / "hosts").write_text(hostfile)
        cluster = {"hostfile": "hosts", **cluster}
    assert main(["plan", str(recipe_file(ssh_raw(**cluster)))]) == 2
    err = capsys.readouterr().err
    assert words in err, err
    assert not (tmp_path / "runs").exists()


def test_ssh_backend_without_hosts_is_refused(recipe_file, capsys, tmp_path):
    assert main(["launch", str(recipe_file(ssh_raw())), "--backend", "ssh", "--dry-run"]) == 2
    assert "the ssh backend needs the hosts" in capsys.readouterr().err


def test_ssh_dry_run_prints_one_command_per_host_and_stage(tmp_path, recipe_file, capsys):
    recipe = recipe_file(ssh_raw(hosts=["node-a", "node-b"], ssh_options=["-p", "2222"]))
    assert main(["plan", str(recipe), "--json"]) == 0
    stages = len(Plan.from_json(capsys.readouterr().out).stages)
    assert main(["launch", str(recipe), "--backend", "ssh", "--dry-run", "--out", str(tmp_path / "r")]) == 0
    out = capsys.readouterr().out
    assert out.count("ssh -o BatchMode=yes") == 2 * stages and "-p 2222 -- node-b bash -s" in out
    assert not (tmp_path / "r").exists()  # a dry run writes nothing


def _plan(tmp_path, recipe_file, capsys, run_dir) -> Plan:
    recipe = recipe_file(ssh_raw(hosts=["node-a", "user@node-b"], setup=["echo setup ran"],
                                 env={"A_VAR": NASTY}))
    assert main(["render", str(recipe), "--out", str(run_dir)]) == 0
    capsys.readouterr()
    return Plan.from_json((run_dir / "plan.json").read_text())


def test_scripts_sent_to_hosts_are_valid_bash_and_quote_everything(tmp_path, recipe_file, capsys):
    """What reaches the remote shell is one quoted word: a hostile run dir path and env value stay text."""
    run_dir = tmp_path / f"run {NASTY}"
    plan = _plan(tmp_path, recipe_file, capsys, run_dir)
    rdzv = Rendezvous("node-a:29400", "demo-ctx-1")
    python = sys.executable
    for script in (preflight_script(plan, python, "tok"), node_script(plan, plan.stages[0], python, 1, rdzv, 2)):
        assert subprocess.run(["bash", "-n", "-c", script]).returncode == 0
    argv = ssh_argv(plan, "node-a", preflight_script(plan, sys.executable, "tok"))
    assert argv[:3] == ["ssh", "-o", "BatchMode=yes"] and argv[-3:-1] == ["--", "node-a"]
    # run the remote command as the remote login shell would: the token differs, so exit 3; nothing executed
    result = subprocess.run(["bash", "-c", argv[-1]], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == EXIT_NO_RUN_DIR, result.stderr
    assert "setup ran" in result.stdout and not list(tmp_path.rglob("pwned"))
    RunDir(run_dir).ssh_token.write_text("tok\n")
    result = subprocess.run(["bash", "-c", argv[-1]], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0 and "dist-ft-port " in result.stdout, result.stderr
    assert not list(tmp_path.rglob("pwned"))


def test_each_node_runs_elastic_torchrun_with_c10d_on_the_first_host(tmp_path, recipe_file, capsys):
    plan = _plan(tmp_path, recipe_file, capsys, tmp_path / "run")
    cmd = torchrun_command(plan, plan.stages[0], "python", 1, "node-a:29400", "rid", "node-b")
    assert "--rdzv_backend=c10d" in cmd and "--rdzv_endpoint=node-a:29400" in cmd and "--nnodes=2" in cmd
    assert "--rdzv_conf=is_host=0" in cmd and f"--max_restarts={plan.cluster.max_restarts}" in cmd
    assert "--local_addr=node-b" in cmd
    assert "--rdzv_conf=is_host=1" in torchrun_command(plan, plan.stages[0], "python", 0, "a:1", "rid", "node-a")


def test_attempts_count_the_logs_of_earlier_launches(tmp_path):
    run = RunDir(tmp_path)
    run.logs.mkdir()
    assert next_attempt(run, "ctx") == 1
    (run.logs / "ctx.node0.a.attempt1.log").touch()
    (run.logs / "ctx.node1.b.attempt2.log").touch()
    (run.logs / "sft.node0.a.attempt7.log").touch()
    assert next_attempt(run, "ctx") == 3


def _host(script: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE)


@pytest.mark.integration  # starts host processes
def test_a_failing_host_closes_the_others_stdin_and_they_stop():
    """The node agents stop when their stdin ends: one failure takes the whole run down, promptly."""
    waits = "import sys; sys.stdin.read(); sys.exit(143)"
    procs = [_host(waits), _host("import time; time.sleep(0.5); raise SystemExit(7)"), _host(waits)]
    started = time.monotonic()
    status, host = supervise_hosts(procs, ["a", "b", "c"], kill_after_s=30)
    assert (status, host) == (7, "b") and time.monotonic() - started < 10
    assert [p.returncode for p in procs] == [143, 7, 143]


@pytest.mark.integration  # starts host processes
def test_hosts_that_all_succeed_succeed():
    procs = [_host("import sys; sys.exit(0)") for _ in range(2)]
    assert supervise_hosts(procs, ["a", "b"], kill_after_s=5) == (0, None)


@pytest.mark.integration  # starts host processes
def test_a_host_ignoring_its_stdin_is_killed_after_the_grace():
    procs = [_host("raise SystemExit(1)"), _host("import time; time.sleep(60)")]
    started = time.monotonic()
    assert supervise_hosts(procs, ["a", "b"], kill_after_s=1)[0] == 1
    assert time.monotonic() - started < 10 and procs[1].returncode != 0


def test_heartbeats_name_the_stale_rank_and_its_host(tmp_path, monkeypatch):
    run = RunDir(tmp_path)
    monkeypatch.setenv("DIST_FT_HOST", "node-b")
    beat = Heartbeat(run.heartbeat("ctx", 1), rank=1, restart=0, interval_s=0.05)

    class State:
        step = 4

    beat.follow(State())
    time.sleep(0.3)
    row = HeartbeatRow.from_json(run.heartbeat("ctx", 1).read_text())
    assert (row.step, row.host, row.rank) == (4, "node-b", 1)
    beat.close("stopped")
    now = time.time()
    assert stale_lines(run, "ctx", now=now + 3600) == []  # it said it ended
    row = dataclasses.replace(row, time=now - 100)
    write_record(run.heartbeat("ctx", 0), dataclasses.replace(row, rank=0, interval_s=5.0))
    lines = stale_lines(run, "ctx", now=now)
    assert len(lines) == 1 and "rank 0 on node-b" in lines[0] and "no heartbeat for 100 s" in lines[0]
    assert not is_stale(dataclasses.replace(row, time=now - 10, interval_s=5.0), now)
    report = heartbeat_report(tmp_path, ["ctx", "sft"], now=now)
    assert report[0] == "[ctx] heartbeats: 2 rank(s), 1 STALE" and "stopped at step 4" in report[2]


def heartbeat_row(rank: int, host: str, pid: int, step: int | None, age_s: float, started_ago_s: float = 0.0,
                  **extra) -> HeartbeatRow:
    now = time.time()
    return HeartbeatRow(rank=rank, host=host, hostname=host, pid=pid, restart=0, started=now - started_ago_s,
                        interval_s=5.0, step=step, time=now - age_s, **extra)


def _beat(run: RunDir, rank: int, age_s: float, started_ago_s: float = 0.0, **extra) -> None:
    path = run.heartbeat("ctx", rank)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_record(path, heartbeat_row(rank, f"node-{rank}", 100 + rank, 7, age_s, started_ago_s, **extra))


def test_the_hang_watch_names_the_first_rank_silent_longer_than_the_timeout(tmp_path):
    run = RunDir(tmp_path)
    watch = HangWatch(run, "ctx", after_s=60, every_s=0, since=time.time() - 100)
    _beat(run, 0, age_s=1)
    _beat(run, 1, age_s=59)
    assert watch.silent_rank() is None
    _beat(run, 1, age_s=61)
    silent = watch.silent_rank()
    assert (silent.rank, silent.host) == (1, "node-1")
    message = watch.message(silent)
    assert "rank 1 on node-1 (pid 101) sent no heartbeat for 61 s" in message and "(60 s)" in message


def test_the_hang_watch_ignores_ranks_that_ended_and_heartbeats_of_an_earlier_launch(tmp_path):
    run = RunDir(tmp_path)
    watch = HangWatch(run, "ctx", after_s=60, every_s=0)
    _beat(run, 0, age_s=500, started_ago_s=900)  # a rank of the previous attempt, killed without a word
    _beat(run, 1, age_s=120, ended="done")
    assert watch.silent_rank() is None
    assert HangWatch(run, "ctx", after_s=60, every_s=0, since=0).silent_rank().rank == 0


def test_the_hang_watch_looks_at_most_every_few_seconds(tmp_path):
    run = RunDir(tmp_path)
    watch = HangWatch(run, "ctx", after_s=1, every_s=3600, since=0)
    assert watch.silent_rank() is None  # nothing yet; the next look is an hour away
    _beat(run, 0, age_s=50)
    assert watch.silent_rank() is None
    assert watch.silent_rank(now=time.time() + 3601).rank == 0


@pytest.mark.integration  # starts host processes
def test_a_silent_rank_stops_every_host_and_names_its_host(tmp_path, capsys):
    run = RunDir(tmp_path)
    _beat(run, 1, age_s=90)
    waits = "import sys; sys.stdin.read(); sys.exit(143)"
    procs = [_host(waits), _host(waits)]
    started = time.monotonic()
    status, host = supervise_hosts(procs, ["node-0", "node-1"], kill_after_s=30,
                                   watch=HangWatch(run, "ctx", after_s=60, every_s=0, since=0))
    assert (status, host) == (EXIT_SILENT_RANK, "node-1") and time.monotonic() - started < 10
    assert [p.returncode for p in procs] == [143, 143]
    assert "rank 1 on node-1 (pid 101) sent no heartbeat for 90 s" in capsys.readouterr().err


@pytest.mark.integration  # starts host processes
def test_the_local_backend_stops_torchrun_when_a_rank_falls_silent(tmp_path, capsys):
    run = RunDir(tmp_path)
    _beat(run, 0, age_s=90)
    traps = "trap 'exit 143' TERM; sleep 60 & wait"
    started = time.monotonic()
    status = run_supervised(["bash", "-c", traps], kill_after_s=5,
                            watch=HangWatch(run, "ctx", after_s=60, every_s=0, since=0))
    assert status == EXIT_SILENT_RANK and time.monotonic() - started < 10
    assert "rank 0 on node-0" in capsys.readouterr().err


def test_status_of_an_ssh_run_shows_hosts_attempts_and_stale_ranks(tmp_path, recipe_file, capsys):
    run_dir = tmp_path / "run"
    plan = _plan(tmp_path, recipe_file, capsys, run_dir)
    run = RunDir(run_dir)
    first = plan.stages[0].name
    write_record(run.ssh_file, SshRecord(
        hosts=["node-a", "user@node-b"], launcher=LauncherProcess("elsewhere", 1), started="2026-11-29T08:00:00+0000",
        stages={first: StageAttempt("running", attempt=2, started="2026-11-29T09:00:00+0000")}))
    run.node_record(first, 1).parent.mkdir(parents=True)
    write_record(run.node_record(first, 1), NodeRecord(host="user@node-b", hostname="b", pid=77, node_rank=1,
                                                       attempt=2, started=time.time(), endpoint="node-a:29400"))
    run.stage(first).metrics.parent.mkdir(parents=True)
    run.stage(first).metrics.write_text(json.dumps({"step": 3, "loss": 2.5}) + "\n")
    run.heartbeat(first, 1).parent.mkdir(parents=True)
    write_record(run.heartbeat(first, 1), heartbeat_row(1, "user@node-b", 78, 3, age_s=120))
    assert main(["status", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "ssh backend on node-a, user@node-b" in out and "(on another machine)" in out
    assert f"[{first}] running, attempt 2, since 2026-11-29T09:00:00+0000; last step 3 loss 2.5000" in out
    assert "node 1 on user@node-b: agent pid 77" in out
    assert "rank 1 on user@node-b (pid 78): step 3, STALE: no heartbeat for 120 s" in out
    assert f"[{plan.stages[-1].name}] not started" in out


def test_status_of_a_local_run_shows_stale_heartbeats_too(tmp_path, recipe_file, capsys):
    run_dir = tmp_path / "run"
    plan = _plan(tmp_path, recipe_file, capsys, run_dir)
    path = RunDir(run_dir).heartbeat(plan.stages[0].name, 0)
    path.parent.mkdir(parents=True)
    write_record(path, heartbeat_row(0, "here", 5, None, age_s=40))
    assert main(["status", str(run_dir)]) == 0
    assert "rank 0 on here (pid 5): before its first step, STALE" in capsys.readouterr().out


def test_cancel_of_an_ssh_run_with_nothing_running(tmp_path, recipe_file, capsys):
    run_dir = tmp_path / "run"
    _plan(tmp_path, recipe_file, capsys, run_dir)
    (run_dir / "ssh.json").write_text(json.dumps({"backend": "ssh", "stages": {"x": {"state": "done"}}}))
    assert main(["cancel", str(run_dir)]) == 0
    assert "nothing to cancel" in capsys.readouterr().out


@pytest.mark.integration  # starts host processes
def test_a_closed_stdin_and_a_signal_together_are_one_stop_not_a_kill(tmp_path):
    """`dist-ft cancel` SIGTERMs the node agent and the launcher, which then closes the agent's stdin: the
    agent must take the two as one stop request (the ranks checkpoint), not as the second signal that kills
    at once. The child here needs 2 s after its SIGTERM to finish, as ranks reaching a step boundary do."""
    import signal as sig
    import threading

    done = tmp_path / "checkpointed"
    child = f"trap 'sleep 2; touch {done}; exit 143' TERM; sleep 60 & wait"
    stop = threading.Event()

    def request_twice() -> None:
        time.sleep(1.0)
        stop.set()  # the launcher closed stdin
        time.sleep(0.3)
        os.kill(os.getpid(), sig.SIGTERM)  # dist-ft cancel's own signal

    threading.Thread(target=request_twice, daemon=True).start()
    status = run_supervised(["bash", "-c", child], kill_after_s=30, stop=stop)
    assert status == 128 + sig.SIGTERM
    assert done.exists(), "the child was killed before it could finish its stop"
