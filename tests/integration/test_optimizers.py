"""The optimizer and scheduler sections for real: DeepSpeed on CPU ranks (gloo).

- Every optimizer a CPU rank can run builds and steps as a rank builds it (one rank, ZeRO-2).
- A whole stage through the trainer on 2 ranks with sgd, weight decay and warmup-stable-decay: the
  lr logged at every step is the plan's schedule exactly, and the loss falls.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dist_ft.plan.schedule import lr_multiplier
from tests.integration import optimizer_worker
from tests.integration.training_helpers import metric_rows, render, run_worker, tiny_recipe, train

pytestmark = pytest.mark.integration

# name -> the optimizer class DeepSpeed steps (paged_adamw_8bit is CUDA only: refused at plan time on CPU)
ON_CPU = {"adamw": "torch.optim.adamw.AdamW", "adam": "torch.optim.adam.Adam", "sgd": "torch.optim.sgd.SGD",
          "adafactor": "transformers.optimization.Adafactor", "lion": "bitsandbytes.optim.lion.Lion"}


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, dict]:
    out = tmp_path_factory.mktemp("optimizers") / "results.json"
    run_worker(Path(optimizer_worker.__file__), [str(out), *ON_CPU], nproc=1, timeout=300,
               what="building and stepping the optimizers hung")
    return json.loads(out.read_text())


@pytest.mark.parametrize("name", ON_CPU)
def test_each_optimizer_builds_and_steps_on_a_cpu_rank(built, name):
    result = built[name]
    assert "error" not in result, result
    assert result["class"] == ON_CPU[name]
    # decay on the weight matrices only: the norms and (tiny Llama's) attention biases in a group at 0
    assert result["weight_decays"] == [0.1, 0.0] and all(result["group_sizes"])
    assert [lrs[0] for lrs in result["lrs"]] == pytest.approx(result["expected_lrs"], rel=1e-12)
    assert all(len(set(lrs)) == 1 for lrs in result["lrs"])  # both groups follow the schedule
    assert result["losses"][-1] < result["losses"][0], result["losses"]


def test_sgd_with_warmup_stable_decay_logs_the_planned_lr_at_every_step_and_learns(tmp_path):
    run = tmp_path / "wsd"
    raw = tiny_recipe(steps=10, every=None)
    stage = raw["long_context"]["stages"][0]
    del stage["warmup_steps"]
    stage.update(lr=0.3, optimizer={"name": "sgd", "momentum": 0.9, "weight_decay": 0.01, "max_grad_norm": 1.0},
                 scheduler={"name": "warmup_stable_decay", "warmup_steps": 2, "decay_ratio": 0.3,
                            "min_lr_ratio": 0.05})
    plan = render(raw, run)
    cfg = json.loads((run / plan.stage("ctx").ds_config).read_text())
    assert cfg["optimizer"]["type"] == "SGD" and cfg["zero_allow_untested_optimizer"] is True
    train(run, "ctx")
    rows = [r for r in metric_rows(run, "ctx") if "loss" in r]
    sched = plan.stage("ctx").scheduler
    expected = [0.3 * lr_multiplier(sched, s, 10) for s in range(10)]
    assert [r["lr"] for r in rows] == pytest.approx(expected, rel=1e-12)
    # warmup from the floor (transformers' WSD ramps from min_lr_ratio), stable, the last 3 steps decay to 0.015
    assert expected[:2] == pytest.approx([0.3 * (0.05 + 0.95 / 2), 0.3]) and expected[2:7] == [0.3] * 5
    assert expected[7] == 0.3 and 0.015 < expected[9] < expected[8] < 0.3
    losses = [r["loss"] for r in rows]
    assert losses[-1] < losses[0] - 0.1, losses


@pytest.mark.gpu
@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs CUDA (GPU-only optimizers)")
@pytest.mark.parametrize("name", ["lion", "paged_adamw_8bit"])
def test_cuda_only_optimizers_train_a_stage_on_one_gpu(name, tmp_path):
    """DeepSpeed's FusedLion (a JIT-compiled CUDA op) and bitsandbytes' paged 8-bit AdamW under ZeRO-2."""
    run = tmp_path / name
    raw = tiny_recipe(steps=4, every=None, ranks=1)
    raw["cluster"].update(gpus_per_node=1, gpu_memory_gb=20)
    raw["model"].update(dtype="bf16")
    raw["long_context"]["stages"][0].update(lr=1e-3, optimizer={"name": name, "weight_decay": 0.1})
    plan = render(raw, run)
    cfg = json.loads((run / plan.stage("ctx").ds_config).read_text())
    assert ("optimizer" in cfg) == (name == "lion")
    train(run, "ctx", nproc=1)
    rows = [r for r in metric_rows(run, "ctx") if "loss" in r]
    assert len(rows) == 4 and rows[-1]["loss"] < rows[0]["loss"]
