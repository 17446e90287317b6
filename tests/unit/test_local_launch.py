"""`dist-ft launch --backend local` for real, with a stand-in interpreter in place of
`python -m torch.distributed.run`: the recipe's setup and env reach the ranks, and stopping the
launcher leaves no process behind, even ranks in sessions of their own that ignore SIGTERM (as
torchrun starts them)."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import LAUNCH, wait_for_pids
from tests.helpers import alive

# Starts the launcher and a fake torchrun with its ranks as real processes, and signals them.
pytestmark = [pytest.mark.integration]

DIST_FT = [sys.executable, "-m", "dist_ft"]

# Records what it was given, then starts two "ranks" the way torchrun does (setsid: a session of
# their own), each deaf to SIGTERM, and waits for them. Without FAKE_DEAF it dies of SIGTERM itself,
# leaving the ranks orphaned.
FAKE_TORCHRUN = """#!/bin/bash
log={log}
printf '%s\\n' "$@" > "$log/args"
env > "$log/env"
echo $$ >> "$log/pids"
if [ "${{FAKE_DONE:-}}" = 1 ]; then  # the ranks finished and wrote DONE, then aborted on the way out
  for a in "$@"; do case "$a" in --run-dir=*) run=${{a#--run-dir=}} ;; --stage=*) stage=${{a#--stage=}} ;; esac; done
  mkdir -p "$run/stages/$stage/export" && touch "$run/stages/$stage/DONE"
fi
if [ "${{FAKE_EXIT:-}}" != "" ]; then exit "$FAKE_EXIT"; fi
if [ "${{FAKE_DEAF:-}}" = 1 ]; then trap "" TERM INT; fi  # a torchrun that hangs on its way out
for rank in 0 1; do
  setsid bash -c 'trap "" TERM; echo $$ >> "$0/pids"; while :; do sleep 0.2; done' "$log" &
done
wait
"""


def fake_python(tmp_path: Path) -> Path:
    log = tmp_path / "log"
    log.mkdir()
    path = tmp_path / "fake-python"
    path.write_text(FAKE_TORCHRUN.format(log=log))
    path.chmod(0o755)
    return path


def launch(tmp_path: Path, *sets: str, env=None) -> subprocess.Popen:
    args = [*DIST_FT, "launch", str(LAUNCH / "demo.yaml"), "--backend", "local", "--out", str(tmp_path / "run"),
            "--set", f"cluster.python={fake_python(tmp_path)}", "--set", f"checkpointing.output_root={tmp_path}"]
    for item in sets:
        args += ["--set", item]
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})})


def test_setup_and_env_reach_the_ranks_in_the_sbatch_order(tmp_path):
    proc = launch(tmp_path, 'cluster.setup=["export FROM_SETUP=1 BOTH=setup"]', "cluster.env.FROM_ENV=a b  c",
                  "cluster.env.BOTH=env", env={"FAKE_EXIT": "7"})
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 7, err
    env = (tmp_path / "log" / "env").read_text().splitlines()
    assert {"FROM_SETUP=1", "FROM_ENV=a b  c", "BOTH=env"} <= set(env)  # env after setup, as in the sbatch
    args = (tmp_path / "log" / "args").read_text().splitlines()
    assert args[:2] == ["-m", "torch.distributed.run"] and "--standalone" in args
    assert f"--run-dir={tmp_path / 'run'}" in args and "--stage=ctx512" in args
    assert "stage ctx512 failed with exit status 7" in err


def test_a_stage_that_wrote_done_and_then_aborted_is_complete(tmp_path):
    proc = launch(tmp_path, env={"FAKE_EXIT": "134", "FAKE_DONE": "1"})
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert [line for line in err.splitlines() if "wrote DONE" in line] == [
        f"warning: stage {stage} wrote DONE and then exited with status 134 on its way out; its results are "
        "complete and the run goes on" for stage in ("ctx512", "ctx1k", "sft")]
    assert "--stage=sft" in (tmp_path / "log" / "args").read_text().splitlines()


@pytest.mark.parametrize("deaf", ["0", "1"], ids=["torchrun dies, ranks orphaned", "torchrun hangs too"])
def test_stopping_the_launcher_takes_torchrun_and_every_rank_down(tmp_path, deaf):
    proc = launch(tmp_path, env={"DIST_FT_STOP_GRACE_S": "1", "FAKE_DEAF": deaf})
    pids = wait_for_pids(tmp_path / "log" / "pids", 3)
    assert all(alive(pid) for pid in pids)
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err
    if deaf == "1":  # nothing stops by itself: killed after twice the ranks' stop grace
        assert 2 <= time.monotonic() - sent < 15
    assert "SIGTERM: stopping torchrun and its ranks" in err
    deadline = time.monotonic() + 10
    while any(alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [pid for pid in pids if alive(pid)], "a process outlived the launcher"


def test_a_second_interrupt_kills_at_once(tmp_path):
    proc = launch(tmp_path, env={"FAKE_DEAF": "1"})  # default grace: 2 x 60 s; only a second signal is quick
    pids = wait_for_pids(tmp_path / "log" / "pids", 3)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.5)
    sent = time.monotonic()
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGINT and time.monotonic() - sent < 15
    assert not [pid for pid in pids if alive(pid)]
