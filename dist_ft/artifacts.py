"""Render a plan into files, then write the run dir in one step.

Rendering is pure (name → text). Writing goes through a temporary sibling
directory renamed into place, so a failure never leaves a half-written run dir.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import yaml

from .config import Recipe, to_dict
from .deepspeed_config import render_ds_config
from .local_launch import local_script
from .plan import Plan
from .slurm import render_sbatch

PLAN_FILE = "plan.json"
RECIPE_FILE = "recipe.resolved.yaml"
LOCAL_SCRIPT = "local.sh"
DEFAULT_PORT = 29500


class RunDirConflict(Exception):
    pass


def render_files(recipe: Recipe, plan: Plan) -> dict[str, str]:
    files = {RECIPE_FILE: yaml.safe_dump(to_dict(recipe), sort_keys=False),
             PLAN_FILE: plan.to_json() + "\n",
             LOCAL_SCRIPT: local_script(plan, plan.cluster.get("rdzv_port", DEFAULT_PORT))}
    for stage in plan.stages:
        files[stage.ds_config] = json.dumps(render_ds_config(plan, stage), indent=2) + "\n"
        files[stage.sbatch] = render_sbatch(plan, stage)
    return files


def write_run_dir(run_dir: Path, files: dict[str, str], force: bool = False) -> None:
    """Create run_dir with `files`. An existing run dir is kept if it holds the same plan
    (re-rendering a run is harmless; its checkpoints stay) and refused otherwise."""
    if run_dir.exists():
        _check_same_plan(run_dir, files[PLAN_FILE], force)
        _write_all(run_dir, files)
        return
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{run_dir.name}.", dir=run_dir.parent))
    try:
        _write_all(staging, files)
        os.rename(staging, run_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _check_same_plan(run_dir: Path, plan_text: str, force: bool) -> None:
    existing = run_dir / PLAN_FILE
    if force or not existing.exists() or existing.read_text() == plan_text:
        return
    raise RunDirConflict(f"{run_dir} already holds a different plan; its checkpoints belong to that plan. "
                         "Use another `name`, delete the run dir, or pass --force to overwrite its files.")


def _write_all(folder: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        target = folder / name
        tmp = target.with_name(f".{name}.tmp")
        tmp.write_text(text)
        if name.endswith((".sbatch", ".sh")):
            tmp.chmod(0o755)
        os.replace(tmp, target)
    for sub in ("logs", "control", "stages"):
        (folder / sub).mkdir(exist_ok=True)
