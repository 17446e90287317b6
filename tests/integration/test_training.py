"""The trainer for real: torchrun, DeepSpeed ZeRO on gloo, 2 CPU ranks, tiny Llama-shaped models."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dist_ft.cli import main

from dist_ft.cli import main
from tests.integration.training_helpers import (
    free_port, kill_when, latest_step, lora_finetune, losses, metric_rows, rank_env, render, start, tiny_recipe,
    torchrun_argv, train, wandb_history)

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("zero,dtype", [(2, "fp32"), (3, "bf16")])
def test_zero_trains_two_ranks_shards_for_real_and_exports_with_rope(zero, dtype, tmp_path):
    run = tmp_path / f"zero{zero}"
    raw = tiny_recipe(zero=zero, steps=6)
    raw["model"]["dtype"] = dtype
    plan = render(raw, run)
    train(run, "ctx")
    series = losses(run, "ctx")
    assert len(series) == 6 and series[-1] < series[0] - 0.1, series
    ranks = [json.loads((run / "stages/ctx/ranks" / f"rank{r}.json").read_text()) for r in (0, 1)]
    for info in ranks:
        assert info["zero_stage"] == zero and info["world_size"] == 2
        assert info["collective_timeout_s"] == 60 * 60  # the recipe's default reached the process group
        if zero == 3:  # each rank holds about half of every parameter
            assert info["param_elements_held"] <= info["param_elements_total"] / 2 + 1024
        else:
            assert info["param_elements_held"] == info["param_elements_total"]
    from transformers import AutoModelForCausalLM

    exported = AutoModelForCausalLM.from_pretrained(run / "stages/ctx/export")
    assert exported.config.rope_parameters["rope_type"] == "yarn"
    assert exported.config.rope_parameters["factor"] == plan.stage("ctx").rope_parameters["factor"] == 2.0
    assert (run / "stages/ctx/DONE").exists() and (run / "stages/ctx/loss.png").stat().st_size > 1000


def test_wandb_offline_file_holds_the_logged_metrics(tmp_path):
    run = tmp_path / "wb"
    render(tiny_recipe(steps=3, every=None), run)
    train(run, "ctx")
    (run_file,) = run.glob("wandb/offline-run-*/run-*.wandb")
    history = [row for row in wandb_history(run_file) if "loss" in row]
    expected = metric_rows(run, "ctx")
    assert [round(r["loss"], 6) for r in history] == [round(r["loss"], 6) for r in expected if "loss" in r]
    assert {"lr", "grad_norm", "tokens_per_s", "step_time_s", "seq_len", "restart"} <= set(history[0])
    wandb_cli = str(Path(sys.executable).parent / "wandb")
    sync = subprocess.run([wandb_cli, "sync", "--dry-run", str(run_file.parent)], capture_output=True, text=True,
                          env=rank_env())
    assert sync.returncode == 0


def test_crash_after_a_checkpoint_resumes_with_the_same_losses(tmp_path):
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    render(tiny_recipe(steps=12, every=2), whole)
    train(whole, "ctx")
    render(tiny_recipe(steps=12, every=2), broken)
    proc = start(broken, "ctx")
    kill_when(proc, lambda: latest_step(broken, "ctx") >= 2)
    assert not (broken / "stages/ctx/DONE").exists()
    checkpoints = broken / "stages/ctx/checkpoints"
    good = (checkpoints / "latest").read_text()
    damaged = checkpoints / "step_00000011"  # the newest tag, its dist_ft.json damaged (a full disk)
    shutil.copytree(checkpoints / good, damaged)
    (damaged / "dist_ft.json").write_text('{"step": 11, "dp"')
    (checkpoints / "latest").write_text(damaged.name)
    result = train(broken, "ctx")
    assert f"resumed from {checkpoints / good} " in result.stdout
    assert losses(broken, "ctx") == pytest.approx(losses(whole, "ctx"), abs=1e-6)
    tags = sorted(p.name for p in checkpoints.iterdir() if p.is_dir())
    assert tags == ["step_00000010", "step_00000012"], "partial and damaged tags are pruned"


def test_resume_on_another_world_size_through_the_universal_checkpoint(tmp_path):
    whole, moved = tmp_path / "whole", tmp_path / "moved"
    render(tiny_recipe(steps=10, every=2), whole)
    train(whole, "ctx")
    render(tiny_recipe(steps=10, every=2), moved)
    kill_when(start(moved, "ctx"), lambda: latest_step(moved, "ctx") >= 2)
    tag = (moved / "stages/ctx/checkpoints/latest").read_text()
    half_done = moved / "stages/ctx/universal" / tag  # a conversion killed midway, with no marker
    half_done.mkdir(parents=True)
    (half_done / "mp_rank_00_model_states.pt").write_bytes(b"cut short")
    result = train(moved, "ctx", nproc=1)
    assert "universal" in result.stdout and "resumed from" in result.stdout
    assert (moved / "stages/ctx/universal" / f"{tag}.converted").is_file()
    assert losses(moved, "ctx") == pytest.approx(losses(whole, "ctx"), abs=1e-5)
    info = json.loads((moved / "stages/ctx/ranks/rank0.json").read_text())
    assert info["world_size"] == 1
    stores = [p.name for p in (tmp_path / "token_store").iterdir() if p.is_dir()]
    assert len(stores) == 1 and stores[0].startswith("documents-"), "both runs and both world sizes read one store"


def test_two_nodes_on_loopback(tmp_path):
    """Each "node" runs the rendered nodes.sh with the variables another orchestrator would set."""
    run = tmp_path / "nodes"
    raw = tiny_recipe(steps=3, every=None, ranks=1)
    raw["cluster"]["nodes"] = 2
    render(raw, run)
    port = free_port()
    procs = [subprocess.Popen(["bash", str(run / "nodes.sh")], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              env={**rank_env(), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                                   "NNODES": "2", "NODE_RANK": str(r)}) for r in (0, 1)]
    outputs = [p.communicate(timeout=240)[0].decode() for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs[0][-3000:]
    assert len(losses(run, "ctx")) == 3
    infos = [json.loads((run / "stages/ctx/ranks" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [i["world_size"] for i in infos] == [2, 2]


def test_stop_request_checkpoints_then_the_rerun_finishes(tmp_path):
    run = tmp_path / "stop"
    render(tiny_recipe(steps=8, every=None), run)
    proc = start(run, "ctx")
    stop_file = run / "control" / "ctx.stop"
    import time

    deadline = time.monotonic() + 180
    while not (run / "stages/ctx/metrics.jsonl").exists():
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.05)
    stop_file.touch()
    assert proc.wait(timeout=180) == 0
    stopped_at = latest_step(run, "ctx")
    assert 1 <= stopped_at < 8 and not (run / "stages/ctx/DONE").exists()
    stop_file.unlink()
    train(run, "ctx")
    assert (run / "stages/ctx/DONE").exists() and len(losses(run, "ctx")) == 8


def test_lora_under_zero3_exports_an_adapter_whose_reload_has_the_engines_eval_loss(tmp_path):
    run = tmp_path / "lora3"
    plan = render(tiny_recipe(zero=3, steps=1, every=None, finetune={**lora_finetune(), "merge_adapter": True}), run)
    train(run, "ctx")
    train(run, "sft")
    engine_eval = [r["eval_loss"] for r in metric_rows(run, "sft") if "eval_loss" in r][-1]
    assert reloaded_eval_loss(plan, run, "sft") == pytest.approx(engine_eval, abs=1e-5)
    merged = run / "stages/sft/export/merged"
    assert not (merged / "adapter_config.json").exists()
    assert reloaded_eval_loss(plan, run, "sft", path=merged) == pytest.approx(engine_eval, abs=1e-5)


def reloaded_eval_loss(plan, run, stage_name: str, path=None) -> float:
    """Plain transformers/peft, no DeepSpeed: load the export and score the same validation rows."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from dist_ft.rank.data import collate
    from dist_ft.rank.stage_data import load_stage_data
    from dist_ft.rank.stage_model import stage_tokenizer

    stage = plan.stage(stage_name)
    data = load_stage_data(plan, stage, plan.rank_batch(stage, world_size=1, rank=0), stage_tokenizer(plan))
    path = path or plan.run.stage(stage.name).model()
    if (path / "adapter_config.json").exists():
        base = AutoModelForCausalLM.from_pretrained(run / "stages" / stage.init_from / "export")
        model = PeftModel.from_pretrained(base, path)
    else:
        model = AutoModelForCausalLM.from_pretrained(path)
    model.eval()
    with torch.no_grad():
        values = [model(**collate([row]), use_cache=False).loss.item() for row in data.validation]
    return sum(values) / len(values)


