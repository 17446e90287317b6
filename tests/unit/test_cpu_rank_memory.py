"""CPU ranks share their node's memory: the plan checks them against it (declared, or this machine's)."""

import pytest

from dist_ft.cli import main
from dist_ft.plan.plan import make_plan
from dist_ft.recipe.config import apply_overrides, recipe_from_dict
from dist_ft.recipe.model_shape import shape_from_config
from dist_ft.recipe.strict import RecipeError
from tests.conftest import LAUNCH, demo_raw


def demo_plan(overrides=(), host_memory_gib=None):
    recipe = recipe_from_dict(apply_overrides(demo_raw(), list(overrides)))
    return make_plan(recipe, shape_from_config(recipe.model.config, "test"), "/tmp/run", host_memory_gib)


def test_a_declared_node_memory_is_shared_by_the_nodes_ranks():
    with pytest.raises(RecipeError) as err:
        demo_plan(["cluster.cpu_memory_gb=1"])  # 2 ranks: 0.5 GiB each, below the ~0.51 the demo needs
    first = err.value.problems[0]
    assert first.path == "long_context.progressive"
    assert first.what.startswith("stage ctx512 needs ~0.51 GiB per rank at seq_len 512 (micro-batch 1)")
    assert first.what.endswith("more than the 0.5 GiB each of 2 CPU rank(s) per node gets "
                               "(1.0 GiB declared in cluster.cpu_memory_gb)")
    assert first.fix.endswith("or raise cluster.cpu_memory_gb if the nodes have more")


def test_without_a_declaration_this_machines_memory_is_the_budget():
    with pytest.raises(RecipeError) as err:
        demo_plan(host_memory_gib=1.0)
    assert "(1.0 GiB of this machine)" in err.value.problems[0].what
    assert "set cluster.cpu_memory_gb to the compute nodes' memory" in err.value.problems[0].fix
    assert demo_plan(["cluster.cpu_memory_gb=64"], host_memory_gib=1.0).stages  # the declaration wins
    assert demo_plan(host_memory_gib=64.0).stages


def test_a_tight_fit_warns_with_the_stage_name():
    plan = demo_plan(["cluster.cpu_memory_gb=1.2"])  # 0.6 GiB per rank: ctx1k's 0.514 is above 85 %, ctx512's 0.508 not
    assert [w for w in plan.warnings if "tight" in w] == ["ctx1k: ~0.5 of 0.6 GiB per rank: tight"]


def test_cpu_memory_gb_is_bounded():
    with pytest.raises(RecipeError, match=r"cluster.cpu_memory_gb: must be >= 1"):
        demo_plan(["cluster.cpu_memory_gb=0"])


def test_the_cli_plans_cpu_ranks_against_this_machines_memory(monkeypatch, capsys):
    import dist_ft.cli as cli

    monkeypatch.setattr(cli, "host_memory_gib", lambda: 1.0)
    assert main(["plan", str(LAUNCH / "demo.yaml")]) == 2
    assert "GiB each of 2 CPU rank(s) per node gets (1.0 GiB of this machine)" in capsys.readouterr().err
