"""What `dist-ft eval` evaluates: resolve MODEL_OR_RUN_DIR, check the lengths against its RoPE, load it.

Everything here up to `load_variant` reads only small files (config.json, plan.json,
adapter_config.json, GGUF metadata), so bad inputs fail before any weights are loaded.
torch and transformers are imported only where needed, so `dist-ft --help` stays fast.
"""

from __future__ import annotations

import json
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dist_ft.decoding.generate import EvalError
from dist_ft.plan.plan import Plan
from dist_ft.plan.rope import apply_context, native_context, reach
from dist_ft.plan.run_dir import RunDir
from dist_ft.recipe.model_shape import ABSOLUTE_POSITION_TYPES, resolve_model_dir

if TYPE_CHECKING:
    import torch

ROPE_TYPES = ("keep", "none", "linear", "dynamic", "yarn")




EXIT_BAD_INPUT = 2


def exit_code(action, debug: bool) -> int:
    """Run a command's `action`: 0, or an EvalError as one line on stderr and exit 2 (a traceback with --debug)."""
    try:
        action()
        return 0
    except EvalError as err:
        if debug:
            traceback.print_exc()
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT


@dataclass(frozen=True)
class Target:
    """A loadable model: a HF dir (or GGUF file in a dir), optionally with a peft adapter on top."""
    model_dir: str
    gguf_file: str | None
    adapter_dir: str | None
    tokenizer_dir: str
    label: str
    run_dir: str | None = None  # set when MODEL_OR_RUN_DIR was a run dir (for its tracking settings)


@dataclass(frozen=True)
class RopeVariant:
    """`keep` uses the model's own RoPE; the others override it before the model is built."""
    rope_type: str
    factor: float | None = None

    @property
    def name(self) -> str:
        return self.rope_type if self.rope_type in ("keep", "none") else f"{self.rope_type}x{self.factor:g}"

    def rope_parameters(self) -> dict[str, Any] | None:
        if self.rope_type == "keep":
            return None
        if self.rope_type == "none":
            return {"rope_type": "default"}
        return {"rope_type": self.rope_type, "factor": float(self.factor)}


def resolve_target(spec: str, gguf_file: str | None = None, virtual_tokens: bool = False) -> Target:
    """MODEL_OR_RUN_DIR → Target: a run dir (its last finished stage), an adapter dir, a HF dir, package:NAME.
    `virtual_tokens`: prompt-learning adapters are fine (generation), not only layer adapters (eval)."""
    path = resolve_model_dir(spec)
    if path is None or not path.is_dir():
        raise EvalError(f"{spec}: no such model directory, run dir or installed package")
    if RunDir(path).plan_file.is_file():
        return _from_run_dir(path, gguf_file, virtual_tokens)
    if (path / "adapter_config.json").is_file():
        return _from_adapter(path, gguf_file, virtual_tokens)
    return _plain(path, gguf_file, label=path.name if not spec.startswith("package:") else spec)


def _plain(path: Path, gguf_file: str | None, label: str) -> Target:
    gguf = _gguf_in(path, gguf_file)
    if gguf is None and not (path / "config.json").is_file():
        raise EvalError(f"{path} has neither config.json, adapter_config.json, plan.json nor a .gguf file")
    return Target(str(path), gguf, None, str(path), label)


def _gguf_in(path: Path, requested: str | None) -> str | None:
    """The GGUF file to load from `path`: the requested one, or the only one when there is no config.json."""
    if requested:
        if not (path / requested).is_file():
            raise EvalError(f"--gguf-file {requested} is not in {path}")
        return requested
    found = sorted(p.name for p in path.glob("*.gguf"))
    if (path / "config.json").is_file() or not found:
        return None
    if len(found) > 1:
        raise EvalError(f"{path} holds several GGUF files ({', '.join(found)}): choose one with --gguf-file")
    return found[0]


def _from_adapter(path: Path, gguf_file: str | None, virtual_tokens: bool = False) -> Target:
    config = json.loads((path / "adapter_config.json").read_text())
    base = config.get("base_model_name_or_path")
    if not base:
        raise EvalError(f"{path}/adapter_config.json names no base_model_name_or_path")
    base_dir = resolve_model_dir(base)
    if base_dir is None or not base_dir.is_dir():
        raise EvalError(f"the base model of adapter {path} ({base}) is not a local directory")
    if config.get("peft_type") in ("PREFIX_TUNING", "PROMPT_TUNING", "P_TUNING") and not virtual_tokens:
        raise EvalError(f"{path} is a {config['peft_type']} adapter: long-context eval supports adapters that "
                        "change layers (LoRA, DoRA, IA3), not virtual tokens")
    base_target = _plain(base_dir, gguf_file, base_dir.name)
    tokenizer_dir = path if (path / "tokenizer_config.json").is_file() else base_dir
    return Target(base_target.model_dir, base_target.gguf_file, str(path), str(tokenizer_dir),
                  f"{base_dir.name}+{path.parent.parent.name}/adapter")


