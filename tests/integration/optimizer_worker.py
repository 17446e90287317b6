"""Each optimizer built the way a rank builds it, and stepped by real DeepSpeed (ZeRO-2) on one CPU rank:
the rendered config, the parameter groups, the client optimizer where the config names none, the
schedule as the LambdaLR. Run by test_optimizers under torchrun (one rank, gloo):

    torchrun --nproc_per_node 1 tests/integration/optimizer_worker.py OUT.json NAME...
"""

from __future__ import annotations

import json
import sys

import torch

STEPS = 4


def plan_for(name: str):
    from dist_ft.plan.plan import make_plan
    from dist_ft.recipe.config import apply_overrides, recipe_from_dict
    from dist_ft.recipe.model_shape import shape_from_config
    from tests.conftest import demo_raw
    from tests.integration.training_helpers import TINY_CONFIG

    raw = demo_raw()
    raw["model"]["config"] = dict(TINY_CONFIG)
    raw = apply_overrides(raw, ["cluster.procs_per_node=1", f"finetune.steps={STEPS}", "finetune.lr=1e-2",
                                f"finetune.optimizer={{name: {name}, weight_decay: 0.1}}"])
    recipe = recipe_from_dict(raw)
    return make_plan(recipe, shape_from_config(recipe.model.config, "test"), "/tmp/unused")


def run(name: str) -> dict:
    from transformers import AutoConfig, AutoModelForCausalLM

    from dist_ft.launcher.deepspeed_config import render_ds_config
    from dist_ft.plan.schedule import lr_multiplier
    from dist_ft.rank import engine as ds
    from dist_ft.rank.optimizer import client_optimizer, parameter_groups
    from tests.integration.training_helpers import TINY_CONFIG

    plan = plan_for(name)
    stage = plan.stage("sft")
    cfg = render_ds_config(plan, stage)
    torch.manual_seed(0)
    config = dict(TINY_CONFIG)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(config.pop("model_type"), **config))
    groups = parameter_groups(model, stage.optimizer.weight_decay)
    client = None if "optimizer" in cfg else client_optimizer(stage.optimizer, stage.lr, groups)
    engine = ds.build_engine(model, cfg, lambda s: lr_multiplier(stage.scheduler, s, STEPS), groups, client)
    batch = torch.randint(0, TINY_CONFIG["vocab_size"], (cfg["train_micro_batch_size_per_gpu"], 64),
                          generator=torch.Generator().manual_seed(1))
    losses, lrs = [], []
    for _ in range(STEPS * cfg["gradient_accumulation_steps"]):
        loss = engine(input_ids=batch, labels=batch).loss
        if engine.is_gradient_accumulation_boundary():
            lrs.append(engine.get_lr())
            losses.append(loss.item())
        engine.backward(loss)
        engine.step()
    basic = engine.basic_optimizer
    return {"class": f"{type(basic).__module__}.{type(basic).__name__}", "losses": losses, "lrs": lrs,
            "expected_lrs": [stage.lr * lr_multiplier(stage.scheduler, s, STEPS) for s in range(STEPS)],
            "weight_decays": [g["weight_decay"] for g in basic.param_groups],
            "group_sizes": [len(g["params"]) for g in basic.param_groups]}


def main() -> None:
    from dist_ft.rank import engine as ds
    from dist_ft.rank.distributed import read_env

    out, names = sys.argv[1], sys.argv[2:]
    ds.init_distributed(read_env())
    results = {}
    for name in names:
        try:
            results[name] = run(name)
        except Exception as err:  # noqa: BLE001 - reported per optimizer, the others still run
            results[name] = {"error": f"{type(err).__name__}: {err}"}
    with open(out, "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
