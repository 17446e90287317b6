"""Render a stage's DeepSpeed config from a ZeRO preset and the plan. Pure apart from reading the preset."""

from __future__ import annotations

import copy
import json
from typing import Any

from dist_ft.plan import batching
from dist_ft.plan.plan import Plan, StagePlan
from dist_ft.recipe.config import Parallelism
from .assets import asset

ADAM_BETAS = (0.9, 0.95)


def preset_name(par: Parallelism) -> str:
    offload = par.offload_optimizer != "none" or par.offload_params != "none"
    return f"zero{par.zero_stage}{'_offload' if offload else ''}.json"


def load_preset(name: str) -> dict[str, Any]:
    return json.loads(asset("ds_configs", name).read_text())


def render_ds_config(plan: Plan, stage: StagePlan, preset: dict[str, Any] | None = None) -> dict[str, Any]:
    par = plan.parallelism
    cfg = copy.deepcopy(preset if preset is not None else load_preset(preset_name(par)))
    cfg.update(
        train_batch_size=batching.train_batch_size(stage.micro_batch_size, stage.grad_accum, plan.dp),
        train_micro_batch_size_per_gpu=stage.micro_batch_size,
        gradient_accumulation_steps=stage.grad_accum,
        optimizer=_optimizer(stage, par),
    )
    cfg.update(_precision(plan.model.dtype))
    _fill_zero(cfg["zero_optimization"], plan)
    if par.sequence_parallel > 1:
        cfg["sequence_parallel_size"] = par.sequence_parallel
    return cfg


def _optimizer(stage: StagePlan, par: Parallelism) -> dict[str, Any]:
    params: dict[str, Any] = {"lr": stage.lr, "betas": list(ADAM_BETAS), "eps": 1e-8, "weight_decay": 0.0}
    if par.offload_optimizer == "none":
        params["torch_adam"] = True  # DeepSpeed's FusedAdam would compile for minutes
    return {"type": "AdamW", "params": params}


def _precision(dtype: str) -> dict[str, Any]:
    if dtype == "bf16":
        return {"bf16": {"enabled": True}}
    if dtype == "fp16":
        return {"fp16": {"enabled": True, "loss_scale": 0, "initial_scale_power": 16,
                         "loss_scale_window": 1000, "hysteresis": 2, "min_loss_scale": 1}}
    return {}


def _fill_zero(zero: dict[str, Any], plan: Plan) -> None:
    par = plan.parallelism
    hidden = plan.model_shape.hidden_size if plan.model_shape else 1024
    zero["reduce_bucket_size"] = hidden * hidden
    if par.zero_stage == 3:
        zero["stage3_prefetch_bucket_size"] = int(0.9 * hidden * hidden)
        zero["stage3_param_persistence_threshold"] = 10 * hidden
    nvme = par.nvme_path
    for key, device in (("offload_optimizer", par.offload_optimizer), ("offload_param", par.offload_params)):
        if device == "none":
            zero.pop(key, None)
            continue
        zero[key] = {"device": device, "pin_memory": True, **({"nvme_path": nvme} if device == "nvme" else {})}


def find_auto(value: Any, path: str = "") -> list[str]:
    """Paths of every "auto" left in a config (there must be none)."""
    if isinstance(value, dict):
        return [p for k, v in value.items() for p in find_auto(v, f"{path}.{k}" if path else k)]
    if isinstance(value, list):
        return [p for i, v in enumerate(value) for p in find_auto(v, f"{path}[{i}]")]
    return [path] if value == "auto" else []
