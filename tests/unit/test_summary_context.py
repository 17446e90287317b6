"""The end-of-run summary's line for a long-context stage: what its after-stage evaluation bought, beyond and
within the native context, against the evaluation before it."""

from __future__ import annotations

import json
import math

from dist_ft.launcher.summary import context_lines
from dist_ft.plan.plan import make_plan
from dist_ft.recipe.config import recipe_from_dict
from dist_ft.recipe.model_shape import shape_from_config
from tests.conftest import demo_raw


def _plan(tmp_path):
    recipe = recipe_from_dict(demo_raw())
    return make_plan(recipe, shape_from_config(recipe.model.config, "test"), str(tmp_path / "run"))


def _results(plan, stage: str, bands: list[tuple[int, int, int, float]]) -> None:
    """results.json as `dist-ft eval` writes it: the own-RoPE variant's bands at 1024 (native 256)."""
    rows = [{"band": f"{a}-{b}", "start": a, "end": b, "tokens": tokens, "ppl": ppl, "beyond_native": a >= 256}
            for a, b, tokens, ppl in bands]
    variant = {"native_context": 256, "perplexity": {"256": {"bands": rows[:1]}, "1024": {"bands": rows}}}
    folder = plan.run.eval(stage)
    folder.mkdir(parents=True)
    (folder / "results.json").write_text(json.dumps({"variants": {"keep": variant}}))


def test_each_long_context_stage_says_its_perplexity_beyond_and_within_the_native_context(tmp_path):
    plan = _plan(tmp_path)
    first, second = (s.name for s in plan.stages[:2])
    assert context_lines(plan, 0, "") == [], "no evaluation, no line"
    _results(plan, first, [(0, 256, 1000, 80.0), (256, 512, 1000, 90.0), (512, 1024, 2000, 100.0)])
    _results(plan, second, [(0, 256, 1000, 40.0), (256, 512, 1000, 45.0), (512, 1024, 2000, 30.0)])
    beyond_first = math.exp((1000 * math.log(90) + 2000 * math.log(100)) / 3000)  # 96.55: token-weighted
    beyond_second = math.exp((1000 * math.log(45) + 2000 * math.log(30)) / 3000)  # 34.34
    assert context_lines(plan, 0, "") == [
        f"eval @ 1024: ppl beyond the native 256 tokens {beyond_first:.4g}, within 80 "
        "(the model before this stage was not evaluated: the recipe initialises it at random)"]
    assert context_lines(plan, 1, "  ") == [
        f"  eval @ 1024: ppl beyond the native 256 tokens {beyond_first:.4g} -> {beyond_second:.4g}, "
        f"within 80 -> 40 (before: {first})"]
