"""`dist-ft eval`: perplexity by token position at several context lengths, and passkey retrieval.

Checks every input (model path, lengths against the RoPE) before loading weights, then, per
RoPE variant, builds the model once and runs both evaluations. See docs/eval.md.
"""

from __future__ import annotations

import argparse
import re
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from dist_ft.recipe.config import TORCH_DTYPE_NAMES, Tracking
from .eval_model import (ROPE_TYPES, EvalError, RopeVariant, Target, base_target, check_lengths, effective_config,
                         exit_code, finished_stages, eval_device, load_eval_tokenizer, load_variant, resolve_target,
                         stage_target)
from dist_ft.decoding.bands import band_edges
from .eval_shard import PerplexityJob, Shard, current_shard, passkey_jobs, perplexity_jobs, run_shared
from .ruler_run import format_ruler, plot_ruler, ruler_samples, run_ruler
from .short_context import check_short_context, short_length
from .stage_comparison import BASE, write_comparison
from dist_ft.plan.plan import Plan
from dist_ft.plan.rope import native_context
from dist_ft.plan.run_dir import RunDir

EVAL_PROJECT = "dist-ft-eval"  # W&B project of a model evaluated outside any run
STANDALONE_OUT = Path("runs/eval")  # results of a model evaluated outside any run: STANDALONE_OUT/<model>
DTYPES = ("bf16", "fp32")
EVAL_TASKS = ("ppl", "passkey", "ruler")


@dataclass(frozen=True)
class EvalRequest:
    model: str
    lengths: list[int] = field(default_factory=lambda: [2048, 4096, 8192, 16384])
    passkey_lengths: list[int] | None = None  # None: the perplexity lengths
    depths: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])
    trials: int = 2
    windows: int = 4
    rope_types: list[str] = field(default_factory=lambda: ["keep"])
    rope_factor: float | None = None
    text: list[str] = field(default_factory=list)
    out: str | None = None
    dtype: str = "bf16"
    gguf_file: str | None = None
    allow_beyond: bool = False
    wandb: bool = False
    seed: int = 0
    tasks: tuple[str, ...] = ("ppl", "passkey")  # EVAL_TASKS; ruler and passkey run at the passkey lengths

    def variants(self) -> list[RopeVariant]:
        scaled = [t for t in self.rope_types if t not in ("keep", "none")]
        if scaled and not self.rope_factor:
            raise EvalError(f"--rope-type {' '.join(scaled)} needs --rope-factor F (e.g. 2 for twice the context)")
        if self.rope_factor is not None and self.rope_factor < 1:
            raise EvalError(f"--rope-factor {self.rope_factor} must be at least 1")
        return [RopeVariant(t, self.rope_factor if t in scaled else None) for t in self.rope_types]


# ---- command line ------------------------------------------------------------------------------

