"""What each stage bought: one table and one plot over a run's stages, the starting model as stage 0.

Built from the per-stage results `dist-ft eval` writes (RUN/eval/<stage>/results.json, RUN/eval/base/
for the starting model), so the after-each-stage evaluations of a run and `dist-ft eval RUN --stages
all` produce the same picture: RUN/eval/stages.json and RUN/eval/stages.png (and a W&B run). Each
stage is read with its own RoPE (the `keep` variant): the model as the stage exported it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dist_ft.plan.plan import Plan
from .eval_report import pyplot, log_comparison_wandb

BASE = "base"
OWN_ROPE = "keep"


def stage_results(plan: Plan) -> dict[str, dict[str, Any]]:
    """{stage: results} for the base and every stage of the plan that has an evaluation, in run order."""
    found = {}
    for name in [BASE, *(s.name for s in plan.stages)]:
        path = plan.run.eval(name) / "results.json"
        if path.is_file():
            found[name] = json.loads(path.read_text())
    return found


def compare(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """One row per stage: perplexity per window length (overall and per band) and passkey accuracy
    per length (mean over depths), from the stage's own-RoPE variant."""
    rows = []
    for stage, result in results.items():
        variants = result["variants"]
        variant = variants.get(OWN_ROPE) or next(iter(variants.values()))
        rows.append({"stage": stage, "model": result["model"],
                     "ppl": {length: {"all": row["ppl"], "windows": row["windows"],
                                      "bands": {b["band"]: b["ppl"] for b in row["bands"]}}
                             for length, row in variant["perplexity"].items()},
                     "passkey": {length: sum(cells.values()) / len(cells)
                                 for length, cells in variant["passkey"].items() if cells}})
    return {"stages": [row["stage"] for row in rows], "rows": rows}


def format_comparison(comparison: dict[str, Any]) -> str:
    rows = comparison["rows"]
    lengths = sorted({length for row in rows for length in row["ppl"]}, key=int)
    keys = sorted({length for row in rows for length in row["passkey"]}, key=int)
    head = ["stage", *(f"ppl@{n}" for n in lengths), *(f"passkey@{n}" for n in keys)]
    lines = ["what each stage bought (each stage with its own RoPE):", "  " + " | ".join(head)]
    for row in rows:
        cells = [row["stage"], *(_cell(row["ppl"].get(n, {}).get("all")) for n in lengths),
                 *(_cell(row["passkey"].get(n)) for n in keys)]
        lines.append("  " + " | ".join(cells))
    return "\n".join(lines)


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def plot_comparison(comparison: dict[str, Any], png: Path) -> None:
    """Left: perplexity per band of the longest window across stages; right: passkey per length."""
    plt = pyplot()
    from matplotlib.ticker import ScalarFormatter

    rows, stages = comparison["rows"], comparison["stages"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    lengths = sorted({length for row in rows for length in row["ppl"]}, key=int)
    if lengths:
        longest = lengths[-1]
        bands = list(dict.fromkeys(b for row in rows for b in row["ppl"].get(longest, {}).get("bands", {})))
        for band in bands:
            left.plot(stages, [row["ppl"].get(longest, {}).get("bands", {}).get(band) for row in rows], "o-",
                      label=f"tokens {band}")
        left.set_yscale("log")
        left.yaxis.set_major_formatter(ScalarFormatter())  # plain numbers, not 4x10^1
        left.yaxis.set_minor_formatter(ScalarFormatter())
        left.set(title=f"perplexity by position band @ {longest}", xlabel="stage", ylabel="perplexity")
        left.legend(fontsize=7)
    for length in sorted({length for row in rows for length in row["passkey"]}, key=int):
        right.plot(stages, [row["passkey"].get(length) for row in rows], "o-", label=f"@ {length}")
    right.set(title="passkey accuracy (mean over depths)", xlabel="stage", ylabel="accuracy", ylim=(-0.05, 1.05))
    if right.lines:
        right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


def write_comparison(plan: Plan, echo=lambda *_: None) -> dict[str, Any] | None:
    """RUN/eval/stages.{json,png} from the evaluations present, the table echoed, logged to W&B when the
    run tracks; None when fewer than two evaluations exist (nothing to compare yet)."""
    results = stage_results(plan)
    if len(results) < 2:
        return None
    comparison = compare(results)
    out = plan.run.eval(BASE).parent
    (out / "stages.json").write_text(json.dumps(comparison, indent=2) + "\n")
    plot_comparison(comparison, out / "stages.png")
    echo(format_comparison(comparison))
    echo(f"[eval] wrote {out / 'stages.json'}, {out / 'stages.png'}")
    if log_comparison_wandb(comparison, out / "stages.png", plan.name, plan.tracking):
        echo("[eval] logged the stage comparison to W&B")
    return comparison
