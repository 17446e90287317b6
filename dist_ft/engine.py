"""The one place that imports DeepSpeed: process group, engine, ZeRO-3 gathering, checkpoints."""

from __future__ import annotations

import contextlib
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Iterator

import deepspeed
import torch
from deepspeed.runtime.zero.partition_parameters import GatheredParameters

from .distributed import DistEnv
from .loss import unwrapped_state_dict


def init_distributed(env: DistEnv) -> None:
    if env.device.startswith("cuda"):
        torch.cuda.set_device(env.local_rank)
    deepspeed.init_distributed(dist_backend=env.backend)


@contextlib.contextmanager
def model_construction(ds_config: dict[str, Any]) -> Iterator[None]:
    """Under ZeRO-3, build the model already partitioned: from_pretrained and from_config both
    consult transformers' HfDeepSpeedConfig, which must stay alive while the model is built."""
    if ds_config["zero_optimization"]["stage"] != 3:
        yield
        return
    from transformers.integrations import HfDeepSpeedConfig

    keep_alive = HfDeepSpeedConfig(ds_config)
    try:
        yield
    finally:
        del keep_alive


def build_engine(model: torch.nn.Module, ds_config: dict[str, Any], lr_lambda: Callable[[int], float]):
    params = [p for p in model.parameters() if p.requires_grad]
    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=params, config=ds_config,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda))
    return engine


def is_zero3(engine) -> bool:
    return engine.zero_optimization_stage() == 3


@contextlib.contextmanager
def gathered(params: list[torch.nn.Parameter], enabled: bool) -> Iterator[None]:
    """Whole tensors on every rank for the duration (ZeRO-3 shards them otherwise)."""
    if not enabled:
        yield
        return
    with GatheredParameters(params, modifier_rank=None):
        yield


def parameter_residency(engine) -> tuple[int, int]:
    """(elements this rank holds, elements in the model): ZeRO-3 keeps ~1/dp of each parameter."""
    params = list(engine.module.parameters())
    if not is_zero3(engine):
        total = sum(p.numel() for p in params)
        return total, total
    return sum(p.ds_tensor.numel() for p in params), sum(p.ds_numel for p in params)


def full_state_dict(engine) -> dict[str, torch.Tensor] | None:
    """Consolidated weights (on rank 0 under ZeRO-3; everywhere otherwise)."""
    if is_zero3(engine):
        # Gathers layer by layer onto rank 0 instead of materialising the model on every rank.
        state = engine._zero3_consolidated_16bit_state_dict()
        return None if state is None else unwrapped_state_dict(state)
    return unwrapped_state_dict({k: v.detach().cpu() for k, v in engine.module.state_dict().items()})


def save_checkpoint(engine, folder: Path, tag: str, client_state: dict[str, Any], frozen_excluded: bool) -> None:
    engine.save_checkpoint(str(folder), tag=tag, client_state=client_state, save_latest=False,
                           exclude_frozen_parameters=frozen_excluded)


def load_checkpoint(engine, folder: Path, tag: str) -> dict[str, Any]:
    _, client_state = engine.load_checkpoint(str(folder), tag=tag, load_module_strict=False,
                                             load_optimizer_states=True, load_lr_scheduler_states=True)
    if client_state is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {folder / tag}")
    return client_state


def convert_to_universal(folder: Path, tag: str, out: Path) -> None:
    """DeepSpeed's universal format lets a checkpoint resume at another data-parallel size."""
    subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
                    str(folder / tag), "--output_folder", str(out), "--inject_missing_state"],
                   check=True, capture_output=True, text=True)


def barrier() -> None:
    torch.distributed.barrier()


def all_reduce_max(value: float) -> float:
    tensor = torch.tensor([value], dtype=torch.float64, device=_comm_device())
    torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MAX)
    return float(tensor.item())


def all_reduce_mean(value: float) -> float:
    tensor = torch.tensor([value], dtype=torch.float64, device=_comm_device())
    torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM)
    return float(tensor.item()) / torch.distributed.get_world_size()


def _comm_device() -> str:
    return f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu"
