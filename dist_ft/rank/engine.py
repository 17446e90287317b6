"""The one place that imports DeepSpeed: process group, engine, ZeRO-3 gathering, checkpoints."""

from __future__ import annotations

import contextlib
import datetime
import io
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Iterator

import deepspeed
import torch
from deepspeed.runtime.zero.partition_parameters import GatheredParameters

from .distributed import DistEnv
from .loss import unwrapped_state_dict
from .sequence_parallel import SequenceParallel, use_document_attention


def init_distributed(env: DistEnv, timeout_minutes: float = 60.0) -> None:
    """The process group, with the recipe's collective timeout: the other ranks wait in a barrier while
    rank 0 alone converts or exports a checkpoint, which can outlast DeepSpeed's default 10 minutes."""
    if env.device.startswith("cuda"):
        torch.cuda.set_device(env.local_rank)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        deepspeed.init_distributed(dist_backend=env.backend, timeout=datetime.timedelta(minutes=timeout_minutes))
    # DeepSpeed prints "... shm_comm_op built successfully" on every rank of every stage: news only when it fails
    sys.stdout.write("".join(line for line in printed.getvalue().splitlines(keepends=True)
                             if not line.rstrip().endswith("built successfully")))


@contextlib.contextmanager
def model_construction(ds_config: dict[str, Any], zero3: bool) -> Iterator[None]:
    """Under ZeRO-3, build the model already partitioned: from_pretrained and from_config both
    consult transformers' HfDeepSpeedConfig (made from `ds_config`), which must stay alive while the
    model is built."""
    if not zero3:
        yield
        return
    from transformers.integrations import HfDeepSpeedConfig

    keep_alive = HfDeepSpeedConfig(ds_config)
    try:
        yield
    finally:
        del keep_alive


_ulysses: dict[str, Any] = {}


def enable_sequence_parallel(lm: torch.nn.Module, size: int, micro_batch_size: int):
    """Ulysses attention for a transformers model: DeepSpeed replaces the model's attention function
    process-wide with one that trades sequence slices for heads across `size` contiguous ranks,
    and builds those groups. Returns DeepSpeed's parallel state (`mpu`) for `build_engine`.
    Once per process: a second registration would wrap the wrapper."""
    use_document_attention(lm)
    attn = lm.config._attn_implementation
    key = (attn, size, micro_batch_size)
    if _ulysses:
        if _ulysses["key"] != key:
            raise RuntimeError(f"Ulysses is already registered as {_ulysses['key']} in this process; "
                               f"{key} needs a new process")
        return _ulysses["mpu"]
    from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF

    # The Ulysses attention checks a fixed batch size; the sequence length may vary (evaluation rows).
    mpu = UlyssesSPAttentionHF.register_with_transformers(
        model_name_or_path=lm, core_attn_implementation=attn, sequence_parallel_size=size,
        micro_batch_size=micro_batch_size, seq_length_is_variable=True)
    _ulysses.update(key=key, mpu=mpu)
    return mpu


def sequence_parallel_group(mpu, ds_config: dict[str, Any]) -> SequenceParallel:
    """Our side of Ulysses: this rank's place in the group of ranks that share a sequence."""
    zero = ds_config["zero_optimization"]
    if zero["stage"] == 3 and not zero.get("reduce_scatter", True):
        # Without reduce-scatter ZeRO-3 sums small buckets and averages large ones: no one factor.
        raise ValueError("sequence parallelism under ZeRO-3 needs zero_optimization.reduce_scatter: true")
    return SequenceParallel(group=mpu.get_sequence_parallel_group(), rank=mpu.get_sequence_parallel_rank(),
                            size=mpu.get_sequence_parallel_world_size())


def token_mean_gradient_factor(zero_stage: int, data_parallel: int, sequence_parallel: int) -> float:
    """The factor on each rank's share of the loss gradient (loss.TokenMean) that makes DeepSpeed's
    reduction the gradient of the mean over all ranks' tokens. DeepSpeed 0.19 averages gradients over
    the data-parallel ranks and sums the sequence-parallel ranks' under ZeRO-1/2, but ZeRO-3's
    reduce-scatter averages over all ranks. The equality tests (tests/integration/test_sequence_parallel.py,
    test_uneven_ranks.py) pin both for every DeepSpeed upgrade."""
    averaged_over = data_parallel * (sequence_parallel if zero_stage == 3 else 1)
    return float(averaged_over)


def build_engine(model: torch.nn.Module, ds_config: dict[str, Any], lr_lambda: Callable[[int], float],
                 param_groups: list[dict[str, Any]] | None = None, optimizer: torch.optim.Optimizer | None = None,
                 mpu=None):
    """The engine over the parameter groups (rank/optimizer.py; unset: one group of every trainable
    parameter): DeepSpeed builds the config's optimizer, or takes `optimizer` when the config names none;
    `lr_lambda` scales every group's lr per step."""
    if param_groups is None:
        param_groups = [{"params": [p for p in model.parameters() if p.requires_grad]}]
    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=param_groups, optimizer=optimizer, config=ds_config, mpu=mpu,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda))
    return engine


