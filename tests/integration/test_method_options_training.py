"""PEFT options through the real trainer (torchrun, DeepSpeed on gloo, 2 CPU ranks): the export, reloaded
by `dist-ft eval`'s loader, scores the validation rows as the engine did."""

from __future__ import annotations

import pytest

from tests.integration.training_helpers import lora_finetune, metric_rows, render, tiny_recipe, train

pytestmark = [pytest.mark.integration, pytest.mark.slow]  # ~1.5-2 min each on 2 busy cores


def eval_loader_loss(plan, run, stage_name: str) -> float:
    """The export as `dist-ft eval` loads it (adapter over the previous stage's export), on the stage's
    validation rows."""
    import torch

    from dist_ft.evaluation.eval_model import RopeVariant, load_variant, resolve_target
    from dist_ft.rank.data import collate
    from dist_ft.rank.stage_data import load_stage_data
    from dist_ft.rank.stage_model import stage_tokenizer

    stage = plan.stage(stage_name)
    data = load_stage_data(plan, stage, plan.rank_batch(stage, world_size=1, rank=0), stage_tokenizer(plan))
    target = resolve_target(str(plan.run.stage(stage.name).model()), virtual_tokens=True)
    model = load_variant(target, RopeVariant("keep"), torch.float32, keep_peft_model=True)
    with torch.no_grad():
        values = [model(**collate([row]), use_cache=False).loss.item() for row in data.validation]
    return sum(values) / len(values)


@pytest.mark.parametrize("zero, method, options", [
    (2, "lora", {"use_rslora": True, "modules_to_save": ["lm_head"], "layers_to_transform": [1], "bias": "all",
                 "init_lora_weights": "pissa"}),
    (3, "prompt", {"prompt_tuning_init_text": "Answer in one line.", "modules_to_save": ["norm"]}),
], ids=["zero2-lora-options", "zero3-prompt-text"])
def test_options_train_and_export_what_the_engine_evaluated(zero, method, options, tmp_path):
    run = tmp_path / "run"
    recipe = tiny_recipe(zero=zero, steps=1, every=None, finetune=lora_finetune(method, steps=2, **options))
    recipe["model"]["dtype"] = "fp32"
    plan = render(recipe, run)
    assert plan.stage("sft").method_options.modules_to_save == options["modules_to_save"]
    train(run, "ctx")
    train(run, "sft")
    engine_eval = [r["eval_loss"] for r in metric_rows(run, "sft") if "eval_loss" in r][-1]
    assert eval_loader_loss(plan, run, "sft") == pytest.approx(engine_eval, abs=1e-5)
