"""From the raw recipe to a Plan with every problem reported at once, once.

Loading, the input checks, the hostfile, the model's shape, the run dir and the planner each find
problems; a user who fixes one only to meet the next pays a submission per problem. So every pass
runs and the problems are joined. One exception: a value the loader refused (a wrong type, out of
bounds) is not planned with, since its default would make up findings about a recipe nobody wrote; an
unknown or replaced key is only dropped, as it changes nothing the planner reads.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from dist_ft.recipe.config import Recipe, recipe_from_dict
from dist_ft.recipe.raw_recipe import without_keys
from dist_ft.recipe.strict import Problem, RecipeError

from .plan import Plan, make_plan
from .preflight import (check_inputs, check_model_type, model_shape, read_hosts, resolve_hub_model,
                        resolve_recipe_paths)

DROPPABLE = ("unknown key", "was replaced")  # what the loader says of keys the planner never reads


def plan_recipe(raw: dict, base: Path, run_dir_of: Callable[[Recipe], str],
                host_memory_gib: float | None) -> tuple[Recipe, Plan]:
    """`base`: the recipe's folder (relative paths); `run_dir_of` may raise RecipeError for its path."""
    recipe, problems = _load(raw)
    recipe = resolve_recipe_paths(recipe, base)
    found = _Found(problems)
    recipe = found.run(resolve_hub_model, recipe, base) or recipe
    found.run(check_inputs, recipe)
    recipe = found.run(read_hosts, recipe) or recipe
    shape = found.run(model_shape, recipe)
    found.run(check_model_type, recipe, shape)
    run_dir = found.run(run_dir_of, recipe) or ""
    plan = found.run(make_plan, recipe, shape, run_dir, host_memory_gib)
    if found.problems:
        raise RecipeError(list(dict.fromkeys(found.problems)))  # progressive stages share a section: once each
    return recipe, plan


def _load(raw: dict) -> tuple[Recipe, list[Problem]]:
    """The recipe, and the loader's problems when they are only keys to drop (else RecipeError)."""
    try:
        return recipe_from_dict(raw), []
    except RecipeError as err:
        if not all(p.what in DROPPABLE for p in err.problems):
            raise
        return recipe_from_dict(without_keys(raw, [p.path for p in err.problems])), err.problems


class _Found:
    """Problems so far; `run` calls one pass and keeps its problems (returning None for them)."""

    def __init__(self, problems: list[Problem]):
        self.problems = list(problems)

    def run(self, check: Callable, *args):
        try:
            return check(*args)
        except RecipeError as err:
            self.problems.extend(err.problems)
            return None
