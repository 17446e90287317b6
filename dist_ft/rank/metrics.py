"""Metrics: rank 0 writes JSONL, W&B and a progress bar; every other rank gets a do-nothing sink,
so all ranks call the same code."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from dist_ft.recipe.config import Tracking
    from dist_ft.plan.run_dir import StageDir

SAMPLE_COLUMNS = ("step", "prompt", "output", "reference")
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}


class Metrics(Protocol):
    def log(self, row: dict[str, Any]) -> None: ...

    def log_samples(self, step: int, rows: list[dict[str, Any]]) -> None: ...

    def close(self) -> None: ...


def quiet_progress_bars() -> None:
    """For every rank but rank 0: its libraries' progress bars (tokenizing, loading and writing weights)
    only repeat rank 0's, interleaved with them on the same terminal."""
    import datasets
    from transformers.utils import logging as hf_logging

    datasets.disable_progress_bars()
    hf_logging.disable_progress_bar()


class NullMetrics:
    def log(self, row: dict[str, Any]) -> None:
        pass

    def log_samples(self, step: int, rows: list[dict[str, Any]]) -> None:
        pass

    def close(self) -> None:
        pass


def wandb_mode(requested: str, environ: dict[str, str] | None = None) -> str:
    """`auto`: online only with an API key; compute nodes rarely have internet, so offline otherwise."""
    env = os.environ if environ is None else environ
    if env.get("WANDB_MODE") in ("online", "offline", "disabled"):
        return env["WANDB_MODE"]
    if requested != "auto":
        return requested
    return "online" if env.get("WANDB_API_KEY") else "offline"


def wandb_run_id(run_dir: str, stage: str) -> str:
    """Stable per run and stage, so a requeued job continues the same W&B run."""
    return hashlib.sha1(f"{run_dir}:{stage}".encode()).hexdigest()[:12]


class RankZeroMetrics:
    def __init__(self, stage_dir: StageDir, tracking: Tracking, run_name: str, run_dir: str, stage: str,
                 config: dict[str, Any], total_steps: int, start_step: int):
        self.path, self.plot = stage_dir.metrics, stage_dir.loss_plot
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(self.path, "a")
        self.wandb = _start_wandb(tracking, run_name, run_dir, stage, config)
        from tqdm import tqdm

        self.bar = tqdm(total=total_steps, initial=start_step, desc=stage, unit="step", dynamic_ncols=True)

    def log(self, row: dict[str, Any]) -> None:
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in row.items() if isinstance(v, (int, float))}, step=row["step"])
        if "loss" in row:
            self.bar.update(row["step"] - self.bar.n)
            self.bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.2e}")

    def log_samples(self, step: int, rows: list[dict[str, Any]]) -> None:
        """Generated samples as a W&B table (samples.jsonl holds them too)."""
        if self.wandb is None or not rows:
            return
        import wandb

        columns = list(SAMPLE_COLUMNS)
        table = wandb.Table(columns=columns, data=[[row.get(c) for c in columns] for row in rows])
        self.wandb.log({"samples": table}, step=step)

    def close(self) -> None:
        self.bar.close()
        self.file.close()
        if self.wandb is not None:
            import wandb

            self.wandb.finish()
            wandb.teardown()  # flushes the offline .wandb file before anyone reads it
        plot_loss(self.path, self.plot)


def _start_wandb(tracking: Tracking, run_name: str, run_dir: str, stage: str, config: dict[str, Any]):
    mode = wandb_mode(tracking.mode)
    if mode == "disabled":
        return None
    import wandb

    os.environ.setdefault("WANDB_DIR", run_dir)
    return wandb.init(
        project=tracking.project, entity=tracking.entity, group=tracking.group or run_name,
        name=f"{tracking.run_name or run_name}-{stage}", tags=tracking.tags or None,
        id=wandb_run_id(run_dir, stage), resume="allow", mode=mode, config=config,
        settings=wandb.Settings(silent=True, console="off"),
    )


def mfu(tokens_per_s: float, num_params: int, layers: int, hidden: int, seq_len: int, world: int,
        device_name: str) -> float | None:
    """Model FLOPs utilisation: 6N + 12·L·h·s FLOPs per token (Chinchilla / PaLM appendix)."""
    peak = next((flops for key, flops in PEAK_BF16_FLOPS.items() if key in device_name), None)
    if peak is None:
        return None
    flops_per_token = 6 * num_params + 12 * layers * hidden * seq_len
    return tokens_per_s * flops_per_token / (peak * world)


def plot_loss(jsonl: Path, png: Path) -> None:
    every = [json.loads(line) for line in jsonl.read_text().splitlines() if line.strip()]
    rows = [r for r in every if "loss" in r]
    if not rows:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], label="train")
    evals = [r for r in every if "eval_loss" in r]
    if evals:
        ax.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", label="eval")
    ax.set(xlabel="optimizer step", ylabel="loss", title=f"{rows[-1].get('stage', '')} (seq_len "
                                                            f"{rows[-1].get('seq_len', '?')})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
