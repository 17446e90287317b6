"""Small helpers for tests that talk to a real SLURM cluster.

Meant for the single-host cluster from ``slurm/local_cluster/up.sh`` (two
slurmd posing as ``node1`` and ``node2``), but nothing here is specific to it
except the default location of its ``slurm.conf``.

Every call is bounded in time: subprocesses get a timeout and the polling
helpers raise :class:`TimeoutError` instead of hanging.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Iterable, Mapping, Sequence

STATE_DIR = Path(os.environ.get("DIST_FT_SLURM_DIR", "/tmp/dist-ft-slurm"))
LOCAL_CONF = STATE_DIR / "slurm.conf"
JOBCOMP_FILE = STATE_DIR / "jobcomp.txt"
NODES = ("node1", "node2")

#: Job states after which a job will not run again by itself.
TERMINAL_STATES = frozenset(
    {
        "BOOT_FAIL",
        "CANCELLED",
        "COMPLETED",
        "DEADLINE",
        "FAILED",
        "NODE_FAIL",
        "OUT_OF_MEMORY",
        "PREEMPTED",
        "TIMEOUT",
    }
)

_CMD_TIMEOUT = 30.0


def slurm_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment for SLURM client commands.

    Sets ``SLURM_CONF`` to the local cluster's config when the caller has not
    set it and ``/etc/slurm/slurm.conf`` does not exist.
    """
    env = dict(os.environ)
    if "SLURM_CONF" not in env and LOCAL_CONF.is_file():
        if not Path("/etc/slurm/slurm.conf").exists():
            env["SLURM_CONF"] = str(LOCAL_CONF)
    # Keep the caller's SLURM_* job context (if tests run inside a job) from
    # leaking into sbatch/srun of nested test jobs.
    for key in list(env):
        if key.startswith(("SLURM_JOB", "SLURM_STEP", "SBATCH_", "SRUN_")):
            del env[key]
    if extra:
        env.update(extra)
    return env


