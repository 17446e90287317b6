"""The RULER-style suite on a model: samples dealt among the ranks (eval_shard), each answered by greedy
decoding (decoding.generate), scored as RULER scores them, gathered; a per-length, per-task table and a plot.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dist_ft.decoding.generate import EvalError, Sampling, generate_ids
from .eval_shard import Shard, deal
from .ruler_tasks import TASKS, Sample, make_sample, string_match_all


def ruler_samples(tokenizer, lengths: Sequence[int], depths: Sequence[float], trials: int,
                  seed: int) -> list[Sample]:
    """Every (task, length, depth, trial) sample; the needle tasks at each depth, vt and cwe at depth 0 only."""
    try:
        return [make_sample(task, tokenizer, n, d, seed * 1000 + t) for n in lengths for task in TASKS
                for d in (depths if task.startswith("niah") else [0.0]) for t in range(trials)]
    except ValueError as err:
        raise EvalError(f"--tasks ruler: {err}; use longer --passkey-lengths") from None


def run_ruler(model, tokenizer, samples: list[Sample], shard: Shard) -> dict[str, Any]:
    """{"scores": {task: {str(length): score}}, "examples": the first sample of each cell with its answer}.
    One all-reduce of the per-sample scores and one gather of the answers, whatever each rank held."""
    owner = deal([s.length for s in samples], shard.world)
    answers: dict[int, str] = {}
    for i, sample in enumerate(samples):
        if owner[i] == shard.rank:
            ids = tokenizer(sample.prompt, add_special_tokens=True)["input_ids"]
            answers[i] = generate_ids(model, tokenizer, ids, Sampling(max_new_tokens=sample.max_new_tokens))
    answers = shard.merge(answers)
    scores: dict[str, dict[str, float]] = {}
    examples = []
    for task in TASKS:
        for length in sorted({s.length for s in samples}):
            cell = [i for i, s in enumerate(samples) if s.task == task and s.length == length]
            if not cell:
                continue
            scores.setdefault(task, {})[str(length)] = string_match_all([answers[i] for i in cell],
                                                                        [samples[i].answers for i in cell])
            examples.append({"task": task, "length": length, "answers": samples[cell[0]].answers,
                             "output": answers[cell[0]]})
    return {"scores": scores, "examples": examples}


def format_ruler(name: str, ruler: dict[str, Any]) -> str:
    scores = ruler["scores"]
    lengths = sorted({int(n) for row in scores.values() for n in row})
    lines = [f"RULER ({name}): string_match_all, % of references found in the answer",
             "| task | " + " | ".join(str(n) for n in lengths) + " |", "|---|" + "---|" * len(lengths)]
    for task, row in scores.items():
        lines.append(f"| {task} | " + " | ".join(f"{row[str(n)]:.1f}" if str(n) in row else "-" for n in lengths)
                     + " |")
    means = [sum(row[str(n)] for row in scores.values() if str(n) in row) / len(scores) for n in lengths]
    lines.append("| **mean** | " + " | ".join(f"{m:.1f}" for m in means) + " |")
    return "\n".join(lines)


def plot_ruler(results: dict[str, Any], png: Path) -> bool:
    """Score against length, one line per task and variant; False where matplotlib is missing."""
    from .eval_report import pyplot

    try:
        plt = pyplot()
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, variant in results["variants"].items():
        for task, row in variant.get("ruler", {}).get("scores", {}).items():
            lengths = sorted(int(n) for n in row)
            ax.plot(lengths, [row[str(n)] for n in lengths], marker="o", label=f"{task} ({name})")
    ax.set_xscale("log", base=2)
    ax.set(xlabel="prompt length (tokens)", ylabel="score (%)", ylim=(-5, 105), title="RULER-style tasks")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)
    return True