def _from_run_dir(run: Path, gguf_file: str | None, virtual_tokens: bool = False) -> Target:
    plan = Plan.from_json(RunDir(run).plan_file.read_text())
    finished = finished_stages(plan)
    if not finished:
        raise EvalError(f"run {run} has no finished stage with an export yet")
    return stage_target(plan, finished[-1], gguf_file, virtual_tokens)


def finished_stages(plan: Plan) -> list[str]:
    return [s.name for s in plan.stages if plan.run.stage(s.name).finished()]


def stage_target(plan: Plan, name: str, gguf_file: str | None = None, virtual_tokens: bool = False) -> Target:
    """A finished stage's export: the model dir, or the adapter over its base."""
    stage = plan.run.stage(name)
    inner = _from_adapter(stage.adapter, gguf_file, virtual_tokens) if stage.adapter.is_dir() \
        else _plain(stage.export, gguf_file, stage.export.name)
    return Target(inner.model_dir, inner.gguf_file, inner.adapter_dir, inner.tokenizer_dir,
                  f"{plan.name}/{name}", run_dir=str(plan.run.path))


def base_target(plan: Plan) -> Target | None:
    """The run's starting model, or None when the recipe initialises it at random (nothing to load)."""
    model = plan.model
    if model.name_or_path is None:
        return None
    base = resolve_target(model.name_or_path, model.gguf_file)
    return Target(base.model_dir, base.gguf_file, None, base.tokenizer_dir, f"{plan.name}/base",
                  run_dir=str(plan.run.path))


# ---- what lengths a model + RoPE can address --------------------------------------------------

def effective_config(target: Target, variant: RopeVariant):
    """The model's config as `build_model` would build it for this variant (no weights read)."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(target.model_dir, gguf_file=target.gguf_file)
        apply_context(config, variant.rope_parameters(), None)
    except (OSError, ValueError, KeyError) as err:
        raise EvalError(f"cannot use {target.label} with RoPE {variant.name}: {err}") from err
    return config


def check_lengths(config, lengths: list[int], variant: RopeVariant, allow_beyond: bool) -> None:
    limit = reach(config, config.model_type in ABSOLUTE_POSITION_TYPES)
    if config.model_type in ABSOLUTE_POSITION_TYPES and max(lengths) > limit:
        raise EvalError(f"{config.model_type} has absolute positions: lengths above {limit} cannot be evaluated")
    too_long = sorted({n for n in lengths if n > limit})  # perplexity and passkey lengths overlap: once each
    if too_long and not allow_beyond:
        raise EvalError(f"length(s) {too_long} exceed what RoPE {variant.name} can address ({limit} tokens, "
                        f"native {native_context(config)}): add --rope-type yarn --rope-factor F, "
                        "or --allow-beyond to measure the collapse anyway")


# ---- loading --------------------------------------------------------------------------------

def load_variant(target: Target, variant: RopeVariant, dtype: torch.dtype,
                 keep_peft_model: bool = False) -> torch.nn.Module:
    """The model in eval mode with the variant's RoPE built in (and the adapter on top, if any;
    `keep_peft_model` returns the PeftModel itself, whose generate adds virtual tokens)."""
    from dist_ft.rank.model import build_model

    model = build_model(name_or_path=target.model_dir, gguf_file=target.gguf_file,
                        rope_parameters=variant.rope_parameters(), attn_implementation="sdpa", dtype=dtype)
    if target.adapter_dir:
        from peft import PeftModel

        # get_base_model(): the base with the adapter's layers injected, so get_decoder() still works.
        model = PeftModel.from_pretrained(model, target.adapter_dir)
        model = model if keep_peft_model else model.get_base_model()
    return model.to(eval_device()).eval()


def eval_device() -> torch.device:
    """This process's GPU where there is one (a rank's own after its stage: the trainer set it), else the CPU:
    a 32k window takes minutes on CPU cores, a fraction of a second there."""
    import torch

    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def load_eval_tokenizer(target: Target):
    from dist_ft.rank.model import load_tokenizer

    gguf = target.gguf_file if target.tokenizer_dir == target.model_dir else None
    return load_tokenizer(target.tokenizer_dir, gguf_file=gguf)
