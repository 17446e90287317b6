"""The memory estimate under sequence parallelism: ZeRO shards over every rank, activations over SP."""

from dist_ft.recipe.model_shape import CATALOGUE, shape_from_config
from tests.unit.test_plan import plan_of, yaml_cluster_recipe

LLAMA8B = shape_from_config(CATALOGUE["meta-llama/Meta-Llama-3-8B"], "test")
GIB = 1024**3


def llama_plan(*overrides: str):
    return plan_of(list(overrides), raw=yaml_cluster_recipe(), shape=LLAMA8B)


def test_the_64k_stage_estimate_falls_as_sequence_parallelism_grows():
    totals = [llama_plan("cluster.gpu_memory_gb=1000", f"parallelism.sequence_parallel={sp}")
              .stage("ctx64k").memory["total_gib"] for sp in (1, 2, 4, 8)]
    assert totals == sorted(totals, reverse=True) and len(set(totals)) == 4


def test_zero_shards_weights_gradients_and_optimizer_over_all_32_ranks_whatever_the_sp_degree():
    params = LLAMA8B.num_params
    for sp in (1, 2, 4, 8):
        mem = llama_plan("cluster.gpu_memory_gb=1000", f"parallelism.sequence_parallel={sp}").stage("ctx64k").memory
        assert mem["optimizer_gib"] == round(params * (8 + 4) / 32 / GIB, 3)  # Adam moments + fp32 master
        assert mem["gradients_gib"] == round(params * 2 / 32 / GIB, 3)
        layers = 2 * params * 2 / 32  # the current and the prefetched layer, gathered whole
        assert mem["weights_gib"] == round((params * 2 / 32 + layers) / GIB, 3)


def test_a_24_gib_gpu_takes_every_stage_of_the_llama3_recipe_at_its_sp_4():
    plan = llama_plan("cluster.gpu_memory_gb=24")
    assert max(s.memory["total_gib"] for s in plan.stages) < 24