METHODS = ["full", "lora", "dora", "prefix", "prompt", "ptuning", "ia3", "bitfit", "freeze", "longlora"]


@pytest.fixture(scope="module")
def pretrained_stage(tmp_path_factory):
    """One continued-pretraining stage every method fine-tunes from."""
    run = tmp_path_factory.mktemp("base") / "run"
    render(tiny_recipe(steps=1, every=None, finetune=lora_finetune()), run)
    train(run, "ctx")
    return run


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_every_method_trains_and_its_export_reloads_with_the_same_eval_loss(method, pretrained_stage, tmp_path):
    run = tmp_path / method
    plan = render(tiny_recipe(steps=1, every=None, finetune=lora_finetune(method, steps=2)), run)
    shutil.copytree(pretrained_stage / "stages" / "ctx", run / "stages" / "ctx")
    train(run, "sft")
    rows = [r for r in metric_rows(run, "sft") if "loss" in r]
    assert len(rows) == 2 and all(math.isfinite(r["loss"]) for r in rows)
    engine_eval = [r["eval_loss"] for r in metric_rows(run, "sft") if "eval_loss" in r][-1]
    assert reloaded_eval_loss(plan, run, "sft") == pytest.approx(engine_eval, abs=1e-5)
    if method == "lora":  # merged after training, without merge_adapter in the recipe
        merged = tmp_path / "merged"
        assert main(["export", str(run), "--merge", "--out", str(merged)]) == 0
        config = json.loads((merged / "config.json").read_text())
        trained_with = json.loads((run / "stages/ctx/export/config.json").read_text())["rope_parameters"]
        assert config["rope_parameters"] == trained_with and trained_with["rope_type"] == "yarn"
        assert not (merged / "adapter_config.json").exists()
        assert reloaded_eval_loss(plan, run, "sft", path=merged) == pytest.approx(engine_eval, abs=1e-5)
    if method == "prompt":
        with pytest.raises(SystemExit, match="LoRA family"):
            main(["export", str(run), "--merge"])


