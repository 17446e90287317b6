"""The after-stage evaluation shared by ranks, and its memory at long windows (issue 27).

    python benchmarks/eval_ranks.py OUT_DIR [--lengths 1024,2048] [--windows 4] [--memory-length 16384]

On long_context.py's tiny model (random init, hidden 256, 2 layers, vocab 32000, fp32, CPU):

1. wall time of one `run_eval` (perplexity windows + passkey trials, stdlib text) on 1 rank with 1 thread,
   1 rank with 2 threads, and 2 torchrun ranks on gloo with 1 thread each (the train job's layout);
2. peak memory of scoring one window of --memory-length tokens: dist-ft's path (decoder once, the LM head
   and cross-entropy over 1k-token chunks: `eval_nll.token_nll`) against a plain transformers forward
   that returns the full logits, then the cross-entropy over them. Each in a fresh process; the figure
   is the growth of peak RSS over the process's RSS with the model loaded.

Prints two Markdown tables and writes OUT_DIR/eval_ranks.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def build_model_dir(folder: Path, max_positions: int) -> Path:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from long_context import SHAPES, build_tokenizer

    from dist_ft.rank.model import build_model

    config, vocab = SHAPES["tiny"]
    build_tokenizer(folder, vocab)
    build_model(name_or_path=None, config_overrides={**config, "vocab_size": vocab,
                                                     "max_position_embeddings": max_positions},
                attn_implementation="sdpa", seed=0).save_pretrained(folder)
    return folder


def request(model: str, out: str, lengths: list[int], windows: int):
    from dist_ft.evaluation.evaluate import EvalRequest

    return EvalRequest(model=model, lengths=lengths, windows=windows, passkey_lengths=[max(lengths)],
                       depths=[0.0, 0.5, 1.0], trials=2, dtype="fp32", out=out)


def worker(model: str, out: str, lengths: str, windows: str) -> None:
    """One rank (or the only process): run_eval's wall time, written by rank 0. The libraries are imported
    first, as they are in the train job that runs the after-stage evaluation (imports are ~9 s of a cold start)."""
    import importlib

    import torch

    from dist_ft.evaluation.evaluate import run_eval

    for module in ("matplotlib.pyplot", "transformers.models.llama.modeling_llama", "dist_ft.rank.model"):
        importlib.import_module(module)  # warm, as above

    if "RANK" in os.environ:
        torch.distributed.init_process_group("gloo")
    started = time.monotonic()
    results = run_eval(request(model, out, [int(n) for n in lengths.split(",")], int(windows)))
    seconds = time.monotonic() - started
    if results["ranks"] == 1 or torch.distributed.get_rank() == 0:
        Path(out, "timing.json").write_text(json.dumps({"seconds": seconds, "results": results}))
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def memory(model: str, length: str, how: str) -> None:
    """Peak RSS growth (MiB) of scoring one window, printed as JSON."""
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    from dist_ft.evaluation.eval_nll import token_nll

    lm = AutoModelForCausalLM.from_pretrained(model, attn_implementation="sdpa", dtype=torch.float32).eval()
    ids = torch.randint(0, lm.config.vocab_size, (1, int(length)), generator=torch.Generator().manual_seed(0))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.monotonic()
    with torch.no_grad():
        if how == "chunked":
            nll = token_nll(lm, ids)
        else:
            logits = lm(input_ids=ids, use_cache=False).logits[0, :-1]
            nll = F.cross_entropy(logits.float(), ids[0, 1:], reduction="none")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"peak_growth_mib": (peak - before) / 1024, "seconds": time.monotonic() - started,
                      "mean_nll": float(nll.double().mean())}))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def timed(model: Path, out: Path, lengths: str, windows: int, ranks: int, threads: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT)}
    script = [str(Path(__file__).resolve()), "_worker", str(model), str(out), lengths, str(windows)]
    argv = [sys.executable, *script] if ranks == 1 else \
        [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={ranks}", "--master_addr=127.0.0.1",
         f"--master_port={_free_port()}", *script]
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    subprocess.run(argv, env=env, check=True, stdout=subprocess.DEVNULL)
    row = json.loads((out / "timing.json").read_text())
    return {"ranks": ranks, "threads": threads, "eval_s": row["seconds"], "process_s": time.monotonic() - started,
            "ppl": {n: r["ppl"] for n, r in row["results"]["variants"]["keep"]["perplexity"].items()}}


def measured_memory(model: Path, length: int, how: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "2", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, str(Path(__file__).resolve()), "_memory", str(model), str(length), how],
                          env=env, check=True, capture_output=True, text=True)
    return {"how": how, "length": length, **json.loads(done.stdout.strip().splitlines()[-1])}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out")
    p.add_argument("--lengths", default="1024,2048")
    p.add_argument("--windows", type=int, default=4)
    p.add_argument("--memory-length", type=int, default=16384)
    p.add_argument("--skip-memory", action="store_true", help="only the wall-time table")
    args = p.parse_args()
    out = Path(args.out)
    model = build_model_dir(out / "model", max(args.memory_length, *map(int, args.lengths.split(","))))
    timing = [timed(model, out / f"r{r}t{t}", args.lengths, args.windows, r, t) for r, t in ((1, 1), (1, 2), (2, 1))]
    mem = [] if args.skip_memory else [measured_memory(model, args.memory_length, how)
                                       for how in ("chunked", "full_logits")]
    (out / "eval_ranks.json").write_text(json.dumps({"timing": timing, "memory": mem}, indent=1))
    base = timing[0]["eval_s"]
    print("| layout | run_eval wall (s) | ratio to 1 rank x 1 thread | ppl |\n|---|---|---|---|")
    for row in timing:
        print(f"| {row['ranks']} rank(s) x {row['threads']} thread(s) | {row['eval_s']:.1f} | "
              f"{row['eval_s'] / base:.2f} | {', '.join(f'{n}: {v:.4f}' for n, v in row['ppl'].items())} |")
    print(f"\n| scoring one {args.memory_length}-token window | peak RSS growth (MiB) | time (s) | mean NLL |\n"
          "|---|---|---|---|")
    for row in mem:
        print(f"| {row['how']} | {row['peak_growth_mib']:.0f} | {row['seconds']:.1f} | {row['mean_nll']:.5f} |")


if __name__ == "__main__":
    if sys.argv[1:2] == ["_worker"]:
        worker(*sys.argv[2:6])
    elif sys.argv[1:2] == ["_memory"]:
        memory(*sys.argv[2:5])
    else:
        main()
