"""A long-context stage's training-time attention (long_context.attention): S²-Attn's group size, checked
against the stage, the model and the parallelism. Pure."""

from __future__ import annotations

from dist_ft.recipe.config import Recipe
from dist_ft.recipe.model_shape import ModelShape
from dist_ft.recipe.strict import Problem


def shifted_sparse_group(recipe: Recipe, shape: ModelShape | None, seq_len: int,
                         problems: list[Problem]) -> int | None:
    """The stage's S²-Attn group (None: full attention): the recipe's, or a quarter of seq_len."""
    lc = recipe.long_context
    if lc.attention != "shifted_sparse":
        return None
    group = lc.shifted_sparse_group or max(2, seq_len // 4 // 2 * 2)
    path = "long_context.shifted_sparse_group"
    if group % 2:
        problems.append(Problem(path, f"{group} is odd: half the heads shift by half a group",
                                f"use an even group, e.g. {group + 1}"))
    if group >= seq_len:
        problems.append(Problem(path, f"a group of {group} tokens spans the whole seq_len {seq_len}: S²-Attn "
                                "would be full attention", f"use a group below {seq_len} (a quarter: {seq_len // 4})"))
    if recipe.parallelism.sequence_parallel > 1:
        problems.append(Problem("long_context.attention", "shifted_sparse is not wired into Ulysses sequence "
                                "parallelism here (its attention sees a slice of the heads, re-registered by "
                                "DeepSpeed)", "set `parallelism.sequence_parallel: 1`, or `attention: full`"))
    if shape is not None and shape.num_heads % 2:
        problems.append(Problem("long_context.attention", f"shifted_sparse shifts half of the heads: "
                                f"{shape.num_heads} heads do not halve", "use `attention: full` with this model"))
    return group
