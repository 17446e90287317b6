"""The optimizer on a rank: which parameters decay, and the optimizers DeepSpeed does not build itself.

adamw, adam, sgd and lion are DeepSpeed's config optimizers (launcher/deepspeed_config.py writes them);
adafactor (transformers), paged_adamw_8bit (bitsandbytes) and lion on CPU ranks without offload
(bitsandbytes: DeepSpeed's FusedLion is CUDA only) are built here and handed to deepspeed.initialize. Either way the parameters arrive as the groups of `parameter_groups`.
"""

from __future__ import annotations

from typing import Any

import torch

from dist_ft.recipe.config import Optimizer


def decays(name: str, param: torch.nn.Parameter, norm_params: set[int]) -> bool:
    """Weight decay applies to weight matrices, never to biases and norm weights (nor other vectors).
    Under ZeRO-3 a parameter's data is a partition: its shape is `ds_shape`."""
    shape = getattr(param, "ds_shape", param.shape)
    return len(shape) >= 2 and not name.endswith("bias") and id(param) not in norm_params


def parameter_groups(module: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """The trainable parameters as optimizer groups: decayed ones at `weight_decay`, the rest at 0. Without
    decay one group, in the module's order (what DeepSpeed would build from the parameters alone)."""
    trainable = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    if not weight_decay:
        return [{"params": [p for _, p in trainable]}]
    norms = {id(p) for m in module.modules() if "norm" in type(m).__name__.lower()
             for p in m.parameters(recurse=False)}
    decay = [p for n, p in trainable if decays(n, p, norms)]
    keep = [p for n, p in trainable if not decays(n, p, norms)]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": keep, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def client_optimizer(opt: Optimizer, lr: float, groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
    """The optimizers DeepSpeed has no config entry for (the rendered config then names none)."""
    if opt.name == "adafactor":
        from transformers.optimization import Adafactor

        # The stage's lr and schedule drive it: no relative step, no parameter-scale factor, no own warmup.
        return Adafactor(groups, lr=lr, weight_decay=opt.weight_decay, relative_step=False, scale_parameter=False,
                         warmup_init=False)
    if opt.name == "lion":  # CPU ranks without offload (DeepSpeed's FusedLion is CUDA only): bitsandbytes' Lion
        import bitsandbytes as bnb

        return bnb.optim.Lion(groups, lr=lr, betas=tuple(opt.option("betas")), weight_decay=opt.weight_decay)
    if opt.name == "paged_adamw_8bit":
        import bitsandbytes as bnb

        return bnb.optim.PagedAdamW8bit(groups, lr=lr, betas=tuple(opt.option("betas")), eps=opt.option("eps"),
                                        weight_decay=opt.weight_decay)
    raise ValueError(f"DeepSpeed builds {opt.name} from its config; the rendered config names no optimizer: "
                     "re-render the run dir")
