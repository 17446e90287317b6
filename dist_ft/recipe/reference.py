"""The recipe reference (docs/recipe-reference.md), generated from the recipe dataclasses so the
docs cannot drift from the code: `python -m dist_ft.recipe.reference > docs/recipe-reference.md`."""

from __future__ import annotations

import dataclasses
import typing

from . import config
from .strict import _describe, number_text

SECTIONS = [("(top level)", config.Recipe), ("model", config.Model), ("long_context", config.LongContext),
            ("long_context.stages[]", config.Stage), ("long_context.progressive", config.Progressive),
            ("…rope", config.Rope), ("…data", config.Data), ("…data.sources[]", config.Source),
            ("…optimizer", config.Optimizer), ("…scheduler", config.Scheduler),
            ("finetune", config.Finetune),
            ("finetune.options", config.MethodOptions), ("finetune.samples", config.Samples),
            ("finetune.early_stopping", config.EarlyStopping), ("cluster", config.Cluster),
            ("parallelism", config.Parallelism), ("tracking", config.Tracking),
            ("checkpointing", config.Checkpointing), ("evaluation", config.Evaluation)]


def reference() -> str:
    out = ["# Recipe reference", "",
           "Generated from `dist_ft/recipe/config.py` (and the section modules it re-exports) by `python -m dist_ft.recipe.reference`; a test keeps it "
           "current.",
           "Unknown keys are errors (with the nearest valid key suggested). `…rope` and `…data` appear in",
           "several places (`long_context.stages[].rope`, `long_context.progressive.rope`, `finetune.rope`;",
           "`long_context.data`, `finetune.data`); `…optimizer` and `…scheduler` in every stage section",
           "(`long_context.stages[]`, `long_context.progressive`, `finetune`).", ""]
    for title, cls in SECTIONS:
        out += [f"## `{title}`", "", "| key | type | default | meaning |", "|---|---|---|---|"]
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            out.append(f"| `{f.name}` | {_describe(hints[f.name])} | {_default(f)} | {f.metadata.get('doc', '')}"
                       f"{_bounds(f)} |")
        out.append("")
    return "\n".join(out)


def _default(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        return f"`{f.default!r}`" if f.default is not None else "unset"
    if f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
        return f"`{value!r}`" if isinstance(value, (list, dict)) else "(section defaults)"
    return "**required**"


def _bounds(f: dataclasses.Field) -> str:
    low, high = f.metadata.get("min"), f.metadata.get("max")
    parts = ([f">= {number_text(low)}"] if low is not None else []) + \
        ([f"<= {number_text(high)}"] if high is not None else [])
    return f" ({', '.join(parts)})" if parts else ""


if __name__ == "__main__":
    print(reference())
