"""The out-of-memory error: the stage by name, every part adding up to the total, and only the levers
not yet pulled, each with the saving the estimate gives for it."""

import re

import pytest

from dist_ft.recipe.strict import RecipeError
from tests.unit.test_plan_memory_sp import llama_plan


def problems(*overrides: str) -> list:
    with pytest.raises(RecipeError) as err:
        llama_plan(*overrides)
    return err.value.problems


def by_stage(found: list, name: str):
    return next(p for p in found if p.what.startswith(f"stage {name} "))


def test_the_parts_add_up_to_the_total_and_the_stage_is_named():
    ctx64k = by_stage(problems("cluster.gpu_memory_gb=12"), "ctx64k")
    assert ctx64k.path == "long_context.progressive"
    total = float(re.search(r"needs ~([\d.]+) GiB", ctx64k.what).group(1))
    parts = dict((name, float(v)) for name, v in re.findall(r"(\w+) ([\d.]+)(?= \+|,)", ctx64k.what))
    assert list(parts) == ["weights", "gradients", "optimizer", "activations", "logits", "overhead"]
    assert sum(parts.values()) == pytest.approx(total, abs=0.03)  # each part rounded to 0.01


def levers(fix: str) -> dict[str, float]:
    return {setting: float(gib) for setting, gib in re.findall(r"set ([\w.]+: \w+)[^;]*?\(saves ~([\d.]+) GiB\)", fix)}


def test_only_levers_not_yet_pulled_are_suggested_each_with_its_saving():
    # the recipe already checkpoints under ZeRO-3 with SP 4: neither is offered again
    pulled = levers(by_stage(problems("cluster.gpu_memory_gb=12"), "ctx64k").fix)
    assert set(pulled) == {"parallelism.sequence_parallel: 32", "model.offload_activations: true",
                           "model.loss_chunk_tokens: 1024", "parallelism.offload_optimizer: cpu",
                           "model.tiled_mlp_tokens: 4096", "parallelism.offload_params: cpu"}
    assert pulled["parallelism.offload_optimizer: cpu"] == pytest.approx(2.80, abs=0.01)
    assert list(pulled.values()) == sorted(pulled.values(), reverse=True)
    # without checkpointing, under ZeRO-2: both are offered, with what they save
    plain = levers(by_stage(problems("cluster.gpu_memory_gb=12", "model.gradient_checkpointing=false",
                                     "parallelism.zero_stage=2"), "ctx64k").fix)
    assert plain["model.gradient_checkpointing: true"] > 10 and plain["parallelism.zero_stage: 3"] > 0
    assert "parallelism.offload_params: cpu" not in plain  # needs ZeRO-3 first


def test_when_every_lever_is_pulled_the_fix_says_so():
    found = problems("cluster.gpu_memory_gb=1", "parallelism.sequence_parallel=32", "model.offload_activations=true",
                     "model.loss_chunk_tokens=1024", "parallelism.offload_optimizer=cpu",
                     "parallelism.offload_params=cpu", "model.tiled_mlp_tokens=4096")
    assert by_stage(found, "ctx64k").fix.startswith("no memory lever left to pull saves anything here: use a shorter seq_len")
