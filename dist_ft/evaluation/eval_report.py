"""What `dist-ft eval` writes: results.json, two plots, a printed table and (optionally) a W&B run."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dist_ft.rank.metrics import wandb_mode

if TYPE_CHECKING:
    from dist_ft.recipe.config import Tracking


def write_results(out: Path, results: dict[str, Any]) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.json"
    path.write_text(json.dumps(results, indent=2) + "\n")
    return path


def pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display on compute nodes
    import matplotlib.pyplot as plt

    return plt


def plot_ppl(results: dict[str, Any], png: Path) -> None:
    """Band perplexity against token position: one line per (RoPE variant, window length)."""
    plt = pyplot()
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    fig, ax = plt.subplots(figsize=(7, 4))
    natives = set()
    for name, variant in results["variants"].items():
        natives.add(variant["native_context"])
        for length, row in variant["perplexity"].items():
            bands = row["bands"]
            ax.plot([(b["start"] + b["end"]) / 2 for b in bands], [b["ppl"] for b in bands], "o-",
                    label=f"{name} @ {length}")
    for native in natives:
        ax.axvline(native, color="grey", linestyle="--", linewidth=1)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    for axis in (ax.xaxis, ax.yaxis):  # plain numbers, not 2^k / 10^k labels with overlapping minor ticks
        axis.set_major_formatter(ScalarFormatter())
        axis.set_minor_formatter(NullFormatter())
    ax.set(xlabel="token position (band midpoint)", ylabel="perplexity",
           title=f"{results['model']}: perplexity by position (dashed: native context)")
    if ax.lines:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


def plot_passkey(results: dict[str, Any], png: Path) -> None:
    """Retrieval accuracy heatmap, length × depth, one panel per RoPE variant."""
    plt = pyplot()
    variants = list(results["variants"].items())
    fig, axes = plt.subplots(1, len(variants), figsize=(4 * len(variants) + 1, 3.5), squeeze=False)
    for ax, (name, variant) in zip(axes[0], variants):
        grid = variant["passkey"]
        lengths = list(grid)
        depths = list(next(iter(grid.values()), {}))
        values = [[grid[length][d] for d in depths] for length in lengths]
        if values:
            ax.imshow(values, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
            for i, row in enumerate(values):
                for j, value in enumerate(row):
                    ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=8)
        ax.set_xticks(range(len(depths)), depths)
        ax.set_yticks(range(len(lengths)), lengths)
        ax.set(xlabel="needle depth", ylabel="length (tokens)", title=name)
    fig.suptitle(f"{results['model']}: passkey retrieval")
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


def format_table(results: dict[str, Any]) -> str:
    lines = [f"eval of {results['model']} ({results['dtype']}, text: {results['text']})"]
    for name, variant in results["variants"].items():
        lines.append(f"  RoPE {name} (native context {variant['native_context']}):")
        for length, row in variant["perplexity"].items():
            bands = "  ".join(f"{b['band']}: {b['ppl']:.2f}" for b in row["bands"])
            lines.append(f"    ppl @ {length:>6} ({row['windows']} window(s){_spread(row)}): all {row['ppl']:.2f} | "
                         f"{bands}")
        for length, by_depth in variant["passkey"].items():
            cells = "  ".join(f"{d}: {a:.2f}" for d, a in by_depth.items())
            lines.append(f"    passkey @ {length:>6} ({results['passkey_trials']} trial(s)): {cells}")
    return "\n".join(lines)


def _spread(row: dict[str, Any]) -> str:
    """The per-window range: how much one window's text moves the figure."""
    per_window = row.get("window_ppl") or []
    return f", per window {min(per_window):.2f}-{max(per_window):.2f}" if len(per_window) > 1 else ""


def flat_metrics(results: dict[str, Any]) -> dict[str, float]:
    """Scalars for W&B: eval/<variant>/ppl@<L>/<band>, eval/<variant>/passkey@<L>/<depth>."""
    flat = {}
    for name, variant in results["variants"].items():
        for length, row in variant["perplexity"].items():
            flat[f"eval/{name}/ppl@{length}/all"] = row["ppl"]
            for band in row["bands"]:
                flat[f"eval/{name}/ppl@{length}/{band['band']}"] = band["ppl"]
        for length, by_depth in variant["passkey"].items():
            for depth, acc in by_depth.items():
                flat[f"eval/{name}/passkey@{length}/depth{depth}"] = acc
    return flat


def log_wandb(results: dict[str, Any], out: Path, tracking: Tracking) -> str | None:
    """One W&B run with the scalars and both plots; returns the mode used (None when disabled)."""
    mode = wandb_mode(tracking.mode)
    if mode == "disabled":
        return None
    import wandb

    os.environ.setdefault("WANDB_DIR", str(out))
    run = wandb.init(project=tracking.project, entity=tracking.entity,
                     name=f"eval-{results['model']}".replace("/", "-"), job_type="eval", mode=mode,
                     config={k: v for k, v in results.items() if k != "variants"},
                     settings=wandb.Settings(silent=True, console="off"))
    run.log({**flat_metrics(results),
             **{f"eval/{png.stem}": wandb.Image(str(png)) for png in sorted(out.glob("*.png"))}})
    run.finish()
    wandb.teardown()  # flushes an offline run's file before anyone reads it
    return mode


def log_comparison_wandb(comparison: dict[str, Any], png: Path, run_name: str, tracking: Tracking) -> str | None:
    """The stage comparison as one W&B run: a table (stage, metric, value) and the plot."""
    mode = wandb_mode(tracking.mode)
    if mode == "disabled":
        return None
    import wandb

    os.environ.setdefault("WANDB_DIR", str(png.parent))
    rows = [[row["stage"], f"ppl@{length}", cell["all"]] for row in comparison["rows"]
            for length, cell in row["ppl"].items()]
    rows += [[row["stage"], f"passkey@{length}", acc] for row in comparison["rows"]
             for length, acc in row["passkey"].items()]
    run = wandb.init(project=tracking.project, entity=tracking.entity, name=f"stages-{run_name}",
                     job_type="eval-stages", mode=mode, settings=wandb.Settings(silent=True, console="off"))
    run.log({"eval/stages": wandb.Table(columns=["stage", "metric", "value"], data=rows),
             "eval/stages_plot": wandb.Image(str(png))})
    run.finish()
    wandb.teardown()
    return mode
