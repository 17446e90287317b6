"""The optimizer and scheduler sections: strict validation with the dotted path and a fix, plan-time
refusals of what cannot run where the recipe runs, and the DeepSpeed config rendered for each optimizer."""

from __future__ import annotations

import pytest

from dist_ft.cli import main
from dist_ft.launcher.deepspeed_config import render_ds_config
from dist_ft.plan.plan import Plan
from dist_ft.recipe.config import recipe_from_dict
from dist_ft.recipe.strict import RecipeError
from tests.conftest import LAUNCH, demo_raw
from tests.helpers import plan_of, problems_of

DEMO = str(LAUNCH / "demo.yaml")




REFUSED = {
    "unknown optimizer": (["finetune.optimizer.name=adamww"], "finetune.optimizer.name", "did you mean `adamw`"),
    "negative weight decay": (["finetune.optimizer.weight_decay=-0.1"], "finetune.optimizer.weight_decay",
                              "set it to 0 or more"),
    "betas for sgd": (["finetune.optimizer={name: sgd, betas: [0.9, 0.99]}"], "finetune.optimizer.betas",
                      "use an optimizer that takes it"),
    "eps for lion": (["finetune.optimizer={name: lion, eps: 1e-6}"], "finetune.optimizer.eps", "remove it"),
    "momentum for adamw": (["finetune.optimizer.momentum=0.9"], "finetune.optimizer.momentum", "sgd"),
    "three betas": (["finetune.optimizer.betas=[0.9, 0.95, 0.99]"], "finetune.optimizer.betas", "betas: [0.9, 0.95]"),
    "beta of 1": (["finetune.optimizer.betas=[0.9, 1.0]"], "finetune.optimizer.betas", "betas: [0.9, 0.95]"),
    "negative clipping": (["finetune.optimizer.max_grad_norm=-1"], "finetune.optimizer.max_grad_norm", "0 or more"),
    "unknown schedule": (["finetune.scheduler.name=cosin"], "finetune.scheduler.name", "did you mean `cosine`"),
    "warmup_ratio of 1": (["finetune.scheduler.warmup_ratio=1.0"], "finetune.scheduler.warmup_ratio",
                          "a fraction below 1"),
    "negative warmup_ratio": (["finetune.scheduler.warmup_ratio=-0.1"], "finetune.scheduler.warmup_ratio",
                              "0 or more"),
    "warmup steps and ratio": (["finetune.scheduler={warmup_steps: 2, warmup_ratio: 0.1}"],
                               "finetune.scheduler.warmup_ratio", "keep one of them"),
    "shorthand against the scheduler": (["finetune.scheduler.warmup_steps=3"], "finetune.warmup_steps",
                                        "give the warmup in one place"),
    "shorthand against the ratio": (["finetune.scheduler.warmup_ratio=0.1"], "finetune.warmup_steps",
                                    "give the warmup in one place"),
    "progressive shorthand": (["long_context.progressive.scheduler.warmup_steps=1"],
                              "long_context.progressive.warmup_steps", "give the warmup in one place"),
    "floor shorthand": (["finetune.min_lr_ratio=0.2", "finetune.scheduler.min_lr_ratio=0.1"],
                        "finetune.min_lr_ratio", "in one place"),
    "floor on constant": (["finetune.warmup_steps=null", "finetune.scheduler={name: constant, min_lr_ratio: 0.1}"],
                          "finetune.scheduler.min_lr_ratio", "remove it"),
    "warmup on constant": (["finetune.scheduler.name=constant"], "finetune.warmup_steps", "constant_with_warmup"),
    "decay_ratio on cosine": (["finetune.scheduler.decay_ratio=0.2"], "finetune.scheduler.decay_ratio",
                              "warmup_stable_decay"),
    "power on linear": (["finetune.scheduler={name: linear, power: 2}"], "finetune.scheduler.power", "polynomial"),
    # plan time: where the recipe runs, and the stage's step count
    "8-bit paged AdamW on CPU ranks": (["finetune.optimizer.name=paged_adamw_8bit"], "finetune.optimizer.name",
                                       "cluster.gpus_per_node"),
    "adafactor offloaded": (["finetune.optimizer.name=adafactor", "parallelism.offload_optimizer=cpu"],
                            "finetune.optimizer.name", "offload_optimizer: none"),
    "warmup_ratio leaving no step": (["finetune.steps=10", "finetune.warmup_steps=null",
                                      "finetune.scheduler.warmup_ratio=0.95"],
                                     "finetune.scheduler.warmup_ratio", "fewer than 10 warmup steps"),
    "stable phase below zero": (["long_context.progressive.steps=12", "long_context.progressive.warmup_steps=null",
                                 "long_context.progressive.scheduler={name: warmup_stable_decay, warmup_steps: 8,"
                                 " decay_ratio: 0.5}"], "long_context.progressive.scheduler.decay_ratio",
                                "lower decay_ratio"),
}


