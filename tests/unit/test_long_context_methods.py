"""Long-context stages take fine-tuning's method vocabulary (issue 28): full, longlora, lora, qlora, dora, with
the same plan-time checks, paths and report."""

from __future__ import annotations

import pytest

from dist_ft.plan.method_options import trainable_params
from dist_ft.plan.plan_report import format_plan
from dist_ft.recipe.strict import RecipeError
from tests.helpers import plan_of, problems_of

PROG = "long_context.progressive"


def test_progressive_stages_take_the_method_and_options_and_the_plan_counts_what_trains():
    plan = plan_of([f"{PROG}.method=longlora", f"{PROG}.options.r=4"])
    stages = [s for s in plan.stages if s.phase == "continued_pretraining"]
    assert [(s.method, s.method_options.r) for s in stages] == [("longlora", 4), ("longlora", 4)]
    count = trainable_params(plan.model_shape, "longlora", stages[0].method_options)
    assert count < plan.model_shape.num_params
    report = format_plan(plan, "python3")
    assert report.count(f"trainable: {count:,} parameters") == 2 and "method longlora (r 4" in report
    assert all(s.memory["total_gib"] > 0 for s in stages)


def test_full_stays_the_default_with_no_options():
    plan = plan_of()
    assert [(s.method, s.method_options) for s in plan.stages[:2]] == [("full", None), ("full", None)]


def test_explicit_stages_refuse_qlora_on_cpu_and_misplaced_options_with_dotted_paths():
    raw_stage = "long_context.stages"
    found = problems_of([f"{PROG}=null", f'{raw_stage}=[{{"name": "a", "seq_len": 512, "steps": 2, '
                         '"method": "qlora"}, {"name": "b", "seq_len": 1024, "steps": 2, "method": "full", '
                         '"options": {"bias": "all"}}]'])
    assert set(found) == {f"{raw_stage}[0].method", f"{raw_stage}[1].options.bias"}
    assert "GPUs" in found[f"{raw_stage}[0].method"].what


@pytest.mark.parametrize("method", ["prefix", "ia3", "bitfit"])
def test_methods_outside_the_lora_family_are_refused_by_the_recipe(method):
    with pytest.raises(RecipeError, match=f"{PROG}.method"):
        plan_of([f"{PROG}.method={method}"])


def test_shifted_sparse_attention_plans_a_quarter_group_per_stage_and_refuses_what_it_cannot_do():
    plan = plan_of(["long_context.attention=shifted_sparse"])
    assert [(s.attention, s.attention_group) for s in plan.stages] == [
        ("shifted_sparse", 128), ("shifted_sparse", 256), ("full", None)]
    assert "attention S²-Attn (groups of 128, half the heads shifted)" in format_plan(plan, "python3")
    found = problems_of(["long_context.attention=shifted_sparse", "long_context.shifted_sparse_group=2048",
                         "parallelism.sequence_parallel=2"])
    assert set(found) >= {"long_context.shifted_sparse_group", "long_context.attention"}
    with pytest.raises(RecipeError, match="long_context.shifted_sparse_group"):
        plan_of(["long_context.shifted_sparse_group=64"])  # without attention: shifted_sparse


def test_carry_needs_one_adapter_method_across_the_stages():
    stages = ('[{"name": "a", "seq_len": 512, "steps": 2, "method": "lora"}, '
              '{"name": "b", "seq_len": 1024, "steps": 2, "method": "%s"}]')
    base = [f"{PROG}=null", "long_context.adapter=carry"]
    plan = plan_of([*base, f"long_context.stages={stages % 'lora'}"])
    assert [s.carry_adapter for s in plan.stages] == [False, True, False]
    found = problems_of([*base, f"long_context.stages={stages % 'dora'}"])
    assert set(found) == {"long_context.stages[1].method"}