def add_arguments(p: argparse.ArgumentParser) -> None:
    """The command line of EvalRequest, with its defaults (a recipe's `evaluation` has smaller ones: it runs
    after every stage)."""
    d = EvalRequest(model="")
    p.add_argument("model", help="HF model dir, adapter dir, run dir (last finished stage) or package:NAME")
    p.add_argument("--lengths", help=f"perplexity window lengths ('' for none; default: a run dir's own evaluation "
                                     f"lengths, else its stages' seq_len, else {_csv(d.lengths)})")
    p.add_argument("--passkey-lengths", help="passkey prompt lengths (default: --lengths; '' for none)")
    p.add_argument("--depths", default=_csv(d.depths), help="relative needle depths")
    p.add_argument("--trials", type=int, default=d.trials, help="passkeys per (length, depth) cell")
    p.add_argument("--windows", type=int, default=d.windows, help="perplexity windows per length (at most)")
    p.add_argument("--rope-type", nargs="+", default=d.rope_types, choices=ROPE_TYPES,
                   help="RoPE variants to compare; keep = the model's own")
    p.add_argument("--rope-factor", type=float, help="scaling factor for linear/dynamic/yarn")
    p.add_argument("--text", nargs="+", default=[], help="held-out text files or folders (default: stdlib source)")
    p.add_argument("--out", help="output dir (default: RUN_DIR/eval/<stage> or runs/eval/<model>)")
    p.add_argument("--dtype", choices=DTYPES, default=d.dtype)
    p.add_argument("--gguf-file", help="GGUF file inside the model dir (e.g. SmolLM2-135M-Instruct.Q4_1.gguf)")
    p.add_argument("--allow-beyond", action="store_true", help="evaluate lengths beyond the RoPE's reach anyway")
    p.add_argument("--wandb", action="store_true", help="log to W&B (offline without WANDB_API_KEY)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--stages", help="a run dir's stages to evaluate and compare (`all`, or names a,b), the "
                                    "starting model as stage 0: RUN/eval/<stage>/ and RUN/eval/stages.{json,png}")
    p.add_argument("--tasks", default=_csv(list(d.tasks)),
                   help=f"what to measure, comma-separated: {', '.join(EVAL_TASKS)} (ruler: the RULER-style suite "
                        "at the passkey lengths: needles, variable tracking, common words)")
    p.add_argument("--lm-eval", metavar="TASKS", help="instead: run lm-evaluation-harness tasks (comma-separated, "
                                                      "e.g. hellaswag,arc_easy) where the lm-eval package is installed")
    p.add_argument("--debug", action="store_true", help="show tracebacks")


def _csv(values: list) -> str:
    return ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in values)


def main_from_args(args: argparse.Namespace) -> int:
    def evaluate() -> None:
        request = request_from_args(args)
        if args.lm_eval is not None:
            _lm_eval(request, args.lm_eval)
        elif args.stages:
            evaluate_stages(request, args.stages, echo=print)
        else:
            run_eval(request, echo=print)

    return exit_code(evaluate, args.debug)


def _lm_eval(request: EvalRequest, tasks: str) -> None:
    from .lm_eval_tasks import run_lm_eval

    target = resolve_target(request.model, request.gguf_file)
    out = Path(request.out) if request.out else default_out(target)
    run_lm_eval([t.strip() for t in tasks.split(",") if t.strip()], target, request.dtype, out, print)


def _int_list(text: str | None, flag: str) -> list[int] | None:
    if text is None:
        return None
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise EvalError(f"{flag} {text!r}: expected comma-separated integers, e.g. 2048,4096") from None
    if any(v < 16 for v in values):
        raise EvalError(f"{flag} {text!r}: every length must be at least 16 tokens")
    return values


