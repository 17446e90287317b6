"""The real trainer on the real local SLURM cluster: two nodes, chained stages, requeue mid-stage.

Needs `slurm/local_cluster/up.sh` (CI starts it); skipped with the reason otherwise.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest
import yaml

import slurm_helpers as sh
from dist_ft.cli import main
from tests.conftest import ROOT
from tests.integration.training_helpers import (free_port, latest_step, lora_finetune, losses, render,
                                                tiny_recipe, train)

pytestmark = [pytest.mark.slurm, pytest.mark.integration]


@pytest.fixture(autouse=True)
def cluster():
    reason = sh.cluster_skip_reason()
    if reason:
        pytest.skip(reason)


def slurm_recipe(**kwargs) -> dict:
    raw = tiny_recipe(ranks=1, **kwargs)
    raw["cluster"].update(
        nodes=2, rdzv_port=free_port(), requeue=True, max_restarts=3,
        setup=[f"export PATH={Path(sys.executable).parent}:$PATH", f"cd {ROOT}"],
        env={"OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"})
    return raw


def submit(raw: dict, run: Path) -> dict[str, int]:
    recipe = run.parent / f"{run.name}.yaml"
    recipe.write_text(yaml.safe_dump(raw))
    assert main(["launch", str(recipe), "--backend", "slurm", "--out", str(run)]) == 0
    return {stage: int(job) for stage, job in json.loads((run / "jobs.json").read_text()).items()}


def test_two_nodes_run_chained_stages_and_the_second_uses_the_firsts_weights(tmp_path):
    run = tmp_path / "chain"
    jobs = submit(slurm_recipe(steps=3, every=None, finetune=lora_finetune(steps=2)), run)
    assert sh.wait_for_job(jobs["sft"], timeout=300) == "COMPLETED", _logs(run)
    assert sh.job_state(jobs["ctx"]) == "COMPLETED"
    assert (run / "stages/ctx/DONE").exists() and (run / "stages/sft/DONE").exists()
    ranks = [json.loads(p.read_text()) for p in sorted((run / "stages/ctx/ranks").glob("rank*.json"))]
    assert [r["world_size"] for r in ranks] == [2, 2]
    adapter = json.loads((run / "stages/sft/export/adapter/adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str(run / "stages/ctx/export")
    first, second = sh.show_job(jobs["ctx"]), sh.show_job(jobs["sft"])
    if first and second:  # still known to slurmctld (MinJobAge): the dependant started after the first ended
        assert second["StartTime"] >= first["EndTime"]


def test_requeue_mid_stage_resumes_to_the_same_losses_as_an_uninterrupted_run(tmp_path):
    steps = 60  # the requeue lands after the step-10 checkpoint, 50 steps before the end (120 once: 40 s more)
    run = tmp_path / "requeued"
    raw = slurm_recipe(steps=steps, every=10)
    job = submit(raw, run)["ctx"]
    deadline = time.monotonic() + 180
    while latest_step(run, "ctx") < 10:
        assert time.monotonic() < deadline, _logs(run)
        assert sh.job_state(job) in ("PENDING", "RUNNING", "CONFIGURING"), _logs(run)
        time.sleep(0.2)
    sh.run_slurm(["scontrol", "requeue", str(job)])
    assert sh.wait_for_job(job, timeout=300) == "COMPLETED", _logs(run)
    assert (sh.job_restarts(job) or 0) >= 1
    assert len(list((run / "logs").glob("ctx.*.attempt*.log"))) >= 2
    rows = [json.loads(line) for line in (run / "stages/ctx/metrics.jsonl").read_text().splitlines()]
    assert max(r["restart"] for r in rows) >= 1

    whole = tmp_path / "whole"
    local = dict(raw, cluster=dict(raw["cluster"], nodes=1, procs_per_node=2))
    render(local, whole)
    train(whole, "ctx")
    assert len(losses(run, "ctx")) == steps
    assert losses(run, "ctx") == pytest.approx(losses(whole, "ctx"), abs=1e-6)


def _logs(run: Path) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text()[-2500:]}" for p in sorted((run / "logs").glob("*")))
