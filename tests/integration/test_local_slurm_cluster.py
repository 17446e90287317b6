"""Checks against the real single-host SLURM cluster (slurm/local_cluster).

Start it with ``slurm/local_cluster/up.sh`` and stop it with ``down.sh``. The
tests skip (with the reason) when SLURM is not installed or the cluster is not
up; every wait is bounded.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

try:
    import slurm_helpers as sh
except ImportError:  # e.g. --import-mode=importlib
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import slurm_helpers as sh

pytestmark = pytest.mark.slurm

JOB_TIMEOUT = 60.0  # seconds any single job may take in these tests


@pytest.fixture(scope="module", autouse=True)
def _require_cluster() -> None:
    reason = sh.cluster_skip_reason()
    if reason is not None:
        pytest.skip(reason)


@pytest.fixture
def job_ids():
    """Collects submitted job ids; cancels any that are still around."""
    ids: list[int] = []
    yield ids
    sh.cancel(*ids)


def test_two_node_job_runs_one_task_per_node(tmp_path: Path, job_ids: list[int]) -> None:
    out = tmp_path / "two_node.out"
    script = """#!/bin/bash
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --time=2
echo "BATCH nodelist=$SLURM_JOB_NODELIST nnodes=$SLURM_JOB_NUM_NODES"
srun --ntasks=2 --ntasks-per-node=1 bash -c \\
  'echo "TASK rank=$SLURM_PROCID node=$SLURMD_NODENAME host=$(hostname) nodelist=$SLURM_JOB_NODELIST"'
"""
    job = sh.sbatch([f"--output={out}", "--job-name=two-node"], script=script, cwd=tmp_path)
    job_ids.append(job)

    state = sh.wait_for_job(job, timeout=JOB_TIMEOUT)
    text = out.read_text() if out.exists() else "<no output file>"
    assert state == "COMPLETED", f"job {job} ended {state}; output:\n{text}"

    assert "BATCH nodelist=node[1-2] nnodes=2" in text, text
    tasks = [sh.parse_kv_line(line[len("TASK ") :]) for line in text.splitlines() if line.startswith("TASK ")]
    assert len(tasks) == 2, text
    # One task on each fake node (both run on this host, so compare the slurmd
    # node name rather than `hostname`).
    assert sorted(t["node"] for t in tasks) == ["node1", "node2"], text
    assert sorted(t["rank"] for t in tasks) == ["0", "1"], text
    assert all(t["nodelist"] == "node[1-2]" for t in tasks), text

    info = sh.show_job(job)
    if info is not None:  # may have aged out of slurmctld already
        assert info["NodeList"] == "node[1-2]"
        assert info["NumNodes"] == "2"


def test_afterok_dependant_of_failed_job_is_cancelled(tmp_path: Path, job_ids: list[int]) -> None:
    marker = tmp_path / "b_ran"
    # Hold A until B is submitted, so B always depends on a job that has not
    # finished yet (no race with a very fast failure).
    job_a = sh.sbatch(
        ["--hold", "--time=1", "--job-name=dep-a", f"--output={tmp_path / 'a.out'}"],
        wrap="echo failing; exit 3",
    )
    job_ids.append(job_a)
    job_b = sh.sbatch(
        [
            f"--dependency=afterok:{job_a}",
            "--time=1",
            "--job-name=dep-b",
            f"--output={tmp_path / 'b.out'}",
        ],
        wrap=f"touch {marker}",
    )
    job_ids.append(job_b)
    assert sh.job_state(job_b) == "PENDING"

    t0 = time.monotonic()
    sh.run_slurm(["scontrol", "release", str(job_a)])

    assert sh.wait_for_job(job_a, timeout=JOB_TIMEOUT) == "FAILED"
    # kill_invalid_depend: slurmctld cancels B instead of leaving it pending
    # forever with Reason=DependencyNeverSatisfied.
    state_b = sh.wait_for_job(job_b, timeout=JOB_TIMEOUT)
    elapsed = time.monotonic() - t0
    assert state_b == "CANCELLED", f"job B ended {state_b}"
    assert not marker.exists(), "dependant job B ran although A failed"

    info = sh.show_job(job_b)
    if info is not None:
        assert info.get("Reason") == "DependencyNeverSatisfied", info
        # Never got nodes. (Don't check RunTime: for a job cancelled while
        # pending, 22.05 sometimes shows StartTime=Unknown and a RunTime of
        # "now - epoch", e.g. 20779-07:33:47.)
        assert info.get("NodeList") in ("", "(null)"), info
        assert "BatchHost" not in info, info
    print(f"afterok cancellation took {elapsed:.1f} s")


def test_sbatch_test_only(tmp_path: Path) -> None:
    proc = sh.run_slurm(
        ["sbatch", "--test-only", "--nodes=2", "--time=1", "--wrap", "hostname"],
        cwd=tmp_path,
    )
    # sbatch reports on stderr: "Job N to start at ... on nodes node[1-2] ..."
    report = proc.stderr + proc.stdout
    assert "to start at" in report, report
    assert "node[1-2]" in report, report
    # No output file means no job was actually run.
    time.sleep(0.5)
    assert not list(tmp_path.glob("slurm-*.out"))