def test_nonfinite_losses_stop_the_stage_with_the_last_good_checkpoint_intact(tmp_path):
    run = tmp_path / "nan"
    raw = tiny_recipe(steps=12, every=1)
    raw["long_context"]["stages"][0].update(warmup_steps=0)
    render(raw, run)
    # An lr the planner refuses (it bounds lr), put straight into the rendered DeepSpeed config: the
    # weights overflow to inf within steps.
    ds_config = run / "ds_config.ctx.json"
    cfg = json.loads(ds_config.read_text())
    cfg["optimizer"]["params"]["lr"] = 1e20
    ds_config.write_text(json.dumps(cfg))
    result = subprocess.run(torchrun_argv(run, "ctx", 2, free_port()), env=rank_env(), capture_output=True,
                            text=True, timeout=240)
    assert result.returncode != 0
    assert "NaN/inf loss" in result.stdout + result.stderr
    rows = [r for r in metric_rows(run, "ctx") if "loss" in r]
    assert rows[-1]["nonfinite_steps"] >= 5 and not math.isfinite(rows[-1]["loss"])
    good = [r["step"] for r in rows if math.isfinite(r["loss"])]
    assert latest_step(run, "ctx") == max(good), "the latest checkpoint must be the last good one"
    assert not (run / "stages/ctx/DONE").exists()


def test_data_with_nothing_usable_fails_before_training_with_the_counts(tmp_path, capsys):
    """Found by `dist-ft prepare` (which `launch` runs first), before any rank starts."""
    run = tmp_path / "bad"
    data = tmp_path / "bad.jsonl"
    data.write_text('{"title": "no text field"}\n{"text": ""}\nnot json at all\n')
    raw = tiny_recipe(steps=2)
    raw["long_context"]["data"] = {"paths": [str(data)]}
    raw["checkpointing"]["output_root"] = str(tmp_path)
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(yaml.safe_dump(raw))
    assert main(["launch", str(recipe), "--out", str(run)]) == 2
    output = capsys.readouterr().err
    assert "no usable documents" in output and "missing_field" in output and "bad_json" in output, output[-3000:]
    assert not (run / "stages/ctx/checkpoints").exists() and not (run / "logs" / "ctx.log").exists()


def test_evaluation_after_each_stage_writes_what_the_stage_bought(tmp_path):
    run = tmp_path / "evaluated"
    raw = tiny_recipe(zero=2, steps=2, every=None, ranks=1)
    raw["evaluation"] = {"after_each_stage": True, "lengths": [128, 256], "passkey_lengths": [512],
                         "depths": [0.0, 1.0], "trials": 1}
    render(raw, run)
    train(run, "ctx", nproc=1)
    out = run / "eval" / "ctx"
    results = json.loads((out / "results.json").read_text())
    variant = results["variants"]["keep"]
    assert variant["rope_parameters"]["rope_type"] == "yarn"  # the stage's export, RoPE as trained
    assert results["model"] == f"{raw['name']}/ctx" and set(variant["perplexity"]) == {"128", "256"}
    assert all(math.isfinite(row["ppl"]) for row in variant["perplexity"].values())
    assert set(variant["passkey"]["512"]) == {"0.0", "1.0"}
    assert (out / "ppl_vs_length.png").stat().st_size > 0 and (out / "passkey.png").stat().st_size > 0
