"""Evaluation during fine-tuning for real: 2 CPU ranks, DeepSpeed ZeRO-3 on gloo, LoRA on a tiny model —
samples, task metrics, validation and test files, early stopping that keeps and exports the best checkpoint."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from dist_ft.launcher.summary import pipeline_summary
from tests.conftest import LAUNCH
from tests.integration.training_helpers import (lora_finetune, metric_rows, render, tiny_recipe, train,
                                                 wandb_history)

pytestmark = pytest.mark.integration


def _lines(source: Path, target: Path, count: int) -> str:
    target.write_text("".join(source.read_text().splitlines(keepends=True)[:count]))
    return str(target)


def _checkpoint_adapter(checkpoints: Path, tag: str) -> dict[str, torch.Tensor]:
    """The LoRA weights a DeepSpeed ZeRO-3 checkpoint holds, consolidated from both ranks' fp32 partitions,
    named as peft names them in an adapter file."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    state = get_fp32_state_dict_from_zero_checkpoint(str(checkpoints), tag=tag, exclude_frozen_parameters=True)
    return {k.removeprefix("lm.").replace(".default", ""): v for k, v in state.items() if "lora_" in k}


def test_zero3_finetune_evaluates_samples_and_exports_the_best_checkpoint(tmp_path):
    data = LAUNCH / "data"
    finetune = lora_finetune(steps=10)
    finetune["data"] = {"paths": [str(data / "tiny_instructions.jsonl")], "packing": False,
                        "validation_paths": [_lines(data / "format_task_validation.jsonl", tmp_path / "val.jsonl", 6)],
                        "test_paths": [_lines(data / "format_task_test.jsonl", tmp_path / "test.jsonl", 3)]}
    finetune.update(eval_every=2, metrics=["loss", "perplexity", "exact_match", "rouge_l"], metric_rows=3,
                    samples={"prompts": ["Add the two numbers.\n\n2 3"], "from_validation": 2, "max_new_tokens": 6},
                    # exact match of a tiny random model stays 0: the first evaluation is the best, and the
                    # next two (no better) stop the stage — so the best is not the last
                    early_stopping={"patience": 2, "metric": "eval_exact_match"})
    raw = tiny_recipe(zero=3, finetune=finetune, every=2)
    raw.pop("long_context")
    raw["checkpointing"]["keep_last"] = 1
    run = tmp_path / "run"
    plan = render(raw, run)
    result = train(run, "sft")
    stage = run / "stages/sft"

    evals = [r for r in metric_rows(run, "sft") if "eval_loss" in r]
    assert [r["step"] for r in evals] == [0, 2, 4, 6], "before training, then every 2 steps until patience ran out"
    for row in evals:
        assert {"eval_loss", "eval_perplexity", "eval_exact_match", "eval_rouge_l"} <= set(row)
        assert row["eval_perplexity"] == pytest.approx(2.718281828 ** row["eval_loss"], rel=1e-6)
    assert [r["eval_exact_match"] for r in evals] == [0.0, 0.0, 0.0, 0.0]
    done = json.loads((stage / "DONE").read_text())
    assert done["outcome"] == "early_stopped" and done["step"] == 6
    assert done["best"] == {"step": 2, "metric": "eval_exact_match", "value": 0.0}

    samples = [json.loads(line) for line in (stage / "samples.jsonl").read_text().splitlines()]
    assert sorted({r["step"] for r in samples}) == [0, 2, 4, 6], "before training, then at every evaluation"
    for step in (0, 2, 4, 6):
        rows = [r for r in samples if r["step"] == step]
        assert len(rows) == 3 and set(rows[0]) == {"step", "prompt", "output", "reference"}
        assert rows[0]["reference"] is None and "2 3" in rows[0]["prompt"]
        assert all(isinstance(r["reference"], str) and r["reference"] for r in rows[1:])

    (run_file,) = run.glob("wandb/offline-run-*/run-*.wandb")
    history = wandb_history(run_file)
    tables = [int(row["_step"]) for row in history if row.get("samples/_type") == "table-file"]
    assert tables == [0, 2, 4, 6], "a W&B table of samples at each generation"
    assert [int(row["_step"]) for row in history if "eval_rouge_l" in row] == [0, 2, 4, 6]
    assert [int(row["_step"]) for row in history if "test_rouge_l" in row] == [6]

    test = json.loads((stage / "test_metrics.json").read_text())
    assert test["step"] == 2 and test["rows"] == 3
    assert {"test_loss", "test_perplexity", "test_exact_match", "test_rouge_l"} <= set(test)

    checkpoints = stage / "checkpoints"
    tags = sorted(p.name for p in checkpoints.iterdir() if p.is_dir())
    assert tags == ["step_00000002", "step_00000006"], "keep_last 1 rotated step 4 out, never the best"
    assert (checkpoints / "best").read_text() == "step_00000002"

    from safetensors.torch import load_file

    exported = load_file(stage / "export/adapter/adapter_model.safetensors")
    best, last = _checkpoint_adapter(checkpoints, "step_00000002"), _checkpoint_adapter(checkpoints, "step_00000006")
    assert set(exported) == set(best) and len(best) > 0
    for name, tensor in exported.items():
        assert torch.equal(tensor, best[name]), name
    assert any(not torch.equal(exported[name], last[name]) for name in exported), "the last weights differ"

    summary = pipeline_summary(plan)
    assert "exported the best weights: step 2, eval_exact_match 0.0000" in summary
    assert "samples before (step 0):" in summary and "samples after (step 2):" in summary
    assert "test (weights of step 2):" in summary
    assert "eval (step 0 -> 2): loss " in summary, "the exported weights' evaluation against the model before"
    assert "loaded the best checkpoint" in result.stdout + result.stderr

    # A restart after the early stop (say the export was lost) trains nothing and exports the best again:
    # the checkpoint's loop state remembers both the stop and which step was best.
    shutil.rmtree(stage / "export")
    (stage / "DONE").unlink()
    again = train(run, "sft")
    assert "resumed from" in again.stdout and "early_stopped at step 6/10" in again.stdout
    assert json.loads((stage / "DONE").read_text())["best"]["step"] == 2
    assert [r["step"] for r in metric_rows(run, "sft") if "loss" in r] == list(range(1, 7)), "no step retrained"
    for name, tensor in load_file(stage / "export/adapter/adapter_model.safetensors").items():
        assert torch.equal(tensor, best[name]), name


