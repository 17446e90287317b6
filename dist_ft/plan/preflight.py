"""The launcher's I/O before planning: resolve recipe-relative paths, check they exist,
read the model's shape. Everything after this is pure."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from dist_ft.recipe.config import Data, Recipe
from dist_ft.recipe.data_files import data_path_problem
from dist_ft.recipe.hostfile import parse_hostfile
from dist_ft.recipe.model_shape import ModelShape, ShapeError, is_file, read_model_shape, resolve_model_dir
from dist_ft.recipe.strict import Invalid, Problem, RecipeError


def resolve_data_path(entry: str, base: Path) -> str:
    """`package:NAME` → that package's folder (e.g. stdlib sources); relative → against the recipe's folder."""
    if entry.startswith("package:"):
        folder = resolve_model_dir(entry)
        return str(folder) if folder else entry
    path = Path(entry).expanduser()
    return str(path if path.is_absolute() else (base / path).resolve())


def resolve_recipe_paths(recipe: Recipe, base: Path) -> Recipe:
    """Make data paths and a local (or `package:NAME`) model path absolute: ranks may start in any directory,
    and only the launcher resolves `package:` names."""
    def fix(data: Data) -> Data:
        sources = [dataclasses.replace(s, paths=[resolve_data_path(p, base) for p in s.paths]) for s in data.sources]
        return dataclasses.replace(data, paths=[resolve_data_path(p, base) for p in data.paths], sources=sources,
                                   validation_paths=[resolve_data_path(p, base) for p in data.validation_paths],
                                   test_paths=[resolve_data_path(p, base) for p in data.test_paths])

    changes = {}
    if recipe.long_context:
        changes["long_context"] = dataclasses.replace(recipe.long_context, data=fix(recipe.long_context.data))
    if recipe.finetune:
        changes["finetune"] = dataclasses.replace(recipe.finetune, data=fix(recipe.finetune.data))
    if recipe.cluster.hostfile:
        changes["cluster"] = dataclasses.replace(recipe.cluster, hostfile=resolve_data_path(recipe.cluster.hostfile,
                                                                                            base))
    model_path = recipe.model.name_or_path
    if model_path and (model_path.startswith("package:") or _looks_local(model_path, base)):
        changes["model"] = dataclasses.replace(recipe.model, name_or_path=resolve_data_path(model_path, base))
    return dataclasses.replace(recipe, **changes)


def check_inputs(recipe: Recipe) -> None:
    """Missing local inputs are recipe errors, found before anything is written."""
    problems: list[Problem] = []
    sections = [("long_context.data", recipe.long_context.data if recipe.long_context else None),
                ("finetune.data", recipe.finetune.data if recipe.finetune else None)]
    for path, data in sections:
        for field, entry in data.all_paths() if data else []:
            if entry.startswith("package:"):
                problems.append(Problem(f"{path}.{field}", f"no installed package {entry[8:]!r}",
                                        "install it or give a file path"))
            elif (unusable := data_path_problem(entry)) is not None:
                problems.append(Problem(f"{path}.{field}", *unusable))
    model = recipe.model
    if model.name_or_path:
        folder = resolve_model_dir(model.name_or_path)
        if model.name_or_path.startswith("package:") and folder is None:
            problems.append(Problem("model.name_or_path", f"no installed package {model.name_or_path[8:]!r}",
                                    f"pip install {model.name_or_path[8:].replace('_', '-')}"))
        elif Path(model.name_or_path).is_absolute() and folder is None:
            problems.append(Problem("model.name_or_path", f"{model.name_or_path} is not a directory",
                                    "give a local model directory, `package:NAME`, or a hub name"))
        elif folder and model.gguf_file and not is_file(folder / model.gguf_file):
            problems.append(Problem("model.gguf_file", f"{model.gguf_file} is not in {folder}",
                                    "check the file name"))
    if problems:
        raise RecipeError(problems)


def read_hosts(recipe: Recipe) -> Recipe:
    """The recipe with `cluster.hosts` read from `cluster.hostfile` (where one is given), checked against
    the cluster's ranks per node."""
    c = recipe.cluster
    if not c.hostfile:
        return recipe
    if c.hosts:
        raise RecipeError([Problem("cluster.hosts", "both cluster.hosts and cluster.hostfile are set",
                                   "keep one of them")])
    try:
        text = Path(c.hostfile).read_text()
    except (OSError, UnicodeDecodeError) as err:
        why = getattr(err, "strerror", None) or str(err)
        raise RecipeError([Problem("cluster.hostfile", f"cannot read {c.hostfile}: {why}",
                                   "give an existing hostfile (`HOST slots=N` per line)")]) from None
    try:
        entries = parse_hostfile(text)
    except ValueError as err:
        raise RecipeError([Problem("cluster.hostfile", f"{c.hostfile}: {err}",
                                   "one `HOST slots=N` per line; # starts a comment")]) from None
    problems = [Problem("cluster.hostfile", f"{c.hostfile} line {e.line}: {e.host} has slots={e.slots} but "
                        f"every node runs {c.ranks_per_node} rank(s) (cluster."
                        f"{'gpus_per_node' if c.gpus_per_node else 'procs_per_node'})",
                        f"set slots={c.ranks_per_node}, or change cluster."
                        f"{'gpus_per_node' if c.gpus_per_node else 'procs_per_node'}")
                for e in entries if e.slots is not None and e.slots != c.ranks_per_node]
    if problems:
        raise RecipeError(problems)
    try:
        cluster = dataclasses.replace(c, hosts=[e.host for e in entries])
    except Invalid as err:  # a host listed twice (Cluster's own check)
        raise RecipeError([Problem("cluster.hostfile", f"{c.hostfile}: {err.what}",
                                   "one line per node")]) from None
    return dataclasses.replace(recipe, cluster=cluster)


def model_shape(recipe: Recipe) -> ModelShape | None:
    m = recipe.model
    try:
        return read_model_shape(m.name_or_path, m.gguf_file, m.config)
    except ShapeError as err:
        if m.name_or_path is None:  # the recipe's own model.config
            raise RecipeError([Problem(f"model.config.{err.key}", err.what, "fix the value in model.config")]) \
                from None
        field = "model.gguf_file" if err.key == "gguf_file" else "model.name_or_path"
        raise RecipeError([Problem(field, f"the model's config is unusable: {err}",
                                   "point at a valid model directory")]) from None


def host_memory_gib() -> float | None:
    """This machine's physical memory: what CPU ranks share when `cluster.cpu_memory_gb` does not say
    (None where the system does not tell)."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 1024**3
    except (ValueError, OSError):
        return None


def _looks_local(path: str, base: Path) -> bool:
    """Hub names look like `org/name`; anything that exists, or starts like a path, is local."""
    return path.startswith((".", "/", "~")) or (base / path).exists()
