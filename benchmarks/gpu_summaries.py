"""gpu_check.sh's small helpers: turn what a step's run wrote into one result JSON, and build a tiny model.

    python benchmarks/gpu_summaries.py demo RUN_DIR OUT.json             # step 3: each stage's losses and speed
    python benchmarks/gpu_summaries.py extension OUT.json EVAL_DIR... [--stages RUN_DIR]   # step 6
    python benchmarks/gpu_summaries.py tiny-model DIR                    # step 6's smoke model (random init)
    python benchmarks/gpu_summaries.py summary OUT_DIR STEPS.tsv         # each step's status + the issue's targets

Only figures read from files the runs wrote: a missing file gives null, never an estimate.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from dist_ft.launcher.summary import read_metrics, read_rows
from dist_ft.plan.plan import Plan
from dist_ft.plan.run_dir import RunDir

TARGET_LONGEST, TARGET_MFU, TARGET_MEM_RATIO = 512 * 1024, 0.40, 0.5  # issue 30, for the 1B shape on one GPU


def demo(run_dir: str, out: str) -> None:
    plan = Plan.from_json(RunDir(Path(run_dir)).plan_file.read_text())
    stages = [stage_summary(plan, stage) for stage in plan.stages]
    _write(out, {"run": plan.name, "stages": stages, "all_done": all(s["done"] for s in stages)})


def stage_summary(plan: Plan, stage) -> dict:
    folder = plan.run.stage(stage.name)
    rows = read_metrics(folder.metrics)
    evals = [r for r in read_rows(folder.metrics) if any(k.startswith("eval_") for k in r)]
    info = folder.rank_info(0)
    last = rows[-1] if rows else {}
    return {"stage": stage.name, "seq_len": stage.seq_len, "done": folder.done.exists(),
            "losses": [r["loss"] for r in rows], "steps": len(rows),
            "device": json.loads(info.read_text())["device"] if info.is_file() else None,
            **{key: last.get(key) for key in ("step_time_s", "tokens_per_s", "peak_memory_gib", "mfu")},
            "eval": {k: v for k, v in evals[-1].items() if k.startswith("eval_")} if evals else None}


def extension(out: str, eval_dirs: list[str], stages_run: str | None) -> None:
    """Perplexity per band and passkey per length for every RoPE variant evaluated, and the before/after
    table of the continued-pretraining stage (RUN/eval/stages.json) when there is one."""
    variants = {}
    for folder in eval_dirs:
        path = Path(folder) / "results.json"
        if not path.is_file():
            continue
        result = json.loads(path.read_text())
        for name, variant in result["variants"].items():
            variants[name] = {"ppl": {n: {"all": r["ppl"], "windows": r["windows"],
                                          "bands": {b["band"]: b["ppl"] for b in r["bands"]}}
                                      for n, r in variant["perplexity"].items()},
                              "passkey": {n: sum(c.values()) / len(c) for n, c in variant["passkey"].items() if c},
                              "passkey_trials": result["passkey_trials"], "model": result["model"]}
    stages = None
    if stages_run:
        path = RunDir(Path(stages_run)).eval("base").parent / "stages.json"
        stages = json.loads(path.read_text()) if path.is_file() else None
    _write(out, {"variants": variants, "continued_pretraining": stages})


def tiny_model(folder: str) -> None:
    """A tiny random Llama with dist-ft's byte tokenizer, saved as a HF dir: step 6's stand-in in --smoke."""
    from dist_ft.rank.model import build_model
    from dist_ft.rank.tokenizer import byte_tokenizer

    model = build_model(name_or_path=None, config_overrides={
        "model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256, "vocab_size": 259,
        "rope_theta": 10000.0})
    model.save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)


def summary(out_dir: str, steps_tsv: str) -> None:
    """OUT_DIR/summary.json: every step's status (ok, failed, timeout, skipped: with its reason and wall time),
    rewritten after each step, and where the measured figures stand against the issue's targets."""
    steps = []
    for line in Path(steps_tsv).read_text().splitlines():
        name, status, wall, result, reason = (line.split("\t") + [""] * 5)[:5]
        steps.append({"step": name, "status": status, "wall_s": int(wall), "result": result or None,
                      "reason": reason or None})
    _write(str(Path(out_dir) / "summary.json"), {"steps": steps, "targets": targets(Path(out_dir))})


def targets(folder: Path) -> dict:
    """The issue's three targets against what steps 4 and 5 measured (null where they did not run)."""
    throughput = _read(folder / "04-throughput.json")
    longest = _read(folder / "05-longest.json")
    rows = {r["seq_len"]: r for r in (throughput or {}).get("results", [])}
    at_32k = rows.get(32768, {})
    mfu = (at_32k.get("ours") or {}).get("mfu")
    ours_longest = ((longest or {}).get("sides", {}).get("ours") or {}).get("longest_trained")
    mem = [r["mem_ratio"] for r in rows.values() if r.get("mem_ratio") is not None]
    return {"longest_tokens": {"target": TARGET_LONGEST, "measured": ours_longest,
                                    "met": None if ours_longest is None else ours_longest >= TARGET_LONGEST},
                 "mfu_at_32k": {"target": TARGET_MFU, "measured": mfu, "met": None if mfu is None else mfu >= TARGET_MFU},
                 "memory_ratio": {"target": TARGET_MEM_RATIO, "measured": max(mem) if mem else None,
                                  "met": None if not mem else max(mem) <= TARGET_MEM_RATIO}}


def _read(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _write(out: str, value: dict) -> None:
    Path(out).write_text(json.dumps(value, indent=2) + "\n")


def main(argv: list[str]) -> int:
    if argv[:1] == ["demo"] and len(argv) == 3:
        demo(argv[1], argv[2])
    elif argv[:1] == ["extension"] and len(argv) >= 2:
        rest, stages = argv[2:], None
        if "--stages" in rest:
            i = rest.index("--stages")
            stages, rest = rest[i + 1], rest[:i] + rest[i + 2:]
        extension(argv[1], rest, stages)
    elif argv[:1] == ["tiny-model"] and len(argv) == 2:
        tiny_model(argv[1])
    elif argv[:1] == ["summary"] and len(argv) == 3:
        summary(argv[1], argv[2])
    else:
        print(__doc__, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
