"""The recipe's optimizer and learning-rate schedule sections (every stage has both), and the one
function that folds a stage's shorthands into its schedule."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

from .limits import MAX_STEPS
from .strict import Invalid, spec

OptimizerName = Literal["adamw", "adam", "sgd", "adafactor", "lion", "paged_adamw_8bit"]
ScheduleName = Literal["cosine", "linear", "constant", "constant_with_warmup", "polynomial", "inverse_sqrt",
                       "warmup_stable_decay"]
ADAM_FAMILY = ("adamw", "adam", "paged_adamw_8bit")
# The defaults of the options each optimizer takes (an option it does not take is an error).
OPTIMIZER_DEFAULTS: dict[str, dict[str, Any]] = {
    "adamw": {"betas": [0.9, 0.95], "eps": 1e-8}, "adam": {"betas": [0.9, 0.95], "eps": 1e-8},
    "paged_adamw_8bit": {"betas": [0.9, 0.95], "eps": 1e-8}, "lion": {"betas": [0.9, 0.99]},
    "sgd": {"momentum": 0.9}, "adafactor": {},
}
DEFAULT_MIN_LR_RATIO = 0.1
DEFAULT_DECAY_RATIO = 0.1
DEFAULT_POWER = 1.0
# Schedules that decay to min_lr_ratio x lr; the others have no floor.
FLOORED_SCHEDULES = ("cosine", "linear", "polynomial", "warmup_stable_decay")


@dataclass(frozen=True)
class Optimizer:
    name: OptimizerName = spec("adamw", doc="adamw, adam (L2 decay), sgd, lion: built by DeepSpeed from its config "
                                            "(torch's AdamW/Adam/SGD; with offload_optimizer DeepSpeedCPUAdam / "
                                            "DeepSpeedCPULion; lion: FusedLion on GPUs, bitsandbytes' Lion on CPU "
                                            "ranks without offload). adafactor: transformers' (relative_step off: "
                                            "this lr and schedule drive it). paged_adamw_8bit: bitsandbytes', CUDA "
                                            "only. adafactor and paged_adamw_8bit cannot be offloaded.")
    weight_decay: float = spec(0.0, min=0.0, max=10.0, doc="Decoupled (adamw, lion, adafactor) or L2 (adam, sgd) "
                                                           "weight decay; never on biases and norm weights.")
    betas: list[float] | None = spec(None, doc="adam, adamw, paged_adamw_8bit: unset (0.9, 0.95); lion: unset "
                                               "(0.9, 0.99). Others take none.")
    eps: float | None = spec(None, min=0.0, max=1.0, doc="adam, adamw, paged_adamw_8bit: unset 1e-8. Others take none.")
    momentum: float | None = spec(None, min=0.0, max=1.0, doc="sgd: unset 0.9. Others take none.")
    max_grad_norm: float = spec(1.0, min=0.0, max=1e6, doc="Clip the global gradient norm to this (DeepSpeed's "
                                                           "gradient_clipping); 0 turns clipping off.")

    def __post_init__(self) -> None:
        takes = OPTIMIZER_DEFAULTS[self.name]
        for option in ("betas", "eps", "momentum"):
            if getattr(self, option) is not None and option not in takes:
                alternatives = ", ".join(n for n, d in OPTIMIZER_DEFAULTS.items() if option in d)
                raise Invalid(option, f"{self.name} takes no {option}",
                              f"remove it, or use an optimizer that takes it ({alternatives})")
        if self.betas is not None and (len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas)):
            raise Invalid("betas", f"{self.betas} is not two numbers in [0, 1)", "write e.g. `betas: [0.9, 0.95]`")

    def option(self, name: str) -> Any:
        """An option's value for this optimizer: the recipe's, else the optimizer's default."""
        value = getattr(self, name)
        return OPTIMIZER_DEFAULTS[self.name].get(name) if value is None else value