def run_slurm(
    args: Sequence[str],
    *,
    timeout: float = _CMD_TIMEOUT,
    check: bool = True,
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
    stdin: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run a SLURM client command (with `stdin` as its input), capturing text output."""
    proc = subprocess.run(
        list(args),
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=slurm_env(env),
        cwd=cwd,
        check=False,
    )
    if check and proc.returncode != 0:
        raise RuntimeError(
            f"{' '.join(args)} failed with rc={proc.returncode}\n"
            f"stdout: {proc.stdout}\nstderr: {proc.stderr}"
        )
    return proc


def slurm_conf_path() -> Path:
    """The slurm.conf that client commands run via :func:`run_slurm` read."""
    env = slurm_env()
    return Path(env.get("SLURM_CONF", "/etc/slurm/slurm.conf"))


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve()
    except OSError:
        return False


def cluster_skip_reason(nodes: Iterable[str] = NODES) -> str | None:
    """Why SLURM tests can't run here, or ``None`` if the cluster is usable."""
    for tool in ("sbatch", "sinfo", "scontrol"):
        if shutil.which(tool) is None:
            return (
                f"{tool} not on PATH (start the test cluster with "
                "slurm/local_cluster/up.sh)"
            )
    conf = slurm_conf_path()
    if not conf.is_file():
        # Client commands would retry reading a missing config for 60 s.
        return (
            f"no SLURM config at {conf} (start the test cluster with "
            "slurm/local_cluster/up.sh)"
        )
    if _same_file(conf, LOCAL_CONF) and not (STATE_DIR / "run" / "slurmctld.pid").is_file():
        # Our local cluster, stopped by down.sh: skip without sinfo's retries.
        return "local SLURM cluster is not running (run slurm/local_cluster/up.sh)"
    try:
        proc = run_slurm(["sinfo", "-h", "-N", "-o", "%N %t"], timeout=20, check=False)
    except subprocess.TimeoutExpired:
        return "sinfo timed out: SLURM cluster not reachable"
    if proc.returncode != 0:
        return (
            "SLURM cluster not up (sinfo failed: "
            f"{(proc.stderr or proc.stdout).strip()[:200]}); "
            "run slurm/local_cluster/up.sh"
        )
    states = node_states(proc.stdout)
    for node in nodes:
        state = states.get(node)
        if state is None:
            return f"SLURM cluster has no node {node!r} (sinfo: {states})"
        if not state.startswith(("idle", "mix", "alloc", "comp")):
            return f"SLURM node {node} is {state!r}, not usable"
    return None


def node_states(sinfo_output: str) -> dict[str, str]:
    """Parse ``sinfo -h -N -o '%N %t'`` output into {node: state}."""
    states: dict[str, str] = {}
    for line in sinfo_output.splitlines():
        parts = line.split()
        if len(parts) >= 2:
            states.setdefault(parts[0], parts[1])
    return states


def sbatch(
    args: Sequence[str] = (),
    *,
    script: str | None = None,
    wrap: str | None = None,
    cwd: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
) -> int:
    """Submit a batch job and return its id.

    Give either ``script`` (text of a batch script, fed on stdin) or ``wrap``
    (a shell command line), plus any extra sbatch ``args``.
    """
    cmd = ["sbatch", "--parsable", *args]
    if wrap is not None:
        cmd += ["--wrap", wrap]
    proc = run_slurm(cmd, check=False, env=env, cwd=cwd, stdin=script)
    if proc.returncode != 0:
        raise RuntimeError(
            f"sbatch failed (rc={proc.returncode}): {proc.stderr.strip()}"
        )
    # --parsable prints "jobid" or "jobid;cluster"
    return int(proc.stdout.strip().split(";")[0])


_KV_RE = re.compile(r"(\S+?)=(.*?)(?=\s+\S+?=|$)")


def parse_kv_line(line: str) -> dict[str, str]:
    """Parse a ``Key=Value Key2=Value two`` line (scontrol -o / jobcomp)."""
    return {m.group(1): m.group(2) for m in _KV_RE.finditer(line.strip())}


def show_job(job_id: int) -> dict[str, str] | None:
    """``scontrol show job -o`` as a dict, or ``None`` if slurmctld forgot it."""
    proc = run_slurm(["scontrol", "-o", "show", "job", str(job_id)], check=False)
    if proc.returncode != 0 or not proc.stdout.strip():
        return None
    return parse_kv_line(proc.stdout.splitlines()[0])


def jobcomp_records(job_id: int | None = None) -> list[dict[str, str]]:
    """Records from the jobcomp/filetxt file, optionally only for ``job_id``.

    A job id can appear more than once (requeued jobs, or a state dir that was
    reset); the last record is the most recent.
    """
    try:
        text = JOBCOMP_FILE.read_text()
    except OSError:
        return []
    records = [parse_kv_line(line) for line in text.splitlines() if line.strip()]
    if job_id is not None:
        records = [r for r in records if r.get("JobId") == str(job_id)]
    return records


def job_state(job_id: int) -> str | None:
    """Current state of a job (``PENDING``, ``RUNNING``, ``COMPLETED`` ...).

    Asks slurmctld first and falls back to the jobcomp file; ``None`` if
    neither knows the job.
    """
    info = show_job(job_id)
    if info is not None and "JobState" in info:
        return info["JobState"]
    records = jobcomp_records(job_id)
    if records:
        return records[-1].get("JobState")
    return None


def wait_for_state(
    job_id: int,
    states: Iterable[str],
    timeout: float = 60.0,
    poll: float = 0.5,
) -> str:
    """Poll until the job is in one of ``states``; return that state."""
    wanted = set(states)
    deadline = time.monotonic() + timeout
    state = None
    while True:
        state = job_state(job_id)
        if state in wanted:
            return state
        if time.monotonic() >= deadline:
            raise TimeoutError(
                f"job {job_id} not in {sorted(wanted)} after {timeout:.0f} s "
                f"(last state {state!r}; {show_job(job_id)})"
            )
        time.sleep(poll)


def wait_for_job(job_id: int, timeout: float = 60.0, poll: float = 0.5) -> str:
    """Poll until the job reached a terminal state; return it.

    ``COMPLETING`` is not terminal (processes may still be running); a job
    that is requeued goes back to ``PENDING`` and is waited for again.
    """
    return wait_for_state(job_id, TERMINAL_STATES, timeout=timeout, poll=poll)


def job_restarts(job_id: int) -> int | None:
    """``Restarts`` counter of a job as shown by ``scontrol show job``."""
    info = show_job(job_id)
    if info is None or "Restarts" not in info:
        return None
    return int(info["Restarts"])


def cancel(*job_ids: int) -> None:
    """Best-effort scancel (ignores jobs that already ended)."""
    if job_ids:
        run_slurm(["scancel", *map(str, job_ids)], check=False)
