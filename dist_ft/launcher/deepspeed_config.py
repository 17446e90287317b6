"""Render a stage's DeepSpeed config from a ZeRO preset and the plan. Pure apart from reading the preset."""

from __future__ import annotations

import copy
import json
from typing import Any

from dist_ft.plan import batching
from dist_ft.plan.plan import Plan, StagePlan
from dist_ft.recipe.config import Parallelism
from .assets import asset


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
        gradient_clipping=stage.optimizer.max_grad_norm,
    )
    optimizer = deepspeed_optimizer(stage, par, plan.device == "cuda")
    if optimizer is not None:
        cfg["optimizer"] = optimizer
    if optimizer is None or optimizer["type"] not in ZERO_TESTED:
        cfg["zero_allow_untested_optimizer"] = True  # DeepSpeed's list of ZeRO optimizers lacks these
    cfg.update(_precision(plan.model.dtype))
    _fill_zero(cfg["zero_optimization"], plan)
    if par.sequence_parallel > 1:
        cfg["sequence_parallel_size"] = par.sequence_parallel
    return cfg


# The optimizers DeepSpeed builds from its config, by our name; the others (adafactor, paged_adamw_8bit, and
# lion on CPU ranks without offload) are built on each rank (rank/optimizer.py) and the config names none.
DEEPSPEED_TYPES = {"adamw": "AdamW", "adam": "Adam", "sgd": "SGD", "lion": "Lion"}
ZERO_TESTED = ("AdamW", "Adam", "Lion")


def deepspeed_optimizer(stage: StagePlan, par: Parallelism, on_gpu: bool) -> dict[str, Any] | None:
    """The config's `optimizer` section, or None when the rank hands DeepSpeed the optimizer."""
    opt = stage.optimizer
    if opt.name not in DEEPSPEED_TYPES or (opt.name == "lion" and not on_gpu and par.offload_optimizer == "none"):
        return None  # DeepSpeed's FusedLion is CUDA only: CPU ranks without offload take bitsandbytes' Lion
    params: dict[str, Any] = {"lr": stage.lr}
    if opt.name in ("adamw", "adam"):
        params.update(betas=list(opt.option("betas")), eps=opt.option("eps"), weight_decay=opt.weight_decay)
        if opt.name == "adam":
            params["adam_w_mode"] = False  # DeepSpeed's "Adam" is AdamW unless told: L2 decay, as torch's Adam
        if par.offload_optimizer == "none":
            params["torch_adam"] = True  # torch's AdamW/Adam: DeepSpeed's FusedAdam would compile for minutes
    elif opt.name == "lion":  # FusedLion on GPUs, DeepSpeedCPULion with offload
        params.update(betas=list(opt.option("betas")), weight_decay=opt.weight_decay)
    else:  # torch.optim.SGD, which DeepSpeed looks up by the type's name
        params.update(momentum=opt.option("momentum"), weight_decay=opt.weight_decay)
    return {"type": DEEPSPEED_TYPES[opt.name], "params": params}


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
