"""What a CPU rank costs before its model does: the plan's per-rank overhead allowance, measured.

A rank's peak RSS is torch, DeepSpeed, transformers and gloo plus what the model, its states, activations
and logits take. With a model of a few thousand parameters the second part is nearly nothing (the plan's
own estimate of it is subtracted), so what remains is the overhead the plan must allow for every CPU rank.

    .venv/bin/python benchmarks/rank_overhead.py [--shapes micro tiny wide] [--cells 1x2 2x3] [--out overhead.json]

Each cell trains 2 steps of one 128-token stage through `dist-ft train` under torchrun (gloo), the way
every stage runs; the figure per cell is the largest rank's peak RSS minus the plan's parts other than its
overhead.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dist_ft.cli import main as dist_ft  # noqa: E402
from dist_ft.plan.plan import Plan  # noqa: E402

_LLAMA = {"model_type": "llama", "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128}
# micro: nothing but the rank's fixed cost; tiny: the long-context benchmark's model (17.6M parameters, vocabulary
# 32000); wide: twice its width (43M). What tiny and wide add over micro beyond the plan's model parts is a cost
# that grows with the model, which the fixed allowance cannot hold.
SHAPES = {
    "micro": {**_LLAMA, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
              "num_key_value_heads": 1, "vocab_size": 260},
    "tiny": {**_LLAMA, "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2, "vocab_size": 32000},
    "wide": {**_LLAMA, "hidden_size": 512, "intermediate_size": 1024, "num_hidden_layers": 2, "vocab_size": 32000},
}
CELLS = [(1, 2), (1, 3), (2, 2), (2, 3)]  # (ranks, ZeRO stage)


def recipe(ranks: int, zero: int, root: Path, shape: str = "micro") -> dict:
    demo = yaml.safe_load((ROOT / "launch" / "demo.yaml").read_text())
    return {"name": f"overhead-{shape}-r{ranks}-z{zero}", "seed": 0,
            "model": {**demo["model"], "config": dict(SHAPES[shape]), "dtype": "fp32"},
            "long_context": {"tokens_per_step": 128 * ranks, "data": {"paths": ["package:json"]},
                             "stages": [{"name": "ctx", "seq_len": 128, "steps": 2, "lr": 1e-3,
                                         "rope": {"type": "none"}}]},
            "cluster": {"nodes": 1, "procs_per_node": ranks}, "parallelism": {"zero_stage": zero},
            "tracking": {"mode": "disabled"},
            "checkpointing": {"every_steps": None, "output_root": str(root)}}


def measure(ranks: int, zero: int, root: Path, shape: str = "micro") -> dict:
    run = root / f"{shape}-r{ranks}-z{zero}"
    path = root / f"{shape}-r{ranks}-z{zero}.yaml"
    path.write_text(yaml.safe_dump(copy.deepcopy(recipe(ranks, zero, root, shape))))
    assert dist_ft(["render", str(path), "--out", str(run)]) == 0
    assert dist_ft(["prepare", str(path), "--out", str(run), "--workers", "1"]) == 0
    plan = Plan.from_json((run / "plan.json").read_text())
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="disabled", PYTHONPATH=str(ROOT))
    argv = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", f"--nproc_per_node={ranks}",
            "--master_addr=127.0.0.1", f"--master_port={free_port()}", "-m", "dist_ft", "train",
            "--run-dir", str(run), "--stage", "ctx"]
    result = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    if result.returncode != 0:
        raise SystemExit(result.stdout[-2000:] + result.stderr[-4000:])
    rows = [json.loads(line) for line in (run / "stages" / "ctx" / "metrics.jsonl").read_text().splitlines()]
    peak = max(r["peak_memory_gib"] for r in rows if "peak_memory_gib" in r)
    mem = plan.stages[0].memory
    model_parts = mem["total_gib"] - mem["overhead_gib"]
    return {"shape": shape, "params": plan.model_shape.num_params, "ranks": ranks, "zero": zero, "peak_gib": peak, "plan_model_parts_gib": round(model_parts, 4),
            "overhead_gib": round(peak - model_parts, 3), "plan_overhead_gib": mem["overhead_gib"]}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path)
    p.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), default=["micro"])
    p.add_argument("--cells", nargs="+", default=[f"{r}x{z}" for r, z in CELLS], help="RANKSxZERO, e.g. 1x2 2x3")
    args = p.parse_args()
    cells = [tuple(int(x) for x in cell.split("x")) for cell in args.cells]
    with tempfile.TemporaryDirectory(prefix="overhead-") as tmp:
        rows = [measure(ranks, zero, Path(tmp), shape) for shape in args.shapes for ranks, zero in cells]
    print("| model | parameters | ranks | ZeRO | peak RSS GiB | plan's model parts GiB | overhead GiB | "
          "plan's allowance GiB |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['shape']} | {r['params']:,} | {r['ranks']} | {r['zero']} | {r['peak_gib']:.3f} | "
              f"{r['plan_model_parts_gib']:.4f} | {r['overhead_gib']:.3f} | {r['plan_overhead_gib']:.2f} |")
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