def _depths(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise EvalError(f"--depths {text!r}: expected comma-separated numbers in [0, 1]") from None
    if not values or any(not 0 <= v <= 1 for v in values):
        raise EvalError(f"--depths {text!r}: every depth must be in [0, 1]")
    return values


def request_from_args(args: argparse.Namespace) -> EvalRequest:
    if args.trials < 1 or args.windows < 1:
        raise EvalError("--trials and --windows must be at least 1")
    tasks = tuple(dict.fromkeys(t.strip() for t in args.tasks.split(",") if t.strip()))
    unknown = [t for t in tasks if t not in EVAL_TASKS]
    if unknown or not tasks:
        raise EvalError(f"--tasks {args.tasks!r}: choose from {', '.join(EVAL_TASKS)}")
    lengths = _int_list(args.lengths, "--lengths")
    passkey_lengths = _int_list(args.passkey_lengths, "--passkey-lengths")
    if lengths is None:
        lengths, passkey_lengths = _default_lengths(args.model, passkey_lengths)
    return EvalRequest(
        model=args.model, lengths=lengths, passkey_lengths=passkey_lengths, depths=_depths(args.depths),
        trials=args.trials, windows=args.windows, rope_types=list(dict.fromkeys(args.rope_type)),
        rope_factor=args.rope_factor, text=args.text, out=args.out, dtype=args.dtype, gguf_file=args.gguf_file,
        allow_beyond=args.allow_beyond, wandb=args.wandb, seed=args.seed, tasks=tasks)


def _default_lengths(model: str, passkey_lengths: list[int] | None) -> tuple[list[int], list[int] | None]:
    """A run dir's own lengths (its `evaluation` section's, else its stages' seq_len): what its stages can
    address. Anything else: EvalRequest's defaults (2k-16k)."""
    path = Path(model)
    if not RunDir(path).plan_file.is_file():
        return EvalRequest(model="").lengths, passkey_lengths
    plan = Plan.from_json(RunDir(path).plan_file.read_text())
    if plan.evaluation is not None:
        return list(plan.evaluation.lengths), passkey_lengths if passkey_lengths is not None \
            else plan.evaluation.passkey_lengths
    return sorted({s.seq_len for s in plan.stages}), passkey_lengths


# ---- the evaluation ----------------------------------------------------------------------------

def _check(request: EvalRequest, target: Target | None = None) -> tuple[Target, list[RopeVariant], list[int], list[Path]]:
    """Every plan-time check; reads configs only."""
    target = target or resolve_target(request.model, request.gguf_file)
    variants = request.variants()
    passkey_lengths = request.lengths if request.passkey_lengths is None else request.passkey_lengths
    if not request.lengths and not passkey_lengths:
        raise EvalError("nothing to do: --lengths and --passkey-lengths are both empty")
    texts = [Path(t) for t in request.text]
    missing = [str(t) for t in texts if not t.exists()]
    if missing:
        raise EvalError(f"--text: no such file or folder: {', '.join(missing)}")
    for variant in variants:
        check_lengths(effective_config(target, variant), [*request.lengths, *passkey_lengths], variant,
                      request.allow_beyond)
    return target, variants, passkey_lengths, texts


def default_out(target: Target) -> Path:
    if target.run_dir:
        return RunDir(Path(target.run_dir)).eval(target.label.rsplit("/", 1)[-1])
    return STANDALONE_OUT / re.sub(r"[^A-Za-z0-9_.+-]+", "-", target.label)


def run_eval(request: EvalRequest, echo=lambda *_: None, target: Target | None = None) -> dict[str, Any]:
    """Evaluate (`target`, else the request's model), write results.json and the plots under the output
    dir, return the results."""
    import torch

    from .eval_nll import heldout_tokens

    target, variants, passkey_lengths, texts = _check(request, target)
    out = Path(request.out) if request.out else default_out(target)
    shard = current_shard()
    echo = echo if shard.rank == 0 else (lambda *_: None)
    tokenizer = load_eval_tokenizer(target)
    token_ids = heldout_tokens(tokenizer, max(request.lengths, default=0) * request.windows, texts) \
        if request.lengths and "ppl" in request.tasks else []
    device = eval_device()
    results: dict[str, Any] = {
        "model": target.label, "model_dir": target.model_dir, "gguf_file": target.gguf_file,
        "adapter_dir": target.adapter_dir, "dtype": request.dtype, "device": device.type, "ranks": shard.world,
        "text": [str(t) for t in texts] or "python stdlib source", "text_tokens": len(token_ids),
        "passkey_trials": request.trials, "seed": request.seed, "variants": {}}
    for warning in thin_statistics(request, passkey_lengths):
        echo(f"[eval] warning: {warning}")
    for variant in variants:
        echo(f"[eval] {target.label}: RoPE {variant.name}, {request.dtype} on {device.type}"
             f"{f' ({shard.world} ranks)' if shard.world > 1 else ''}")
        model = load_variant(target, variant, getattr(torch, TORCH_DTYPE_NAMES[request.dtype]))
        results["variants"][variant.name] = _evaluate_variant(model, tokenizer, request, passkey_lengths,
                                                              token_ids, echo, shard)
        del model
    if shard.rank == 0:
        _write_outputs(results, out, target, request, echo)
    return results


def thin_statistics(request: EvalRequest, passkey_lengths: list[int]) -> list[str]:
    """Cells that rest on one sample: an anecdote, not a statistic (reported, not refused)."""
    warnings = []
    if request.lengths and request.windows == 1:
        warnings.append("each perplexity rests on one window of text (--windows 1 / evaluation.windows: 1): "
                        "one unusual passage moves a band by 2x; use 4 or more")
    if passkey_lengths and request.trials == 1:
        warnings.append("each passkey cell is one trial (0 or 1); use --trials 5 or more for an accuracy")
    return warnings


def _evaluate_variant(model, tokenizer, request: EvalRequest, passkey_lengths: list[int], token_ids: list[int],
                      echo, shard: Shard) -> dict[str, Any]:
    """Perplexity and passkey with the work divided among `shard`'s ranks; the same result on each."""
    native = native_context(model.config)
    started = time.monotonic()
    ppl = perplexity_jobs(token_ids, request.lengths, request.windows, native, on_short=_too_short) \
        if "ppl" in request.tasks else []
    passkey = passkey_jobs(passkey_lengths, request.depths, request.trials, request.seed) \
        if "passkey" in request.tasks else []
    perplexity, grid = run_shared(model, tokenizer, ppl, passkey, shard)
    ruler = None
    if "ruler" in request.tasks:
        samples = ruler_samples(tokenizer, passkey_lengths, request.depths, request.trials, request.seed)
        ruler = run_ruler(model, tokenizer, samples, shard)
    for length, row in perplexity.items():
        echo(f"[eval]   ppl @ {length}: {row['ppl']:.3f}")
    for length, row in grid.items():
        for depth, accuracy in row.items():
            echo(f"[eval]   passkey @ {length}, depth {depth}: {accuracy:.2f}")
    echo(f"[eval]   {time.monotonic() - started:.1f} s on {shard.world} rank(s)")
    return {"rope_parameters": model.config.rope_parameters, "native_context": native,
            "perplexity": perplexity, "passkey": grid, **({"ruler": ruler} if ruler else {})}


def _too_short(length: int, have: int) -> None:
    raise EvalError(f"the held-out text has {have} tokens, fewer than one window of {length}: pass longer --text")


def perplexity_at(model, token_ids: list[int], length: int, count: int, lengths: list[int],
                  native: int | None) -> dict[str, Any]:
    """Per-band perplexity over up to `count` windows of `length` tokens, in this process alone."""
    jobs = perplexity_jobs(token_ids, [length], count, native, on_short=_too_short)
    jobs = [PerplexityJob(length, jobs[0].windows, band_edges(length, lengths, native), native)]
    return run_shared(model, None, jobs, [], Shard())[0][str(length)]


def evaluate_after_stage(plan, stage_name: str) -> dict[str, Any]:
    """The recipe's `evaluation` section on the stage just finished (its export), into RUN/eval/<stage>,
    and the comparison over the stages evaluated so far (the starting model once, first).

    Called by the train command on every rank of the stage's job once the stage is done and its engine
    freed: each rank loads the export on its own device and takes its share of the windows and passkey
    trials (eval_shard); rank 0 writes the results. Bf16 where the plan trains in it or on a GPU.
    """
    import torch

    ev = plan.evaluation
    bf16 = plan.model.dtype == "bf16" or torch.cuda.is_available()
    native = plan.model_shape.max_position_embeddings if plan.model_shape else None
    lengths = list(ev.lengths)
    if native and short_length(lengths, native) is None:  # the short-context check needs one inside the window
        lengths = [native, *lengths]
    passkey = list(ev.lengths) if ev.passkey_lengths is None else ev.passkey_lengths  # not at the added length
    request = EvalRequest(model=plan.run_dir, lengths=lengths, passkey_lengths=passkey,
                          depths=list(ev.depths), trials=ev.trials, windows=ev.windows,
                          text=list(ev.text), out=str(plan.run.eval(stage_name)), dtype="bf16" if bf16 else "fp32")
    shard = current_shard()
    echo = (lambda text: print(text, flush=True)) if shard.rank == 0 else (lambda *_: None)
    if not shard.agree((plan.run.eval(BASE) / "results.json").is_file()):
        _evaluate_base(plan, request, echo)
    results = run_eval(request, echo=echo)
    if shard.rank == 0:
        check_short_context(plan, stage_name, echo)
        write_comparison(plan, echo)
    return results


def evaluate_stages(request: EvalRequest, stages: str, echo=lambda *_: None) -> dict[str, Any]:
    """`dist-ft eval RUN_DIR --stages all|a,b`: the starting model and each chosen finished stage, each into
    RUN/eval/<stage>, then the comparison (RUN/eval/stages.{json,png})."""
    path = Path(request.model)
    if not RunDir(path).plan_file.is_file():
        raise EvalError(f"--stages needs a run dir (with plan.json); {request.model} is not one")
    plan = Plan.from_json(RunDir(path).plan_file.read_text())
    finished = finished_stages(plan)
    chosen = finished if stages.strip() == "all" else [s.strip() for s in stages.split(",") if s.strip()]
    unknown = [s for s in chosen if s not in finished]
    if unknown or not chosen:
        raise EvalError(f"--stages {stages!r}: {unknown or 'none'} not among the run's finished stages "
                        f"({', '.join(finished) or 'none yet'})")
    targets = [stage_target(plan, name) for name in chosen]  # every export checked before any weights load
    _evaluate_base(plan, replace(request, out=str(plan.run.eval(BASE))), echo)
    for name, target in zip(chosen, targets):
        run_eval(replace(request, out=str(plan.run.eval(name))), echo, target)
    comparison = write_comparison(plan, echo)
    if comparison is None:
        raise EvalError("fewer than two evaluations to compare: give more than one stage")
    return comparison


def _evaluate_base(plan, request: EvalRequest, echo) -> None:
    try:
        base = base_target(plan)
    except EvalError as err:
        echo(f"[eval] starting model not evaluated: {err}")
        return
    if base is None:
        echo("[eval] starting model not evaluated: the recipe initialises it at random")
        return
    # The starting model at the stages' lengths even beyond its reach: its collapse there is the point.
    run_eval(replace(request, out=str(plan.run.eval(BASE)), allow_beyond=True), echo, base)


def _tracking(request: EvalRequest, target: Target) -> Tracking | None:
    """The tracking section of a run dir's plan.json (mode 'disabled' there turns it off), else --wandb's."""
    if target.run_dir:
        return Plan.from_json(RunDir(Path(target.run_dir)).plan_file.read_text()).tracking
    return Tracking(project=EVAL_PROJECT) if request.wandb else None


def _write_outputs(results: dict[str, Any], out: Path, target: Target, request: EvalRequest, echo) -> None:
    from .eval_report import format_table, log_wandb, plot_passkey, plot_ppl, write_results

    write_results(out, results)
    wrote = [out / "results.json"]
    for key, plot, png in (("perplexity", plot_ppl, "ppl_vs_length.png"), ("passkey", plot_passkey, "passkey.png")):
        if any(v[key] for v in results["variants"].values()):  # --tasks may leave one out
            plot(results, out / png)
            wrote.append(out / png)
    echo(format_table(results))
    for name, variant in results["variants"].items():
        if "ruler" in variant:
            echo(format_ruler(name, variant["ruler"]))
    if any("ruler" in v for v in results["variants"].values()) and plot_ruler(results, out / "ruler.png"):
        echo(f"[eval] wrote {out / 'ruler.png'}")
    tracking = _tracking(request, target)
    if tracking:
        mode = log_wandb(results, out, tracking)
        if mode:
            echo(f"[eval] logged to W&B ({mode}) under {out}")
    echo(f"[eval] wrote {', '.join(str(p) for p in wrote)}")
