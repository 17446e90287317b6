"""`launch --backend ssh` against a real sshd: tests/ssh/up.sh starts one on 127.0.0.1 and 127.0.0.2 (two
"hosts" that share the run dir under $DIST_FT_SSHD_DIR/runs) and one on 127.0.0.3 in a mount namespace
where that folder is empty (a host without the shared run dir). One CPU rank per host."""

from __future__ import annotations

import copy
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from dist_ft.launcher.summary import read_metrics
from tests.conftest import ROOT
from tests.integration.training_helpers import lora_finetune, rank_env, tiny_recipe

pytestmark = [pytest.mark.integration]  # real sshd, real launcher, real ranks

SSHD_DIR = Path(os.environ.get("DIST_FT_SSHD_DIR", "/tmp/dist-ft-sshd"))
SSH_CONFIG = SSHD_DIR / "ssh_config"


def sshd_hosts() -> list[str]:
    hosts_file = SSHD_DIR / "hosts"
    if not hosts_file.is_file() or not SSH_CONFIG.is_file():
        pytest.skip(f"no test sshd ({hosts_file} missing): run `bash tests/ssh/up.sh` (make test does)")
    hosts = hosts_file.read_text().split()
    probe = subprocess.run(["ssh", "-F", str(SSH_CONFIG), hosts[0], "true"], capture_output=True, text=True,
                           timeout=30)
    if probe.returncode != 0:
        pytest.skip(f"the test sshd does not answer on {hosts[0]}: {probe.stderr.strip()}")
    return hosts


@pytest.fixture
def shared(request):
    """A folder on the "shared filesystem" of hosts 127.0.0.1 and 127.0.0.2."""
    hosts = sshd_hosts()
    folder = Path(tempfile.mkdtemp(prefix=request.node.name[:40] + "-", dir=SSHD_DIR / "runs"))
    yield folder, hosts
    shutil.rmtree(folder, ignore_errors=True)


def ssh_recipe(hosts: list[str], steps: int = 16, finetune: bool = True, **cluster) -> dict:
    raw = tiny_recipe(steps=steps, every=2, ranks=1, finetune=lora_finetune(steps=2) if finetune else None)
    env = {"PYTHONPATH": str(ROOT), "WANDB_MODE": "offline", "WANDB_SILENT": "true"}  # ssh starts a clean env
    if os.environ.get("TORCH_EXTENSIONS_DIR"):
        env["TORCH_EXTENSIONS_DIR"] = os.environ["TORCH_EXTENSIONS_DIR"]
    raw["cluster"].update(nodes=len(hosts), hosts=list(hosts), ssh_options=["-F", str(SSH_CONFIG)], env=env,
                          **cluster)
    return raw


def launch(folder: Path, raw: dict, name: str = "run", **popen) -> subprocess.Popen:
    recipe = folder / f"{name}.yaml"
    recipe.write_text(yaml.safe_dump(copy.deepcopy(raw)))
    return subprocess.Popen([sys.executable, "-m", "dist_ft", "launch", str(recipe), "--backend", "ssh",
                             "--out", str(folder / name)], env=rank_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True, **popen)


def finish(proc: subprocess.Popen, timeout: float = 300) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
        pytest.fail(f"launcher still running after {timeout} s:\n{out[-2000:]}\n{err[-4000:]}")
    return proc.returncode, out, err


def heartbeat(run: Path, stage: str, rank: int) -> dict | None:
    try:
        return json.loads((run / "heartbeats" / stage / f"rank{rank}.json").read_text())
    except (OSError, ValueError):
        return None


