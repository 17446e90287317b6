"""A stop signal that is not honoured within the grace period ends the rank: the watchdog thread
learns of the signal from CPython's wakeup fd, so it fires even while the main thread is blocked
(as in a collective that never completes). tests/integration/test_local_launch_stops.py does the
same with a rank stuck in a real gloo all-reduce."""

import signal
import subprocess
import sys
import time

import pytest

# Starts rank-like processes and signals them.
pytestmark = [pytest.mark.integration]

BLOCKED_RANK = """
import sys, threading
from pathlib import Path
from dist_ft.rank.stop import StopRequest

request = StopRequest(Path(sys.argv[1]) / "no.stop", grace_s=float(sys.argv[2]))
if sys.argv[3] == "honour":  # what agreed() does once every rank reached the boundary
    request.watchdog.honoured()
print("ready", flush=True)
threading.Event().wait(float(sys.argv[4]))  # the main thread never reaches a step boundary
print(f"main thread done, signalled={request.signalled}", flush=True)
"""


def start(tmp_path, grace_s: float, mode: str = "stuck", block_s: float = 60.0) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", BLOCKED_RANK, str(tmp_path), str(grace_s), mode, str(block_s)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "ready\n", proc.stderr.read()
    return proc


def test_a_stop_signal_not_honoured_within_the_grace_period_ends_the_rank(tmp_path):
    proc = start(tmp_path, grace_s=1.0)
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 128 + signal.SIGTERM, (out, err)
    assert 0.9 < time.monotonic() - sent < 15
    assert "SIGTERM received 1 s ago and not honoured" in err and "DIST_FT_STOP_GRACE_S" in err


def test_a_honoured_stop_is_left_to_finish(tmp_path):
    proc = start(tmp_path, grace_s=0.5, mode="honour", block_s=3.0)
    proc.send_signal(signal.SIGUSR1)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0 and "signalled=SIGUSR1" in out, err


@pytest.mark.parametrize("value, expected", [("", 60.0), ("5", 5.0), ("0", 0.0), ("abc", 60.0), ("-1", 60.0),
                                             ("nan", 60.0), ("inf", 60.0)])
def test_grace_comes_from_the_environment(value, expected, capsys):
    from dist_ft.rank.stop import stop_grace_s

    assert stop_grace_s({"DIST_FT_STOP_GRACE_S": value}) == expected
    assert ("is not a number of seconds" in capsys.readouterr().err) == (value in ("abc", "-1", "nan", "inf"))


def test_grace_zero_turns_the_watchdog_off(tmp_path):
    proc = start(tmp_path, grace_s=0, block_s=2.0)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0 and "signalled=SIGTERM" in out, err