@pytest.mark.parametrize("case", REFUSED, ids=list(REFUSED))
def test_bad_values_are_refused_at_plan_time_with_the_dotted_path_and_a_fix(case, capsys):
    overrides, path, fix = REFUSED[case]
    found = problems_of(overrides)
    assert path in found, found
    assert fix in found[path].fix + found[path].what, found[path]
    argv = ["plan", DEMO] + [a for o in overrides for a in ("--set", o)]
    assert main(argv) == 2  # and the CLI says so, writing nothing
    assert f"{path}: " in capsys.readouterr().err


def test_explicit_stages_are_named_by_their_index():
    raw = demo_raw()
    progressive = raw["long_context"].pop("progressive")
    raw["long_context"]["stages"] = [{"name": "a", "seq_len": 512, "steps": 4, "lr": progressive["lr"]},
                                     {"name": "b", "seq_len": 1024, "steps": 4, "optimizer": {"name": "adamz"}}]
    with pytest.raises(RecipeError) as err:
        recipe_from_dict(raw)
    assert [p.path for p in err.value.problems] == ["long_context.stages[1].optimizer.name"]


def test_the_defaults_render_the_config_every_run_had():
    plan = plan_of()
    for stage in plan.stages:
        cfg = render_ds_config(plan, stage)
        assert cfg["optimizer"] == {"type": "AdamW", "params": {"lr": stage.lr, "betas": [0.9, 0.95], "eps": 1e-8,
                                                                "weight_decay": 0.0, "torch_adam": True}}
        assert cfg["gradient_clipping"] == 1.0 and "zero_allow_untested_optimizer" not in cfg
        assert stage.scheduler.name == "cosine" and stage.scheduler.min_lr_ratio == 0.1


