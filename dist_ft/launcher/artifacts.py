"""Render a plan into files, then write the run dir in one step.

Rendering is pure (name → text). Writing builds every file in a private temporary
folder first, then renames the folder into place (a new run dir) or the files into
it (a re-render), so a failure never leaves a half-written or mixed run dir.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import yaml

from dist_ft.durable import fsync_dir
from dist_ft.plan.plan import Plan
from dist_ft.plan.run_dir import LOCAL_SCRIPT, NODES_SCRIPT, PLAN_FILE, PREPARE_SBATCH, RECIPE_FILE, SUBDIRS, RunDir
from dist_ft.recipe.config import Recipe, to_dict
from .deepspeed_config import render_ds_config
from .local_launch import local_script, nodes_script
from .run_changes import CONTINUE, FRESH, only_where_it_runs, recipe_changes, set_aside, what_continues
from .slurm import needs_prepare_job, render_prepare_sbatch, render_sbatch


ACCESS_MODES = {"private": 0o700, "group": 0o750, "everyone": 0o755}  # checkpointing.run_dir_access


class RunDirConflict(Exception):
    """The run dir cannot take the rendered files (a foreign folder, another plan, something in the way)."""


def render_files(recipe: Recipe, plan: Plan, python: str) -> dict[str, str]:
    """Every file of the run dir by name. `python`: the interpreter the scripts train with
    (`launch_script.training_python`, resolved once by the command)."""
    files = {RECIPE_FILE: yaml.safe_dump(to_dict(recipe), sort_keys=False),
             PLAN_FILE: plan.to_json() + "\n",
             NODES_SCRIPT: nodes_script(plan, python)}
    if plan.nodes == 1:  # local.sh runs one node: for several it would start one node's ranks and wait forever
        files[LOCAL_SCRIPT] = local_script(plan, python, plan.cluster.rdzv_port)
    for stage in plan.stages:
        files[stage.ds_config] = json.dumps(render_ds_config(plan, stage), indent=2) + "\n"
        files[stage.sbatch] = render_sbatch(plan, stage, python)
    if needs_prepare_job(plan):
        files[PREPARE_SBATCH] = render_prepare_sbatch(plan, python)
    return files


def write_run_dir(run_dir: Path, files: dict[str, str], intent: str | None = None, access: str = "group",
                  stages: tuple[str, ...] = ()) -> list[str]:
    """Create run_dir with `files`, or re-render a run dir that holds the same plan (its checkpoints
    stay, so a resume may re-render). A different plan needs an intent (run_changes.py) unless only
    `cluster` changed. Every file is written and synced in a fresh private folder first, so a full disk
    or a crash while writing leaves the run dir as it was; `access` (checkpointing.run_dir_access) is then
    given to the run dir, its folders and the rendered files. Returns what the user should be told."""
    mode = ACCESS_MODES[access]
    fresh = not os.path.lexists(run_dir)
    notes, start_over = ([], False) if fresh else _check_rerender(run_dir, files, intent, stages)
    staging = _staging_dir(run_dir, fresh or start_over)
    try:
        _write_all(staging, files, run_dir, mode)
        if start_over:
            notes.append(f"started over: the old run dir is now {set_aside(run_dir)} (nothing was deleted)")
        if fresh or start_over:
            os.chmod(staging, mode)  # mkdtemp made it 0700
            os.rename(staging, run_dir)  # the whole run dir appears at once
            fsync_dir(run_dir.parent)
        else:
            _move_in(staging, run_dir, files, mode)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return notes


def _check_rerender(run_dir: Path, files: dict[str, str], intent: str | None,
                    stages: tuple[str, ...]) -> tuple[list[str], bool]:
    """(what to tell the user, whether to start over) for a run dir that exists."""
    if run_dir.is_symlink() or not run_dir.is_dir():
        raise RunDirConflict(f"{run_dir} exists and is not a directory: choose another --out")
    plan_file = run_dir / PLAN_FILE
    if not os.path.lexists(plan_file):
        if any(run_dir.iterdir()):
            raise RunDirConflict(f"{run_dir} is not empty and holds no {PLAN_FILE}: it is not a dist-ft run dir, and "
                                 "rendering would overwrite files in it. Choose a new or empty --out.")
        return [], False
    if intent == FRESH:
        return [], True
    for name in files:
        if (run_dir / name).is_dir() and not (run_dir / name).is_symlink():
            raise RunDirConflict(f"{run_dir / name} is a directory where a rendered file goes: move it away")
    if _text_or_none(plan_file) == files[PLAN_FILE]:
        return [], False
    changes = recipe_changes(_text_or_none(run_dir / RECIPE_FILE) or "", files[RECIPE_FILE])
    listed = "; ".join(map(str, changes[:8])) + (f"; and {len(changes) - 8} more" if len(changes) > 8 else "")
    keeps = what_continues(RunDir(run_dir), list(stages))
    if only_where_it_runs(changes):
        return [f"the plan changed only where it runs ({listed}): the run goes on from where it was", *keeps], False
    if intent == CONTINUE:
        why = listed or "same recipe, another plan: another dist-ft version or changed model files"
        return [f"continuing under a changed plan ({why})", *keeps], False
    what = f"these settings changed: {listed}" if changes else \
        "the recipe is the same but the plan is not (another dist-ft version, or the model's files changed)"
    raise RunDirConflict(f"{run_dir} already holds a different plan; {what}. Say what you mean: --continue keeps "
                         "its finished stages and resumes the others from their checkpoints with the new settings; "
                         "--fresh starts over (the old run dir is moved aside, nothing is deleted); or choose "
                         "another `name` or --out.")


def _text_or_none(path: Path) -> str | None:
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError):
        return None


def _staging_dir(run_dir: Path, fresh: bool) -> Path:
    """A new 0700 folder with an unguessable name (mkdtemp), so nothing can be planted in it: beside
    a new run dir (renamed into its place), inside an existing one (same filesystem for the renames)."""
    try:
        if fresh:
            run_dir.parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f".{run_dir.name[:40]}.render.",
                                     dir=run_dir.parent if fresh else run_dir))
    except OSError as err:
        raise RunDirConflict(f"cannot write the run dir {run_dir}: {err}") from err


def _write_all(folder: Path, files: dict[str, str], run_dir: Path, mode: int) -> None:
    try:
        for name, text in files.items():
            executable = name.endswith((".sbatch", ".sh"))
            _write_new(folder / name, text, mode if executable else mode & 0o666)
        for sub in SUBDIRS:
            (folder / sub).mkdir()
            os.chmod(folder / sub, mode)  # not the umask's: a team reads the logs
    except OSError as err:  # e.g. a full disk: say so, as a bad --out would be
        raise RunDirConflict(f"cannot write the run dir {run_dir}: {err}; nothing in it was changed") from err


def _write_new(path: Path, text: str, mode: int) -> None:
    """A new file, never through a link or over an existing file, on disk before it is renamed in."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fchmod(handle.fileno(), mode)
        os.fsync(handle.fileno())


def _move_in(staging: Path, run_dir: Path, files: dict[str, str], mode: int) -> None:
    """One rename per file (a rename replaces a planted link, never follows it). plan.json goes last:
    until it moves, the old plan stays in charge, and rendering again completes the set. A local.sh the
    new plan no longer has (it runs several nodes) goes, so nobody starts one node of them by hand."""
    for sub in SUBDIRS:
        (run_dir / sub).mkdir(exist_ok=True)
    for name in sorted(files, key=lambda n: n == PLAN_FILE):
        os.replace(staging / name, run_dir / name)
    if LOCAL_SCRIPT not in files and (run_dir / LOCAL_SCRIPT).is_file():
        (run_dir / LOCAL_SCRIPT).unlink()
    os.chmod(run_dir, mode)
    fsync_dir(run_dir)
