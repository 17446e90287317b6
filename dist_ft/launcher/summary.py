"""The end-of-pipeline summary: what each stage did and where its results are."""

from __future__ import annotations

import json
from pathlib import Path

from dist_ft.plan.plan import Plan


def read_metrics(path: Path) -> list[dict]:
    """Training rows by step; a resumed stage may have logged a step twice, the later row wins. A line
    cut short by a killed rank (the next run appends to it) is skipped, not fatal."""
    if not path.is_file():
        return []
    by_step: dict[int, dict] = {}
    for line in path.read_text(errors="replace").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and "loss" in row and isinstance(row.get("step"), int):
            by_step[row["step"]] = row
    return [by_step[k] for k in sorted(by_step)]


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
        lines.append(f"  {'':<12} metrics: {folder.metrics}, plot {folder.loss_plot}")
    wandb_dir = run.wandb
    if wandb_dir.is_dir() and any(wandb_dir.glob("offline-run-*")):
        lines.append(f"  W&B runs were logged offline; upload them later with: wandb sync {wandb_dir}/offline-run-*")
    return "\n".join(lines)