GPU = ["cluster.gpus_per_node=8", "cluster.procs_per_node=1", "cluster.gpu_memory_gb=80", "model.dtype=bf16"]
# optimizer section, cluster, expected DeepSpeed optimizer (None: the rank builds it), untested-by-ZeRO flag
RENDERED = {
    "adamw": (dict(name="adamw", weight_decay=0.1), [], {"type": "AdamW", "params": {
        "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.1, "torch_adam": True}}, False),
    "adamw offloaded": (dict(name="adamw"), ["parallelism.offload_optimizer=cpu"], {"type": "AdamW", "params": {
        "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.0}}, False),  # DeepSpeedCPUAdam
    "adam": (dict(name="adam", betas=[0.8, 0.9], eps=1e-6), [], {"type": "Adam", "params": {
        "betas": [0.8, 0.9], "eps": 1e-6, "weight_decay": 0.0, "adam_w_mode": False, "torch_adam": True}}, False),
    "sgd": (dict(name="sgd", momentum=0.5, weight_decay=0.01), [], {"type": "SGD", "params": {
        "momentum": 0.5, "weight_decay": 0.01}}, True),
    "lion on GPUs": (dict(name="lion"), GPU, {"type": "Lion", "params": {"betas": [0.9, 0.99], "weight_decay": 0.0}},
                     False),
    "lion offloaded": (dict(name="lion"), ["parallelism.offload_optimizer=cpu"], {"type": "Lion", "params": {
        "betas": [0.9, 0.99], "weight_decay": 0.0}}, False),  # DeepSpeedCPULion
    "lion on CPU ranks": (dict(name="lion"), [], None, True),  # bitsandbytes' Lion, built on the rank
    "adafactor": (dict(name="adafactor"), [], None, True),
    "paged_adamw_8bit": (dict(name="paged_adamw_8bit"), GPU, None, True),
}


@pytest.mark.parametrize("case", RENDERED, ids=list(RENDERED))
def test_each_optimizer_renders_a_config_deepspeed_accepts(case, monkeypatch):
    from deepspeed.runtime import config as ds_config

    section, cluster, expected, untested = RENDERED[case]
    flat = ", ".join(f"{k}: {v}" for k, v in section.items())
    plan = plan_of([f"finetune.optimizer={{{flat}, max_grad_norm: 0.5}}", *cluster])
    stage = plan.stage("sft")
    cfg = render_ds_config(plan, stage)
    if expected is None:
        assert "optimizer" not in cfg
    else:
        assert cfg["optimizer"] == {**expected, "params": {"lr": stage.lr, **expected["params"]}}
    assert cfg.get("zero_allow_untested_optimizer", False) is untested
    assert cfg["gradient_clipping"] == 0.5
    monkeypatch.setattr(ds_config.dist, "get_rank", lambda: 0)
    parsed = ds_config.DeepSpeedConfig(cfg, mpu=_DataParallel(plan.dp))
    assert parsed.gradient_clipping == 0.5
    assert parsed.optimizer_name == (None if expected is None else
                                     expected["type"].lower() if expected["type"] != "SGD" else "SGD")


class _DataParallel:
    def __init__(self, dp):
        self.dp = dp

    def get_data_parallel_world_size(self):
        return self.dp


def test_the_plan_prints_optimizer_and_schedule(capsys):
    assert main(["plan", DEMO, "--set", "finetune.optimizer={name: sgd, weight_decay: 0.01}", "--set",
                 "finetune.lr=3e-3", "--set", "finetune.steps=10", "--set", "finetune.warmup_steps=null", "--set",
                 "finetune.scheduler={name: warmup_stable_decay, warmup_steps: 2, decay_ratio: 0.3}"]) == 0
    out = capsys.readouterr().out
    sft = out[out.index("] sft"):]
    assert "optimizer sgd (lr 0.003, weight decay 0.01 on weight matrices, momentum 0.9), clip 1" in sft
    assert ("schedule warmup_stable_decay (warmup 2, floor 0.1, decay over the last 30%): lr at 0/25/50/75/100 % "
            "0.00165 0.003 0.003 0.003 0.000975") in sft
    assert "optimizer adamw (lr 0.002, weight decay 0, betas 0.9/0.95, eps 1e-08), clip 1" in out
    assert "schedule cosine (warmup 2, floor 0.1)" in out


def test_plan_json_carries_the_effective_sections_back_to_the_ranks():
    plan = plan_of(["finetune.warmup_steps=null", "finetune.scheduler={name: polynomial, warmup_ratio: 0.2}",
                    "finetune.optimizer={name: lion, betas: [0.95, 0.98]}"])
    back = Plan.from_json(plan.to_json())
    assert back.stage("sft").scheduler == plan.stage("sft").scheduler
    assert back.stage("sft").scheduler.power == 1.0 and back.stage("sft").scheduler.min_lr_ratio == 0.1
    assert back.stage("sft").optimizer.option("betas") == [0.95, 0.98]
    assert back.stage("ctx512").scheduler.warmup_steps == 2  # the demo's stage-level shorthand