@dataclass(frozen=True)
class Scheduler:
    name: ScheduleName = spec("cosine", doc="The learning-rate schedule, transformers' `get_scheduler` family; "
                                            "cosine, linear and polynomial decay to min_lr_ratio x lr over the "
                                            "stage; warmup_stable_decay holds lr after the warmup, then decays "
                                            "(cosine) over the last decay_ratio of the steps: the usual choice for "
                                            "continued pretraining.")
    warmup_steps: int | None = spec(None, min=0, max=MAX_STEPS, doc="Linear warmup over this many steps; step s "
                                                                    "< warmup has lr x (s+1)/warmup, so no step "
                                                                    "runs at lr 0. Unset: 0 (or warmup_ratio).")
    warmup_ratio: float | None = spec(None, min=0.0, doc="Warmup as a fraction of the stage's steps (rounded up), in "
                                                         "[0, 1); instead of warmup_steps.")
    min_lr_ratio: float | None = spec(None, min=0.0, max=1.0, doc="Floor of cosine, linear, polynomial and "
                                                                  "warmup_stable_decay as a fraction of lr; unset 0.1.")
    decay_ratio: float | None = spec(None, min=0.0, max=1.0, doc="warmup_stable_decay: fraction of the steps "
                                                                 "(rounded up) the cosine decay takes; unset 0.1.")
    power: float | None = spec(None, min=0.0, max=100.0, doc="polynomial: the decay's exponent; unset 1 (linear).")

    def __post_init__(self) -> None:
        if self.warmup_ratio is not None and self.warmup_ratio >= 1:
            raise Invalid("warmup_ratio", f"{self.warmup_ratio:g} would leave no step after the warmup",
                          "use a fraction below 1, e.g. 0.05")
        if self.warmup_steps is not None and self.warmup_ratio is not None:
            raise Invalid("warmup_ratio", "give either warmup_steps or warmup_ratio, not both", "keep one of them")
        if self.name == "constant" and (self.warmup_steps or self.warmup_ratio):
            raise Invalid("name", "constant has no warmup", "use `constant_with_warmup`, or remove the warmup")
        if self.min_lr_ratio is not None and self.name not in FLOORED_SCHEDULES:
            raise Invalid("min_lr_ratio", f"{self.name} does not decay to a floor",
                          f"remove it, or use one of {', '.join(FLOORED_SCHEDULES)}")
        if self.decay_ratio is not None and self.name != "warmup_stable_decay":
            raise Invalid("decay_ratio", f"only warmup_stable_decay takes decay_ratio, not {self.name}",
                          "remove it, or use `name: warmup_stable_decay`")
        if self.power is not None and self.name != "polynomial":
            raise Invalid("power", f"only polynomial takes power, not {self.name}",
                          "remove it, or use `name: polynomial`")


def effective_scheduler(scheduler: Scheduler, warmup_steps: int | None, min_lr_ratio: float | None) -> Scheduler:
    """A stage's schedule, the one place it is decided: `scheduler` with the stage-level shorthands
    (`warmup_steps`, `min_lr_ratio`) folded in and every default filled. Raises Invalid when a shorthand
    and the scheduler section say different things."""
    merged = {}
    if warmup_steps is not None:
        if scheduler.warmup_ratio is not None or scheduler.warmup_steps not in (None, warmup_steps):
            given = (f"scheduler.warmup_ratio {scheduler.warmup_ratio:g}" if scheduler.warmup_ratio is not None
                     else f"scheduler.warmup_steps {scheduler.warmup_steps}")
            raise Invalid("warmup_steps", f"{warmup_steps} disagrees with {given}",
                          "give the warmup in one place: `scheduler.warmup_steps` (`warmup_steps` is its shorthand)")
        merged["warmup_steps"] = warmup_steps
    if min_lr_ratio is not None:
        if scheduler.min_lr_ratio not in (None, min_lr_ratio):
            raise Invalid("min_lr_ratio", f"{min_lr_ratio:g} disagrees with scheduler.min_lr_ratio "
                          f"{scheduler.min_lr_ratio:g}", "give it in one place: `scheduler.min_lr_ratio`")
        merged["min_lr_ratio"] = min_lr_ratio
    if "warmup_steps" not in merged and scheduler.warmup_steps is None and scheduler.warmup_ratio is None:
        merged["warmup_steps"] = 0
    name = scheduler.name
    if name in FLOORED_SCHEDULES and scheduler.min_lr_ratio is None and "min_lr_ratio" not in merged:
        merged["min_lr_ratio"] = DEFAULT_MIN_LR_RATIO
    if name == "warmup_stable_decay" and scheduler.decay_ratio is None:
        merged["decay_ratio"] = DEFAULT_DECAY_RATIO
    if name == "polynomial" and scheduler.power is None:
        merged["power"] = DEFAULT_POWER
    try:
        return dataclasses.replace(scheduler, **merged)
    except Invalid as err:  # a shorthand the schedule does not take: a warmup or floor on `constant`
        field = "warmup_steps" if err.field == "name" else err.field  # the stage-level key of that name
        raise Invalid(field, err.what, err.fix) from None


OPTIMIZER_DOC = "Optimizer, weight decay and gradient clipping."
SCHEDULER_DOC = "Learning-rate schedule (its peak is `lr`)."
WARMUP_SHORTHAND_DOC = "Shorthand for scheduler.warmup_steps (give it in one place)."
FLOOR_SHORTHAND_DOC = "Shorthand for scheduler.min_lr_ratio (give it in one place)."
