"""Ulysses sequence parallelism for real: 2 CPU ranks on gloo share each sequence.

The sharded loss and DeepSpeed's reduced gradients equal transformers' own unsharded loss and
gradients on packed documents, under ZeRO-2 and ZeRO-3 (whose gradient reductions differ), with sdpa
(sdpa_varlen underneath) and sdpa_varlen, and with every memory lever on (checkpoints offloaded,
DeepSpeed's TiledMLP); a stage with `parallelism.sequence_parallel: 2` trains,
evaluates and exports."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.integration import sp_worker
from tests.integration.training_helpers import free_port, losses, metric_rows, rank_env, render, tiny_recipe, train

pytestmark = pytest.mark.integration

ZERO_STAGES = (2, 3)


@pytest.fixture(scope="module", params=["sdpa", "sdpa_varlen", "sdpa_varlen" + sp_worker.LEVERS])
def sharded(request, tmp_path_factory) -> dict[int, dict]:
    """One torchrun per attention (Ulysses wraps one attention function per process)."""
    attn, out = request.param, tmp_path_factory.mktemp(f"sp_{request.param}")
    argv = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
            f"--master_port={free_port()}", str(Path(sp_worker.__file__)), str(out), attn, *map(str, ZERO_STAGES)]
    result = subprocess.run(argv, env=rank_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return {zero: torch.load(out / f"{attn}.zero{zero}.pt") for zero in ZERO_STAGES}


@pytest.fixture(scope="module")
def unsharded() -> dict:
    """One process, no DeepSpeed, transformers' own loss (ForCausalLMLoss) on the whole batch."""
    model = sp_worker.tiny_model()
    loss = model(**sp_worker.fixed_batch(), use_cache=False).loss
    loss.backward()
    return {"loss": loss.item(), "grads": {name: p.grad for name, p in model.named_parameters()}}


@pytest.mark.parametrize("zero", ZERO_STAGES)
def test_sharded_loss_and_gradients_equal_the_unsharded_ones(zero, sharded, unsharded):
    got, want = sharded[zero], unsharded
    assert got["loss"] == pytest.approx(want["loss"], abs=1e-6)
    assert got["eval_loss"] == pytest.approx(want["loss"], abs=1e-6)
    assert got["grads"].keys() == want["grads"].keys()
    error = sum(((got["grads"][k] - g) ** 2).sum() for k, g in want["grads"].items()) ** 0.5
    norm = sum((g ** 2).sum() for g in want["grads"].values()) ** 0.5
    assert error / norm < 1e-5, f"gradient relative error {error / norm:.2e}"


def test_packed_documents_stay_apart(unsharded):
    """The reference isolates documents (else the equality above would prove less)."""
    crossing = sp_worker.tiny_model()
    batch = sp_worker.fixed_batch()
    batch["position_ids"] = torch.arange(sp_worker.SEQ_LEN).repeat(sp_worker.MICRO_BATCH, 1)
    assert abs(crossing(**batch, use_cache=False).loss.item() - unsharded["loss"]) > 1e-3


def test_a_sequence_parallel_stage_trains_evaluates_and_exports(tmp_path):
    run = tmp_path / "sp"
    raw = tiny_recipe(zero=3, steps=4, every=None)
    raw["parallelism"]["sequence_parallel"] = 2
    raw["long_context"]["data"]["validation_fraction"] = 0.1
    plan = render(raw, run)
    stage = plan.stage("ctx")
    assert (plan.dp, plan.sp, stage.micro_batch_size) == (1, 2, 4)
    train(run, "ctx")
    series = losses(run, "ctx")
    assert len(series) == 4 and series[-1] < series[0] - 0.1, series
    rows = metric_rows(run, "ctx")
    # one data-parallel rank: the tokens of one batch per step, not one per rank
    assert [r["tokens_seen"] for r in rows if "loss" in r] == [stage.tokens_per_step * (i + 1) for i in range(4)]
    engine_eval = [r["eval_loss"] for r in rows if "eval_loss" in r][-1]
    assert reloaded_eval_loss(plan, run) == pytest.approx(engine_eval, abs=1e-5)


def reloaded_eval_loss(plan, run: Path) -> float:
    """Plain transformers, no DeepSpeed: the export scores the validation rows rank 0 scored."""
    from transformers import AutoModelForCausalLM

    from dist_ft.rank.data import collate
    from dist_ft.rank.stage_data import load_stage_data
    from dist_ft.rank.stage_model import stage_tokenizer

    stage = plan.stage("ctx")
    data = load_stage_data(plan, stage, plan.rank_batch(stage, world_size=2, rank=0), stage_tokenizer(plan))
    model = AutoModelForCausalLM.from_pretrained(plan.run.stage(stage.name).model()).eval()
    with torch.no_grad():
        values = [model(**collate([row]), use_cache=False).loss.item() for row in data.validation]
    return sum(values) / len(values)
