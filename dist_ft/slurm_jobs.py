"""Submitting a rendered run to SLURM: one sbatch per stage, chained with afterok."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

from .plan import Plan
from .slurm import submit_command

JOBS_FILE = "jobs.json"


def submit_stages(plan: Plan, dry_run: bool) -> int:
    run_dir = Path(plan.run_dir)
    jobs: dict[str, str] = {}
    previous: str | None = None
    for stage in plan.stages:
        cmd = submit_command(str(run_dir / stage.sbatch), previous)
        if dry_run:
            print(f"[{stage.name}] {shlex.join(cmd)}")
            previous = f"<job id of {stage.name}>"
            continue
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            print(f"error: sbatch refused stage {stage.name}: {result.stderr.strip()}", file=sys.stderr)
            _record(run_dir, jobs)
            return 1
        previous = result.stdout.strip().split(";")[0]
        jobs[stage.name] = previous
        print(f"[{stage.name}] submitted job {previous}", flush=True)
    if not dry_run:
        _record(run_dir, jobs)
        print(f"follow it with: dist-ft status {run_dir}")
    return 0


def _record(run_dir: Path, jobs: dict[str, str]) -> None:
    (run_dir / JOBS_FILE).write_text(json.dumps(jobs, indent=2) + "\n")
