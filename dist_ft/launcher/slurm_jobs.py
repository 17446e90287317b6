"""A rendered run on SLURM: submit one sbatch per stage chained with afterok (ids in jobs.json),
show each stage's status, cancel what still runs."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

from dist_ft.plan.plan import Plan
from dist_ft.plan.run_dir import JOBS_FILE, PLAN_FILE, RunDir
from .slurm import PREPARE_JOB, needs_prepare_job, submit_command
from .slurm_status import (ACTIVE_STATES, SlurmClient, SlurmError, format_status, is_job_id, read_stage_files,
                           summarize_run)


def submit_stages(plan: Plan, dry_run: bool) -> int:
    run_dir = plan.run
    jobs: dict[str, str] = {}
    previous: str | None = None
    scripts = [(PREPARE_JOB, run_dir.prepare_sbatch)] if needs_prepare_job(plan) else []
    for name, script in scripts + [(stage.name, run_dir.sbatch(stage.name)) for stage in plan.stages]:
        cmd = submit_command(str(script), previous)
        if dry_run:
            print(f"[{name}] {shlex.join(cmd)}")
            previous = f"<job id of {name}>"
            continue
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            print(f"error: sbatch refused {_what(name)}: {result.stderr.strip()}", file=sys.stderr)
            _record(run_dir, jobs)
            return 1
        previous = result.stdout.strip().split(";")[0]
        if not is_job_id(previous):
            print(f"error: sbatch answered {result.stdout.strip()!r} for {_what(name)}, not a job id",
                  file=sys.stderr)
            _record(run_dir, jobs)
            return 1
        jobs[name] = previous
        print(f"[{name}] submitted job {previous}", flush=True)
    if not dry_run:
        _record(run_dir, jobs)
        print(f"follow it with: dist-ft status {run_dir.path}")
    return 0


def _what(name: str) -> str:
    return "the prepare job" if name == PREPARE_JOB else f"stage {name}"


def _record(run_dir: RunDir, jobs: dict[str, str]) -> None:
    run_dir.jobs_file.write_text(json.dumps(jobs, indent=2) + "\n")


class NotARunDir(Exception):
    pass


def load_run(run_dir: Path) -> tuple[Plan, dict[str, str]]:
    """The run's plan and its {stage: job id} (empty before submission)."""
    plan_file = RunDir(run_dir).plan_file
    if not plan_file.is_file():
        raise NotARunDir(f"{run_dir} has no {PLAN_FILE}: give a run dir written by `dist-ft render` or `launch`")
    try:
        plan = Plan.from_json(plan_file.read_text())
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as err:  # not JSON, or not a plan
        raise NotARunDir(f"{plan_file}: {err}") from None
    jobs_file = RunDir(run_dir).jobs_file
    return plan, read_jobs(jobs_file) if jobs_file.exists() else {}


def read_jobs(path: Path) -> dict[str, str]:
    """{stage: job id} from jobs.json. Every id must be a SLURM job id: they become arguments of
    scontrol, sacct and scancel, where `--user=root` would cancel every job of the user."""
    try:
        jobs = json.loads(path.read_text())
    except OSError as err:
        raise NotARunDir(f"{path}: {err.strerror or err}") from None
    except ValueError as err:  # not UTF-8, or not JSON
        raise NotARunDir(f"{path} is not valid JSON ({err}): fix or delete the file") from None
    if not isinstance(jobs, dict):
        raise NotARunDir(f"{path}: expected an object of stage: job id, got {type(jobs).__name__}")
    for stage, job in jobs.items():
        if isinstance(job, bool) or not isinstance(job, (str, int)) or not is_job_id(str(job)):
            raise NotARunDir(f"{path}: stage {stage!r} has {job!r}, which is not a SLURM job id "
                             "(digits, optionally _N): fix or delete the file")
    return {stage: str(job) for stage, job in jobs.items()}


def run_status(run_dir: Path, client: SlurmClient | None = None) -> int:
    plan, jobs = load_run(run_dir)
    client = client or SlurmClient()
    stage_of_job = {job: stage for stage, job in jobs.items()}
    inputs, error = [], None
    for stage in plan.stages:
        job, info = jobs.get(stage.name), None
        if job and error is None:
            try:
                info = client.job(job)
            except SlurmError as err:
                error = str(err)  # asking again for every stage would only repeat the wait
        inputs.append((stage.name, job, info, error if job else None, read_stage_files(run_dir, stage.name)))
    submitted = sum(stage.name in jobs for stage in plan.stages)
    title = f"run {plan.name} in {run_dir}: {submitted} of {len(plan.stages)} stage(s) submitted" + \
        (f" (after prepare job {jobs[PREPARE_JOB]})" if PREPARE_JOB in jobs else "")
    print(format_status(title, summarize_run(inputs, stage_of_job)))
    return 0


def run_cancel(run_dir: Path, client: SlurmClient | None = None) -> int:
    """scancel every job of the run that is still pending or running."""
    plan, jobs = load_run(run_dir)
    client = client or SlurmClient()
    if not jobs:
        print(f"nothing to cancel: {run_dir} has no {JOBS_FILE} (nothing was submitted)")
        return 0
    active: dict[str, tuple[str, str]] = {}
    try:
        for stage in [name for name in [PREPARE_JOB, *(s.name for s in plan.stages)] if name in jobs]:
            info = client.job(jobs[stage])
            if info is not None and info.state in ACTIVE_STATES:
                active[stage] = (jobs[stage], info.state)
            else:
                print(f"[{stage}] job {jobs[stage]} is {info.state if info else 'no longer in the queue'}: left alone")
        if active:
            client.cancel([job for job, _ in active.values()])
    except SlurmError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    for stage, (job, state) in active.items():
        print(f"[{stage}] cancelled job {job} (was {state})")
    if not active:
        print("nothing to cancel: no job of this run is pending or running")
    return 0