def test_zero3_prefix_tuning_samples_equal_the_exported_adapters_answers(tmp_path):
    """Prefix tuning decodes with full forwards (no cache); under ZeRO-3 both ranks run all max_new_tokens
    forwards of every answer in lockstep, wherever the answer ends. The samples the two ranks generated
    at the last evaluation are the answers one process gives from the exported adapter."""
    from dist_ft.evaluation.generate import Sampling, generate_ids, load_for_generation
    from dist_ft.rank.data import prompt_ids

    prompts = ["Add the two numbers.\n\n2 3", "Name a colour."]
    finetune = lora_finetune(method="prefix", steps=2)
    finetune["options"] = {"num_virtual_tokens": 4}
    finetune.update(eval_every=2, metrics=["loss"], samples={"prompts": prompts, "max_new_tokens": 8})
    raw = tiny_recipe(zero=3, steps=1, finetune=finetune, every=None)  # one step: the adapter's base export
    run = tmp_path / "run"
    plan = render(raw, run)
    train(run, "ctx")
    train(run, "sft")
    stage_dir = run / "stages/sft"
    samples = [json.loads(line) for line in (stage_dir / "samples.jsonl").read_text().splitlines()]
    last = [row["output"] for row in samples if row["step"] == 2]

    stage = plan.stages[-1]
    model, tokenizer = load_for_generation(str(plan.run.stage(stage.name).model()), None, "fp32")
    stop = (tokenizer.eos_token_id,)
    alone = [generate_ids(model, tokenizer, prompt_ids(p, tokenizer, stage.data_format, stage.template,
                                                        stage.seq_len), Sampling(max_new_tokens=8), stop_ids=stop)
             for p in prompts]
    assert len(last) == len(prompts) and last == alone
