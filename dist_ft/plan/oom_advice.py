"""A stage whose memory estimate does not fit: the budget a rank has, the error that names the stage and
every part of the estimate, and the levers the recipe has not pulled yet, each with the saving the same
estimate gives for it. Pure: the machine's memory comes in as a number (preflight reads it)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

from dist_ft.recipe.config import VIRTUAL_TOKEN_METHODS, Recipe
from dist_ft.recipe.model_shape import INLINE_MLP_TYPES, ModelShape
from dist_ft.recipe.strict import Problem

from .memory import MemoryEstimate
from .sp_checks import check_sequence_parallel

TIGHT_FRACTION = 0.85
LOSS_CHUNK = 1024  # the chunk suggested when the logits are the big part: 1k rows keep the head's matmul efficient
MLP_TILE = 4096
MIN_SAVING_GIB = 0.01  # a lever that saves less is not worth a line

# (recipe with one more lever pulled, micro-batch) → the estimate the plan would make for it
Estimator = Callable[[Recipe, int], "MemoryEstimate | None"]


@dataclass(frozen=True)
class Budget:
    gib: float  # per rank; inf: nothing known to check against
    what: str  # where the number comes from, said in the error
    more: str  # the last resort: declaring more memory, where there is more

    @property
    def known(self) -> bool:
        return self.gib != float("inf")


def rank_budget(recipe: Recipe, host_memory_gib: float | None) -> Budget:
    """A GPU rank has its GPU; CPU ranks share their node's memory (declared, or this machine's)."""
    c = recipe.cluster
    if c.gpus_per_node:
        return Budget(c.gpu_memory_gb, f"the {c.gpu_memory_gb:g} GiB per GPU declared",
                      "or raise cluster.gpu_memory_gb if the GPUs have more")
    declared = c.cpu_memory_gb is not None
    node = c.cpu_memory_gb if declared else host_memory_gib
    if node is None:
        return Budget(float("inf"), "", "")
    source = "declared in cluster.cpu_memory_gb" if declared else "of this machine"
    more = "or raise cluster.cpu_memory_gb if the nodes have more" if declared else \
        "or set cluster.cpu_memory_gb to the compute nodes' memory if it is more than this machine's"
    return Budget(node / c.ranks_per_node, f"the {node / c.ranks_per_node:.1f} GiB each of {c.ranks_per_node} "
                  f"CPU rank(s) per node gets ({node:.1f} GiB {source})", more)


@dataclass(frozen=True)
class Stage:
    """What the error says about the stage it is for."""
    name: str
    section: str  # the recipe section it comes from, e.g. long_context.progressive
    seq_len: int
    method: str
    micro: int
    micro_field: str
    micro_asked: bool  # the recipe set the micro-batch (else the plan chose the smallest that fits)


def check_fit(recipe: Recipe, shape: ModelShape | None, stage: Stage, mem: MemoryEstimate | None, budget: Budget,
              estimate_for: Estimator, problems: list[Problem], warnings: list[str]) -> None:
    if mem is None or not budget.known:
        return
    if mem.total_gib > budget.gib:
        problems.append(out_of_memory(recipe, shape, stage, mem, budget, estimate_for))
    elif mem.total_gib > TIGHT_FRACTION * budget.gib:
        warnings.append(f"{stage.name}: ~{mem.total_gib:.1f} of {budget.gib:.1f} GiB per rank: tight")


def out_of_memory(recipe: Recipe, shape: ModelShape | None, stage: Stage, mem: MemoryEstimate, budget: Budget,
                  estimate_for: Estimator) -> Problem:
    parts = (f"weights {mem.weights_gib:.2f} + gradients {mem.gradients_gib:.2f} + optimizer {mem.optimizer_gib:.2f}"
             f" + activations {mem.activations_gib:.2f} + logits {mem.logits_gib:.2f} + overhead "
             f"{mem.overhead_gib:.2f}")
    what = (f"stage {stage.name} needs ~{mem.total_gib:.2f} GiB per rank at seq_len {stage.seq_len} "
            f"(micro-batch {stage.micro}) = {parts}, more than {budget.what}")
    savings = [(setting, mem.total_gib - after.total_gib)
               for setting, after in _pulled(recipe, shape, stage, budget, estimate_for)]
    useful = sorted(((s, g) for s, g in savings if g >= MIN_SAVING_GIB), key=lambda sg: -sg[1])
    if useful:
        fix = "; ".join(f"{setting} (saves ~{gib:.2f} GiB)" for setting, gib in useful)
    else:
        fix = "no memory lever left to pull saves anything here: use a shorter seq_len"
    return Problem(stage.section, what, f"{fix}; {budget.more}")


def _pulled(recipe: Recipe, shape: ModelShape | None, stage: Stage, budget: Budget,
            estimate_for: Estimator) -> list[tuple[str, MemoryEstimate]]:
    out = []
    for setting, changed, micro in _levers(recipe, shape, stage, budget, estimate_for):
        after = estimate_for(changed, micro)
        if after is not None:
            out.append((setting, after))
    return out


def _levers(recipe: Recipe, shape: ModelShape | None, stage: Stage, budget: Budget,
            estimate_for: Estimator) -> list[tuple[str, Recipe, int]]:
    """Each lever not yet pulled that this recipe may pull: (what to set, the recipe with it, micro-batch)."""
    model, par, on_gpu = recipe.model, recipe.parallelism, bool(recipe.cluster.gpus_per_node)
    levers = []

    def lever(setting: str, micro: int | None = None, model: dict | None = None,
              parallelism: dict | None = None) -> None:
        changed = dataclasses.replace(recipe, model=dataclasses.replace(recipe.model, **(model or {})),
                                      parallelism=dataclasses.replace(par, **(parallelism or {})))
        levers.append((setting, changed, micro or stage.micro))

    if not model.gradient_checkpointing and stage.method != "prefix":  # peft refuses prefix + checkpointing
        lever("set model.gradient_checkpointing: true", model=dict(gradient_checkpointing=True))
    if stage.micro > 1 and stage.micro_asked:
        lever(f"set {stage.micro_field}: 1 (accumulation keeps the batch)", micro=1)
    if stage.method not in VIRTUAL_TOKEN_METHODS and model.loss_chunk_tokens > LOSS_CHUNK:
        lever(f"set model.loss_chunk_tokens: {LOSS_CHUNK}", model=dict(loss_chunk_tokens=LOSS_CHUNK))
    if model.tiled_mlp_tokens is None and shape is not None and not shape.mixture_of_experts \
            and shape.model_type not in INLINE_MLP_TYPES:
        lever(f"set model.tiled_mlp_tokens: {MLP_TILE}", model=dict(tiled_mlp_tokens=MLP_TILE))
    if par.zero_stage < 3 and stage.method != "qlora" and model.loss_kernel != "liger":
        lever("set parallelism.zero_stage: 3", parallelism=dict(zero_stage=3))
    if on_gpu:
        _offload_levers(model, par, lever)
    sp = _sequence_parallel_lever(recipe, shape, stage, budget, estimate_for)
    if sp is not None:
        lever(f"set parallelism.sequence_parallel: {sp}", parallelism=dict(sequence_parallel=sp))
    return levers


def _offload_levers(model, par, lever) -> None:
    """Offload moves state to host memory: a lever only where ranks have a device of their own."""
    if par.offload_optimizer == "none" and par.zero_stage >= 2:
        lever("set parallelism.offload_optimizer: cpu", parallelism=dict(offload_optimizer="cpu"))
    if par.offload_params == "none" and par.zero_stage == 3:
        lever("set parallelism.offload_params: cpu", parallelism=dict(offload_params="cpu"))
    if model.gradient_checkpointing and not model.offload_activations:
        lever("set model.offload_activations: true", model=dict(offload_activations=True))


def _sequence_parallel_lever(recipe: Recipe, shape: ModelShape | None, stage: Stage, budget: Budget,
                             estimate_for: Estimator) -> int | None:
    """The smallest larger Ulysses degree that fits, else the largest one allowed (None: none is)."""
    degrees = [d for d in _sp_degrees(recipe, shape, stage) if d > recipe.parallelism.sequence_parallel]
    for d in degrees:
        par = dataclasses.replace(recipe.parallelism, sequence_parallel=d)
        after = estimate_for(dataclasses.replace(recipe, parallelism=par), stage.micro)
        if after is not None and after.total_gib <= budget.gib:
            return d
    return degrees[-1] if degrees else None


def _sp_degrees(recipe: Recipe, shape: ModelShape | None, stage: Stage) -> list[int]:
    """Degrees the plan would accept: dividing the world, the seq_len and the heads (Ulysses)."""
    world, attn = recipe.cluster.world_size, recipe.model.attn_implementation
    if shape is None or stage.method in VIRTUAL_TOKEN_METHODS:
        return []
    return [d for d in range(2, world + 1) if world % d == 0 and stage.seq_len % d == 0
            and not _problems(check_sequence_parallel, d, shape, attn)]


def _problems(check, *args) -> list[Problem]:
    found: list[Problem] = []
    check(*args, found)
    return found
