"""The recipe loader: strict keys, types, bounds, overrides, the progressive form."""

import pytest

from dist_ft.recipe.config import Progressive, apply_overrides, recipe_from_dict
from dist_ft.recipe.strict import RecipeError
from tests.conftest import demo_raw


def problems(raw):
    with pytest.raises(RecipeError) as err:
        recipe_from_dict(raw)
    return {p.path: p for p in err.value.problems}


def test_demo_loads():
    recipe = recipe_from_dict(demo_raw())
    assert recipe.cluster.world_size == 2
    assert [s.seq_len for s in recipe.long_context.expanded()] == [512, 1024]


def test_unknown_key_suggests_the_nearest():
    raw = demo_raw()
    raw["model"]["dtpye"] = "bf16"
    found = problems(raw)
    assert "did you mean `dtype`" in found["model.dtpye"].fix


def test_every_problem_is_reported_at_once():
    raw = demo_raw()
    raw["cluster"]["nodes"] = 0
    raw["parallelism"]["zero_stage"] = 4
    raw["finetune"]["method"] = "lorra"
    found = problems(raw)
    assert set(found) >= {"cluster.nodes", "parallelism.zero_stage", "finetune.method"}
    assert "did you mean `lora`" in found["finetune.method"].fix


def test_wrong_type_names_the_expected_type():
    raw = demo_raw()
    raw["cluster"]["procs_per_node"] = "two"
    assert "expected an integer" in problems(raw)["cluster.procs_per_node"].what


def test_missing_required_field():
    raw = demo_raw()
    del raw["long_context"]["tokens_per_step"]
    assert "required" in problems(raw)["long_context.tokens_per_step"].what


def test_yaml_exponent_strings_read_as_numbers():
    raw = demo_raw()
    raw["finetune"]["lr"] = "2e-5"
    assert recipe_from_dict(raw).finetune.lr == 2e-5


def test_overrides_set_nested_and_listed_fields():
    raw = apply_overrides(demo_raw(), ["cluster.nodes=4", "finetune.options.r=4", "model.config.hidden_size=32"])
    recipe = recipe_from_dict(raw)
    assert recipe.cluster.nodes == 4 and recipe.finetune.options.r == 4
    assert recipe.model.config["hidden_size"] == 32


def test_override_without_equals_is_an_error():
    with pytest.raises(RecipeError, match="key=value"):
        apply_overrides(demo_raw(), ["cluster.nodes"])


def test_progressive_expands_to_doubling_stages_ending_at_target():
    stages = Progressive(start=8192, target=65536, steps=10).expand()
    assert [s.seq_len for s in stages] == [8192, 16384, 32768, 65536]
    assert [s.name for s in stages] == ["ctx8k", "ctx16k", "ctx32k", "ctx64k"]
    assert Progressive(start=1000, target=3000, growth=2, steps=1).expand()[-1].seq_len == 3000


def test_exactly_one_of_steps_and_tokens():
    raw = demo_raw()
    raw["long_context"]["progressive"]["tokens"] = 1000
    assert "exactly one" in problems(raw)["long_context.progressive.steps"].what


def test_env_names_must_be_identifiers():
    raw = demo_raw()
    raw["cluster"]["env"] = {"BAD-NAME": "1"}
    assert "not a valid environment variable name" in problems(raw)["cluster.env.BAD-NAME"].what


def test_sbatch_values_must_stay_on_one_line():
    raw = demo_raw()
    raw["cluster"]["partition"] = "gpu\nrm -rf /"
    assert "line break" in problems(raw)["cluster.partition"].what