def wait_for(condition, proc: subprocess.Popen, timeout: float = 180, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            out, err = proc.communicate()
            logs = "".join(f"\n== {log.name}\n" + "\n".join(log.read_text(errors="replace").splitlines()[-40:])
                           for log in sorted(Path(proc.args[-1]).glob("logs/*.log")))
            pytest.fail(f"launcher exited ({proc.returncode}) before {what}:\n{out[-2000:]}\n{err[-4000:]}{logs}")
        assert time.monotonic() < deadline, f"{what} never held"
        time.sleep(0.1)


def losses(run: Path, stage: str) -> list[float]:
    return [row["loss"] for row in read_metrics(run / "stages" / stage / "metrics.jsonl")]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A two-stage recipe over ssh on two hosts, run once for the tests below (and as their baseline)."""
    hosts = sshd_hosts()
    folder = Path(tempfile.mkdtemp(prefix="finished-", dir=SSHD_DIR / "runs"))
    started = time.monotonic()
    status, out, err = finish(launch(folder, ssh_recipe(hosts[:2])))
    yield folder / "run", status, out, err, time.monotonic() - started
    shutil.rmtree(folder, ignore_errors=True)


def test_a_two_stage_recipe_runs_over_ssh_on_two_hosts(finished_run):
    run, status, out, err, seconds = finished_run
    assert status == 0, out[-3000:] + err[-3000:]
    print(f"two stages over ssh: {seconds:.1f} s")
    for stage in ("ctx", "sft"):
        assert (run / "stages" / stage / "DONE").exists()
        infos = [json.loads((run / "stages" / stage / "ranks" / f"rank{r}.json").read_text()) for r in (0, 1)]
        assert [i["world_size"] for i in infos] == [2, 2]
        assert sorted(heartbeat(run, stage, r)["host"] for r in (0, 1)) == ["127.0.0.1", "127.0.0.2"]
        for node, host in enumerate(("127.0.0.1", "127.0.0.2")):  # one log per host and attempt
            assert (run / "logs" / f"{stage}.node{node}.{host}.attempt1.log").stat().st_size > 0
    assert len(losses(run, "ctx")) == 16 and len(losses(run, "sft")) == 2
    record = json.loads((run / "ssh.json").read_text())
    assert [record["stages"][s]["state"] for s in ("ctx", "sft")] == ["done", "done"]


def test_launching_a_finished_run_again_skips_every_stage(finished_run):
    run, status, *_ = finished_run
    assert status == 0
    raw = yaml.safe_load((run.parent / "run.yaml").read_text())
    rc, out, err = finish(launch(run.parent, raw))
    assert rc == 0, err[-3000:]
    assert out.count("already complete; skipped") == 2


def test_dist_ft_status_shows_the_hosts_and_heartbeats(finished_run):
    run, status, *_ = finished_run
    assert status == 0
    result = subprocess.run([sys.executable, "-m", "dist_ft", "status", str(run)], capture_output=True, text=True,
                            env=rank_env(), timeout=60)
    assert result.returncode == 0, result.stderr
    assert "ssh backend on 127.0.0.1, 127.0.0.2" in result.stdout and "[sft] DONE; last step 2" in result.stdout, \
        result.stdout
    assert "STALE" not in result.stdout


def test_a_host_without_the_run_dir_gets_a_one_line_error(shared):
    folder, hosts = shared
    if "127.0.0.3" not in hosts:
        pytest.skip("no isolated host: unshare --mount was not allowed when tests/ssh/up.sh ran")
    rc, out, err = finish(launch(folder, ssh_recipe(["127.0.0.1", "127.0.0.3"], finetune=False)), timeout=120)
    assert rc == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "host 127.0.0.3 does not see the run dir" in lines[0] and "shared filesystem" in lines[0]
    assert not (folder / "run" / "stages" / "ctx" / "metrics.jsonl").exists()


@pytest.mark.slow
def test_kill_9_of_a_worker_restarts_the_group_and_the_losses_match(shared, finished_run):
    """torchrun's elastic agents restart both hosts' ranks; the stage resumes from its last checkpoint and
    every step's loss equals the uninterrupted run's."""
    baseline, base_status, *_ = finished_run
    assert base_status == 0
    folder, hosts = shared
    proc = launch(folder, ssh_recipe(hosts[:2], finetune=False, max_restarts=2))
    run = folder / "run"
    metrics = run / "stages" / "ctx" / "metrics.jsonl"
    wait_for(lambda: len(losses(run, "ctx")) >= 3 and heartbeat(run, "ctx", 1), proc, what="step 3")
    victim = heartbeat(run, "ctx", 1)["pid"]
    assert len(losses(run, "ctx")) < 12, "too late to kill a worker mid-stage"
    os.kill(victim, signal.SIGKILL)
    killed = time.monotonic()
    wait_for(lambda: any(r.get("restart", 0) >= 1 for r in read_metrics(metrics)), proc, what="a restarted step")
    restart_s = time.monotonic() - killed
    rc, out, err = finish(proc)
    assert rc == 0, out[-2000:] + err[-4000:]
    print(f"kill -9 to the first step after the elastic restart: {restart_s:.1f} s")
    rows = read_metrics(metrics)
    assert [r["step"] for r in rows] == list(range(1, 17)) and rows[-1]["restart"] >= 1
    assert losses(run, "ctx") == pytest.approx(losses(baseline, "ctx"), abs=1e-5)
    assert heartbeat(run, "ctx", 1)["pid"] != victim


@pytest.mark.slow
def test_a_stopped_rank_fails_the_run_within_the_collective_timeout_naming_it(shared):
    """Rank 0 then waits in whatever collective comes next; some are DeepSpeed's own process groups, whose
    timeout is torch's 30 minutes whatever the recipe says (once the launcher outlived 240 s that way).
    The launcher's watch of the heartbeats stops the stage once rank 1 is silent for the collective
    timeout, whichever collective it is."""
    folder, hosts = shared
    raw = ssh_recipe(hosts[:2], steps=200, finetune=False, max_restarts=0, collective_timeout_minutes=0.25)
    raw["cluster"]["env"]["DIST_FT_STOP_GRACE_S"] = "10"
    raw["checkpointing"]["every_steps"] = None
    proc = launch(folder, raw)
    run = folder / "run"
    wait_for(lambda: len(losses(run, "ctx")) >= 2 and heartbeat(run, "ctx", 1), proc, what="step 2")
    victim = heartbeat(run, "ctx", 1)["pid"]
    os.kill(victim, signal.SIGSTOP)
    stopped = time.monotonic()
    try:
        rc, out, err = finish(proc, timeout=240)
        failed_after = time.monotonic() - stopped
    finally:
        _kill_if_left(victim)
    print(f"SIGSTOP of rank 1 to the launcher's exit: {failed_after:.1f} s")
    assert rc not in (0, None)
    assert failed_after < 15 + 70, err[-3000:]  # the collective timeout, then the stop grace
    assert "stage ctx failed" in err and "rank 1 on 127.0.0.2" in err and "no heartbeat" in err, err[-3000:]
    assert json.loads((run / "ssh.json").read_text())["stages"]["ctx"]["state"] == "failed"


@pytest.mark.slow
@pytest.mark.parametrize("how", ["dist-ft cancel", "SIGTERM to the launcher"])
def test_a_stopped_ssh_run_checkpoints_and_a_relaunch_resumes_with_the_same_losses(shared, finished_run, how):
    """`dist-ft cancel` (SIGTERM to each host's node agent, and to the launcher) and a spot instance's
    SIGTERM to the launcher alone (it closes the agents' stdin): the ranks checkpoint at the next step
    and exit; `launch` again resumes there and every loss equals the uninterrupted run's."""
    baseline, base_status, *_ = finished_run
    assert base_status == 0
    folder, hosts = shared
    raw = ssh_recipe(hosts[:2], finetune=False)
    proc = launch(folder, raw)
    run = folder / "run"
    wait_for(lambda: len(losses(run, "ctx")) >= 3 and heartbeat(run, "ctx", 1), proc, what="step 3")
    stopped = time.monotonic()
    if how == "dist-ft cancel":
        cancel = subprocess.run([sys.executable, "-m", "dist_ft", "cancel", str(run)], env=rank_env(),
                                capture_output=True, text=True, timeout=120)
        assert cancel.returncode == 0 and cancel.stdout.count("stopping (SIGTERM to the node agent") == 2, \
            cancel.stdout + cancel.stderr
    else:
        os.kill(proc.pid, signal.SIGTERM)
    rc, out, err = finish(proc, timeout=180)
    print(f"{how} to the launcher's exit: {time.monotonic() - stopped:.1f} s")
    assert rc == 128 + signal.SIGTERM and "was stopped by SIGTERM" in err, out[-2000:] + err[-3000:]
    record = json.loads((run / "ssh.json").read_text())
    assert record["stages"]["ctx"]["state"] == "stopped"
    done = len(losses(run, "ctx"))
    assert 3 <= done < 16, "the stage should stop at the next step boundary, not run on"
    assert all(beat and beat.get("ended") for beat in (heartbeat(run, "ctx", r) for r in (0, 1)))
    if how != "dist-ft cancel":
        return  # how the stop came does not change the resume: that is checked once
    rc, out, err = finish(launch(folder, raw))
    assert rc == 0, out[-2000:] + err[-4000:]
    rows = read_metrics(run / "stages" / "ctx" / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 17))
    assert losses(run, "ctx") == pytest.approx(losses(baseline, "ctx"), abs=1e-5)


def _kill_if_left(pid: int, wait_s: float = 60) -> None:
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.5)
    for sig in (signal.SIGKILL, signal.SIGCONT):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
    pytest.fail(f"the stopped rank {pid} outlived the run by {wait_s:.0f} s")