def is_zero3(engine) -> bool:
    return engine.zero_optimization_stage() == 3


@contextlib.contextmanager
def gathered(params: list[torch.nn.Parameter], enabled: bool, modifier_rank: int | None = None) -> Iterator[None]:
    """Whole tensors on every rank for the duration (ZeRO-3 shards them otherwise); `modifier_rank`: the
    rank whose changes are kept (None: read only)."""
    if not enabled:
        yield
        return
    with GatheredParameters(params, modifier_rank=modifier_rank):
        yield


def tiled_mlp_function():
    """DeepSpeed's TiledMLP autograd function (dist_ft.rank.tiled_mlp applies it to decoder MLPs)."""
    from deepspeed.runtime.sequence_parallel.ulysses_sp import TiledMLP

    return TiledMLP


def parameter_residency(engine) -> tuple[int, int]:
    """(elements this rank holds, elements in the model): ZeRO-3 keeps ~1/dp of each parameter."""
    params = list(engine.module.parameters())
    if not is_zero3(engine):
        total = sum(p.numel() for p in params)
        return total, total
    return sum(p.ds_tensor.numel() for p in params), sum(p.ds_numel for p in params)


def full_state_dict(engine, is_main: bool) -> dict[str, torch.Tensor] | None:
    """Consolidated weights on rank 0 (None elsewhere): a CPU copy of a big model on every rank of a node
    would exhaust its host memory."""
    if is_zero3(engine):
        # Every rank takes part in the gather, layer by layer onto rank 0.
        state = engine._zero3_consolidated_16bit_state_dict()
        return None if state is None else unwrapped_state_dict(state)
    if not is_main:  # ZeRO-1/2 keep whole weights on every rank: rank 0 copies its own, no collective
        return None
    return unwrapped_state_dict({k: v.detach().cpu() for k, v in engine.module.state_dict().items()})


def parameters_finite(engine) -> bool:
    """Whether every trainable weight is finite on every rank (each checks what it holds; under ZeRO-3
    its shard). A finite loss and gradient can still step weights to inf."""
    held = [getattr(p, "ds_tensor", p) for p in engine.module.parameters() if p.requires_grad]
    local = all(bool(torch.isfinite(t).all()) for t in held)
    return all_reduce_max(0.0 if local else 1.0) == 0.0


def save_checkpoint(engine, folder: Path, tag: str, client_state: dict[str, Any], frozen_excluded: bool) -> None:
    """DeepSpeed's save; every file this rank writes is on disk when it returns, so the commit that
    follows never marks complete a checkpoint still in the page cache."""
    with _synced_writes(engine.checkpoint_engine):
        engine.save_checkpoint(str(folder), tag=tag, client_state=client_state, save_latest=False,
                               exclude_frozen_parameters=frozen_excluded)


@contextlib.contextmanager
def _synced_writes(writer) -> Iterator[None]:
    """fsync each file DeepSpeed's checkpoint writer saves (by path), for the duration."""
    save = writer.save

    def save_and_sync(state_dict, path, *args, **kwargs):
        result = save(state_dict, path, *args, **kwargs)
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        return result

    writer.save = save_and_sync
    try:
        yield
    finally:
        writer.save = save


def load_checkpoint(engine, folder: Path, tag: str, universal: bool | None = None) -> dict[str, Any]:
    """DeepSpeed's load. `universal`: whether `folder` holds universal conversions, for a load after the
    engine was built (DeepSpeed reads that from the config it was built with; None keeps it)."""
    config, built_with = engine._config, engine._config.load_universal_checkpoint
    if universal is not None:
        config.load_universal_checkpoint = universal
    try:
        _, client_state = engine.load_checkpoint(str(folder), tag=tag, load_module_strict=False,
                                                 load_optimizer_states=True, load_lr_scheduler_states=True)
    finally:
        config.load_universal_checkpoint = built_with
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


def shutdown_distributed() -> None:
    """Destroy the process group before the interpreter exits. Left to exit-time destructors, gloo's worker
    threads can be torn down while still joinable ("terminate called without an active exception", SIGABRT
    after the work is done, seen under ZeRO-3 on gloo); torch asks for this call before exit."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def collective_timeout_s() -> float | None:
    """The world group's collective timeout as torch holds it (None where torch hides it)."""
    try:
        backend = torch.distributed.group.WORLD._get_backend(torch.device(_comm_device()))
        return backend.options._timeout.total_seconds()
    except (AttributeError, RuntimeError):
        return None


def broadcast_from_main(value: Any) -> Any:
    """Rank 0's value (any picklable object) on every rank: one decision where ranks could see files
    differently (a shared filesystem's caches, a file changing between their reads)."""
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


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
