"""The end-of-pipeline summary: what each stage did and where its results are."""

from __future__ import annotations

import json
import math
from pathlib import Path

from dist_ft.plan.plan import Plan
from dist_ft.plan.run_records import BestWeights, DoneMarker, read_record


def read_metrics(path: Path) -> list[dict]:
    """Training rows by step; a resumed stage may have logged a step twice, the later row wins. A line
    cut short by a killed rank (the next run appends to it) is skipped, not fatal."""
    by_step = {row["step"]: row for row in read_rows(path) if "loss" in row and isinstance(row.get("step"), int)}
    return [by_step[k] for k in sorted(by_step)]


def read_rows(path: Path) -> list[dict]:
    """Every JSON object row of a JSONL file (a line cut short is skipped)."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


SAMPLES_SHOWN = 3


def evaluation_lines(folder, indent: str) -> list[str]:
    """What the stage's evaluation found: the best weights it exported, the last validation metrics,
    the test metrics, and samples before and after the stage."""
    lines = []
    done = read_record(folder.done, DoneMarker)
    best = done.best if done else None
    if best is not None:
        lines.append(f"{indent}exported the best weights: step {best.step}, {best.metric} {best.value:.4f}")
    evals = [r for r in read_rows(folder.metrics) if any(k.startswith("eval_") for k in r)]
    if evals:
        lines.append(f"{indent}{_eval_line(evals, best)}")
    test = _read_json(folder.test_metrics)
    if test:
        lines.append(f"{indent}test (weights of step {test.get('step')}): {_values(test, 'test_')}")
    samples = read_rows(folder.samples)
    if samples:
        after = best.step if best else done.step if done else max(r.get("step", 0) for r in samples)
        for label, step in (("before", 0), ("after", after)):
            shown = [r for r in samples if r.get("step") == step][:SAMPLES_SHOWN]
            if shown and (label == "before" or step != 0):
                lines.append(f"{indent}samples {label} (step {step}):")
                lines += [f"{indent}  {_sample(r)}" for r in shown]
    return lines


def _eval_line(evals: list[dict], best: BestWeights | None) -> str:
    """The validation metrics of the exported weights (the best evaluation's, else the last), set against
    the model before the stage (its step-0 evaluation) when there is one: what the stage bought."""
    best_step = best.step if best else None
    after = next((r for r in reversed(evals) if r.get("step") == best_step), evals[-1])
    before = next((r for r in evals if r.get("step") == 0), None)
    if before is None or before is after:
        return f"eval (step {after.get('step')}): {_values(after, 'eval_')}"
    changes = [f"{k.removeprefix('eval_')} {before[k]:.4g} -> {v:.4g}" for k, v in after.items()
               if k.startswith("eval_") and _number(v) and _number(before.get(k))]
    return f"eval (step 0 -> {after.get('step')}): " + "  ".join(changes)


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _values(row: dict, prefix: str) -> str:
    return "  ".join(f"{k.removeprefix(prefix)} {v:.4g}" for k, v in row.items()
                     if k.startswith(prefix) and isinstance(v, (int, float)))


def _sample(row: dict) -> str:
    """One line: the prompt's end, the answer's start (as Python literals: whitespace shows), the reference."""
    def short(text, width: int, tail: bool = False) -> str:
        text = str(text or "")
        if len(text) <= width:
            return repr(text)
        return "…" + repr(text[-width:]) if tail else repr(text[:width]) + "…"

    reference = f"  (reference: {short(row['reference'], 30)})" if row.get("reference") is not None else ""
    return f"{short(row.get('prompt'), 40, tail=True)} -> {short(row.get('output'), 40)}{reference}"


def context_lines(plan: Plan, index: int, indent: str) -> list[str]:
    """What a long-context stage bought, from the after-stage evaluations (RUN/eval/<stage>, the model
    with its own RoPE): perplexity beyond and within the native context at the longest evaluated length,
    against the model before the stage (the previous stage's evaluation, else the starting model's)."""
    stage = plan.stages[index]
    after = _perplexity_split(plan.run.eval(stage.name) / "results.json")
    if after is None:
        return []
    length, beyond, within, native = after
    previous = plan.stages[index - 1].name if index else "base"
    before = _perplexity_split(plan.run.eval(previous) / "results.json", length)
    if before is None:
        why = ": the recipe initialises it at random" if index == 0 and plan.model.name_or_path is None else ""
        return [f"{indent}eval @ {length}: ppl beyond the native {native} tokens {beyond:.4g}, within "
                f"{within:.4g} (the model before this stage was not evaluated{why})"]
    return [f"{indent}eval @ {length}: ppl beyond the native {native} tokens {before[1]:.4g} -> {beyond:.4g}, "
            f"within {before[2]:.4g} -> {within:.4g} (before: {previous})"]


def _perplexity_split(path: Path, length: str | None = None) -> tuple[str, float, float, int] | None:
    """(length, ppl beyond the native context, ppl within it, native) at `length` (else the longest
    evaluated), from a results.json's own-RoPE variant; None when it is missing or has no such bands."""
    variants = _read_json(path).get("variants") or {}
    variant = variants.get("keep") or next(iter(variants.values()), {})
    table, native = variant.get("perplexity") or {}, variant.get("native_context")
    length = length or max(table, key=int, default=None)
    bands = (table.get(length) or {}).get("bands", []) if length else []
    beyond = [b for b in bands if b.get("beyond_native")]
    within = [b for b in bands if not b.get("beyond_native")]
    if not (beyond and within and native):
        return None
    return length, _pooled(beyond), _pooled(within), native


def _pooled(bands: list[dict]) -> float:
    """The perplexity of several bands' tokens together (their mean log-perplexity, token-weighted)."""
    tokens = sum(b["tokens"] for b in bands)
    return math.exp(sum(b["tokens"] * math.log(b["ppl"]) for b in bands) / tokens)


def pipeline_summary(plan: Plan) -> str:
    run = plan.run
    lines = [f"summary of run {plan.name} ({run.path})"]
    for stage in plan.stages:
        folder = run.stage(stage.name)
        rows = read_metrics(folder.metrics)
        if not rows:
            lines.append(f"  {stage.name:<12} not trained yet")
            continue
        status = "done" if folder.done.exists() else f"stopped at step {rows[-1]['step']}"
        lines.append(f"  {stage.name:<12} seq_len {stage.seq_len:<6} loss {rows[0]['loss']:.4f} -> "
                     f"{rows[-1]['loss']:.4f} over {rows[-1]['step']} steps ({status})")
        if folder.export.is_dir():
            lines.append(f"  {'':<12} model:   {folder.model()}")
        lines += evaluation_lines(folder, f"  {'':<12} ")
        if stage.phase == "continued_pretraining":
            lines += context_lines(plan, stage.index, f"  {'':<12} ")
        lines.append(f"  {'':<12} metrics: {folder.metrics}, plot {folder.loss_plot}")
    wandb_dir = plan.wandb_dir
    if wandb_dir.is_dir() and any(wandb_dir.glob("offline-run-*")):
        lines.append(f"  W&B runs were logged offline; upload them later with: wandb sync {wandb_dir}/offline-run-*")
    return "\n".join(lines)
