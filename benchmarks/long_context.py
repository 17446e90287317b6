"""Long-context benchmark: dist-ft's trainer against a plain transformers Trainer + DeepSpeed.

For every seq_len, two fresh torchrun jobs train the same tiny random-init Llama (hidden 256,
2 layers, vocab 32000, fp32 on CPU) on the same packed rows with the same DeepSpeed config:

  ours      `dist-ft train` on a rendered recipe, with dist-ft's defaults (attention `auto` →
            sdpa_varlen on CPU, chunked LM-head loss)
  baseline  benchmarks/hf_baseline.py: `transformers.Trainer(deepspeed=...)`, attn "sdpa", stock loss

and the table compares step time, tokens/s and peak memory (ours / baseline). See README.md for
what is held equal and why.

    python benchmarks/long_context.py --lengths 2048,4096,8192,16384 --steps 3 --ranks 1 --zero 2 \
        --out results.json
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
BASELINE = Path(__file__).with_name("hf_baseline.py")
STAGE = "ctx"
# Model shapes, random init from a config (no download). "tiny" is the CPU benchmark's model; the vocabulary
# is Llama-2 sized: at long seq_len the full-vocabulary logits are what a stock loss pays for.
SHAPES = {
    "tiny": ({"model_type": "llama", "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "rope_theta": 10000.0}, 32000),
    # Llama-3.2-1B's config.json (meta-llama/Llama-3.2-1B) minus its llama3 RoPE scaling, which changes no cost.
    "llama-3.2-1b": ({"model_type": "llama", "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
                      "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64, "rope_theta": 500000.0,
                      "tie_word_embeddings": True, "rms_norm_eps": 1e-5}, 128256),
}
DATA = ["package:json", "package:email"]  # stdlib source, ~1 MB of text: present on every machine
LR = 1e-3
TARGET_LEN, TARGET_MEM_RATIO, TARGET_TIME_RATIO = 16384, 0.5, 1.0
# glibc keeps freed blocks below this size in the heap; serving larger ones by mmap makes freed
# tensors leave the RSS at once, so ru_maxrss measures what was live. Applied to both runs alike.
MALLOC_MMAP_THRESHOLD = "65536"


# ---- command line --------------------------------------------------------------------------

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=_lengths, default=[2048, 4096, 8192, 16384], help="comma-separated seq_lens")
    p.add_argument("--steps", type=int, default=3,
                   help="optimizer steps per run; the first is warm-up and not timed unless it is the only one "
                        "(1: probing the longest sequence, where one step is the measure)")
    p.add_argument("--ranks", type=int, default=1, help="CPU ranks (torchrun, gloo) per run")
    p.add_argument("--zero", type=int, choices=(1, 2, 3), default=2, help="ZeRO stage, the same for both")
    p.add_argument("--hf-rows", choices=("packed", "unpacked"), default="packed",
                   help="packed: the baseline gets our rows incl. position_ids (documents isolated, L×L mask); "
                        "unpacked: the same tokens without position_ids (one causal sequence, no mask)")
    p.add_argument("--timeout", type=int, default=3600, help="seconds per training run before it counts as failed")
    p.add_argument("--work-dir", type=Path, help="keep run dirs and logs here (default: a temporary dir, removed)")
    p.add_argument("--out", type=Path, help="write the results as JSON here")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="a recipe override for our side only (dist-ft render --set), e.g. the long-context "
                        "levers: parallelism.sequence_parallel=2, model.tiled_mlp_tokens=4096; repeatable. The baseline "
                        "reuses our rendered DeepSpeed config: use levers that change it with --only ours")
    p.add_argument("--only", choices=("both", "ours", "hf"), default="both",
                   help="run one side only (probing each side's longest trainable seq_len)")
    p.add_argument("--shape", choices=sorted(SHAPES), default="tiny",
                   help="model shape, random init from its config: tiny (the CPU benchmark) or llama-3.2-1b")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="cpu: torchrun ranks on gloo; cuda: one GPU per rank, NCCL")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="model and DeepSpeed dtype, both sides")
    p.add_argument("--hf-checkpointing", action="store_true",
                   help="the baseline turns on gradient checkpointing too (TrainingArguments(gradient_checkpointing))")
    p.add_argument("--data", type=lambda t: [x for x in t.split(",") if x], default=DATA,
                   help="comma-separated data paths (package:NAME for stdlib source); longer probes need more text")
    args = p.parse_args(argv)
    if args.steps < 1:
        p.error("--steps must be at least 1 (with 2 or more the first is warm-up and is not timed)")
    return args


def _lengths(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # torchrun runs in a session of its own, out of reach of a signal to ours: turn SIGTERM into an exit
    # that stops it (launch), so a GPU is never left held by an orphaned job.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    machine = machine_info(args.device)
    print(format_machine(machine), flush=True)
    with work_dir(args.work_dir) as work:
        vocab = SHAPES[args.shape][1]
        tokenizer = build_tokenizer(work / f"tokenizer-{vocab}", vocab)
        # The machine's speed drifts over minutes: every other length runs the baseline first.
        results = [benchmark_length(seq_len, args, work, tokenizer, keep=args.work_dir is not None,
                                    baseline_first=i % 2 == 1) for i, seq_len in enumerate(args.lengths)]
    for row in results:
        add_flops(row, args, machine.get("device_name"))
    print()
    print(format_table(results))
    print()
    print("\n".join(format_checks(results)))
    target = target_verdict(results)
    if target:
        print(target["line"])
    if args.out:
        args.out.write_text(json.dumps({"machine": machine, "settings": settings(args), "results": results,
                                        "target": target}, indent=2) + "\n")
        print(f"results written to {args.out}")
    return 0


@contextlib.contextmanager
def work_dir(path: Path | None):
    """The given dir (everything kept), or a temporary one that is removed at the end unless a
    failed run left its folder there: then its logs stay readable."""
    if path is not None:
        path.mkdir(parents=True, exist_ok=True)
        yield path.resolve()
        return
    tmp = Path(tempfile.mkdtemp(prefix="dist_ft_bench_"))
    try:
        yield tmp
    finally:
        if any(tmp.glob("len*")):
            print(f"failed runs' folders and logs are kept in {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)


def settings(args: argparse.Namespace) -> dict:
    return {"lengths": args.lengths, "steps": args.steps, "timed_steps": max(1, args.steps - 1), "ranks": args.ranks,
            "zero_stage": args.zero, "hf_rows": args.hf_rows, "ours_overrides": args.overrides, "only": args.only,
            "omp_num_threads": omp_threads(args.ranks), "malloc_mmap_threshold": MALLOC_MMAP_THRESHOLD,
            "shape": args.shape, "model": {**SHAPES[args.shape][0], "vocab_size": SHAPES[args.shape][1]},
            "device": args.device, "dtype": args.dtype, "hf_checkpointing": args.hf_checkpointing,
            "data": args.data, "lr": LR}


# ---- one seq_len: render, ours, baseline ----------------------------------------------------

def benchmark_length(seq_len: int, args: argparse.Namespace, work: Path, tokenizer: Path, keep: bool,
                     baseline_first: bool = False) -> dict:
    folder = work / f"len{seq_len}"
    shutil.rmtree(folder, ignore_errors=True)  # a kept work dir from an earlier run: start clean
    folder.mkdir(parents=True)
    try:
        run = render_run(folder, seq_len, args, tokenizer)
    except RuntimeError as err:
        failed = {"error": str(err)}
        return {"seq_len": seq_len, "ours": failed, "hf": failed, **ratios(failed, failed)}
    skipped = {"error": "not run (--only)"}
    measure = {"ours": lambda: measure_ours(run, seq_len, args) if args.only != "hf" else skipped,
               "hf": lambda: measure_baseline(run, seq_len, args) if args.only != "ours" else skipped}
    results = {side: measure[side]() for side in (("hf", "ours") if baseline_first else ("ours", "hf"))}
    ours, hf = results["ours"], results["hf"]
    if not keep and not any(r is not skipped and "error" in r for r in (ours, hf)):
        shutil.rmtree(folder, ignore_errors=True)  # checkpoints and exports: hundreds of MB (tens of GB for 1B)
    return {"seq_len": seq_len, "ours": ours, "hf": hf, **ratios(ours, hf)}


def recipe(seq_len: int, args: argparse.Namespace, tokenizer: Path) -> dict:
    """One long-context stage of `steps` optimizer steps, one row per rank per step (micro-batch 1,
    no accumulation: what the baseline runs). Attention and loss are left at dist-ft's defaults."""
    model, vocab = SHAPES[args.shape]
    gpus = args.ranks if args.device == "cuda" else 0
    return {
        "name": f"bench-{seq_len}", "seed": 0,
        "model": {"config": {**model, "vocab_size": vocab, "max_position_embeddings": seq_len},
                  "tokenizer": str(tokenizer), "dtype": args.dtype},
        "long_context": {"tokens_per_step": seq_len * data_parallel(args), "data": {"paths": args.data},
                         "stages": [{"name": STAGE, "seq_len": seq_len, "steps": args.steps, "lr": LR,
                                     "rope": {"type": "none"}, "micro_batch_size": 1}]},
        "cluster": {"nodes": 1, "gpus_per_node": gpus, "procs_per_node": args.ranks},
        "parallelism": {"zero_stage": args.zero},
        "tracking": {"mode": "disabled"},
    }


def data_parallel(args: argparse.Namespace) -> int:
    """Ranks that hold different rows: a sequence-parallel group (`--set parallelism.sequence_parallel=N`)
    shares one row, so one step stays one row per data-parallel rank."""
    from dist_ft.recipe.config import apply_overrides

    parallelism = [item for item in args.overrides if item.startswith("parallelism.")]  # the only section read
    sp = apply_overrides({}, parallelism).get("parallelism", {}).get("sequence_parallel", 1)
    return args.ranks // sp


def render_run(folder: Path, seq_len: int, args: argparse.Namespace, tokenizer: Path) -> Path:
    path, run = folder / "recipe.yaml", folder / "run"
    path.write_text(yaml.safe_dump(recipe(seq_len, args, tokenizer), sort_keys=False))
    overrides = [arg for item in args.overrides for arg in ("--set", item)]
    result = subprocess.run([sys.executable, "-m", "dist_ft", "render", str(path), "--out", str(run), *overrides],
                            cwd=REPO, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"dist-ft render failed: {(result.stderr or result.stdout).strip()[-300:]}")
    result = subprocess.run([sys.executable, "-m", "dist_ft", "prepare", str(path), "--out", str(run), *overrides],
                            cwd=REPO, capture_output=True, text=True)  # the ranks read token stores
    if result.returncode != 0:
        raise RuntimeError(f"dist-ft prepare failed: {(result.stderr or result.stdout).strip()[-300:]}")
    return run


def measure_ours(run: Path, seq_len: int, args: argparse.Namespace) -> dict:
    _progress(seq_len, "ours", args)
    argv = torchrun(args.ranks) + ["-m", "dist_ft", "train", "--run-dir", str(run), "--stage", STAGE]
    failure = launch(argv, args, run.parent / "ours.log")
    from dist_ft.plan.run_dir import RunDir

    stage_dir = RunDir(run).stage(STAGE)
    if failure and not stage_dir.done.exists():
        return _report(seq_len, "ours", failure)
    rows = [json.loads(line) for line in stage_dir.metrics.read_text().splitlines() if line.strip()]
    steps = [row for row in rows if "step_time_s" in row]
    rank0 = json.loads(stage_dir.rank_info(0).read_text())
    exported = json.loads((stage_dir.export / "config.json").read_text())
    from dist_ft.plan.plan_report import stage_loss_path

    plan = read_plan(run)
    model = plan.model
    result = summarize([row["step_time_s"] for row in steps], max(row["peak_memory_gib"] for row in steps),
                       tokens_per_step(run), loss_step1=steps[0]["loss"], vocab_size=exported["vocab_size"],
                       num_params=rank0["param_elements_total"],
                       attn_implementation=model.attn_implementation, loss_chunk_tokens=model.loss_chunk_tokens,
                       plan_memory_gib=(plan.stages[0].memory or {}).get("total_gib"),
                       loss_path=stage_loss_path(plan, plan.stages[0]))
    return _report(seq_len, "ours", _kept_despite(failure, result))


def measure_baseline(run: Path, seq_len: int, args: argparse.Namespace) -> dict:
    _progress(seq_len, "hf", args)
    try:
        spec = baseline_spec(run, args)
    except Exception as err:  # e.g. the data cannot fill the steps: report it in the table, go on
        return _report(seq_len, "hf", {"error": f"{type(err).__name__}: {err}"})
    argv = torchrun(args.ranks) + [str(BASELINE), str(spec)]
    failure = launch(argv, args, run.parent / "hf.log")
    result_file = run.parent / "hf_result.json"  # the length's folder starts empty: only this run wrote it
    if failure and not result_file.exists():
        return _report(seq_len, "hf", failure)
    measured = json.loads(result_file.read_text())
    result = summarize(measured["step_times_s"], measured["peak_memory_gib"], tokens_per_step(run),
                       loss_step1=measured["loss_step1"], vocab_size=measured["vocab_size"],
                       num_params=measured["num_params"], rows=args.hf_rows)
    return _report(seq_len, "hf", _kept_despite(failure, result))


def _kept_despite(failure: dict | None, result: dict) -> dict:
    """A side that finished its measured steps (its result or DONE written) and then died on its way out
    (seen: ZeRO-3 on gloo, 'terminate called without an active exception' at exit) keeps its figures,
    and says what happened after them."""
    if failure:
        result["died_after_measuring"] = failure["error"]
    return result


def read_plan(run: Path):
    from dist_ft.plan.plan import Plan

    return Plan.from_json((run / "plan.json").read_text())


def tokens_per_step(run: Path) -> int:
    return read_plan(run).stages[0].tokens_per_step


def summarize(times: list[float], peak_gib: float, tokens: int, **extra) -> dict:
    """Mean over the steps after the first: step 1 pays for lazy initialisation (DeepSpeed buckets,
    allocator growth, kernel selection) in both frameworks. A single step is its own measure."""
    step = statistics.mean(times[1:] or times)
    return {"step_time_s": step, "step_time_median_s": statistics.median(times[1:] or times),
            "tokens_per_s": tokens / step, "peak_memory_gib": peak_gib, "step_times_s": times, **extra}


def add_flops(row: dict, args: argparse.Namespace, device_name: str | None) -> None:
    """Model TFLOP/s per rank and MFU for each side that trained, by the formula the trainer logs as `mfu`
    (6N + 12·layers·hidden·seq_len FLOPs per token, PaLM's convention: attention over the whole row, although
    packed documents attend only within themselves; recompute by checkpointing not counted). MFU is against
    the device's dense bf16 peak (dist_ft.rank.metrics.PEAK_BF16_FLOPS); None where the device has none (CPU)."""
    from dist_ft.rank.metrics import PEAK_BF16_FLOPS

    model = SHAPES[args.shape][0]
    peak = next((flops for key, flops in PEAK_BF16_FLOPS.items() if key in (device_name or "")), None)
    for side in ("ours", "hf"):
        result = row[side]
        if "error" in result:
            continue
        per_token = 6 * result["num_params"] + 12 * model["num_hidden_layers"] * model["hidden_size"] * row["seq_len"]
        per_rank = result["tokens_per_s"] * per_token / args.ranks
        result.update(flops_per_token=per_token, model_tflops_per_rank=per_rank / 1e12,
                      mfu=per_rank / peak if peak else None, peak_flops=peak)


def ratios(ours: dict, hf: dict) -> dict:
    if "error" in ours or "error" in hf:
        return {"mem_ratio": None, "time_ratio": None, "median_time_ratio": None}
    return {"mem_ratio": ours["peak_memory_gib"] / hf["peak_memory_gib"],
            "time_ratio": ours["step_time_s"] / hf["step_time_s"],
            "median_time_ratio": ours["step_time_median_s"] / hf["step_time_median_s"]}


# ---- the baseline's inputs -----------------------------------------------------------------

def baseline_spec(run: Path, args: argparse.Namespace) -> Path:
    """Everything the baseline needs, taken from what dist-ft rendered for this stage: the model
    config, the DeepSpeed config and the exact rows each rank trains on, in order."""
    from dist_ft.rank.model import load_tokenizer

    plan = read_plan(run)
    stage = plan.stages[0]
    tokenizer = load_tokenizer(None, None, plan.model.tokenizer)
    ds_config = json.loads((run / stage.ds_config).read_text())
    rows = run.parent / "hf_rows.pt"
    save_rows(plan, stage, ds_config, tokenizer, args.steps, rows)
    # dist-ft sizes the embeddings to the tokenizer and stretches the context to the stage's.
    model_config = {**plan.model.config, "vocab_size": len(tokenizer),
                    "max_position_embeddings": max(plan.model.config.get("max_position_embeddings", 0),
                                                   stage.max_position_embeddings)}
    keys = ["input_ids", "position_ids", "labels"] if args.hf_rows == "packed" else ["input_ids", "labels"]
    spec = {"model_config": model_config, "seed": plan.seed, "steps": args.steps, "ds_config": ds_config,
            "device": args.device, "dtype": args.dtype, "gradient_checkpointing": args.hf_checkpointing,
            "rows": str(rows), "row_keys": keys, "output_dir": str(run.parent / "hf_out"),
            "out": str(run.parent / "hf_result.json")}
    path = run.parent / "hf_spec.json"
    path.write_text(json.dumps(spec, indent=2) + "\n")
    return path


def save_rows(plan, stage, ds_config: dict, tokenizer, steps: int, path: Path) -> None:
    """The rows dist-ft's trainer reads (same packing, seed and per-rank stream), laid out so that
    the HF Trainer's sequential sampler and accelerate's round-robin sharding of batches give rank r
    at micro-step k what dist-ft's rank r gets: batch k·dp + r holds rank r's k-th micro-batch."""
    import datasets
    import torch

    from dist_ft.rank.data import BatchStream, pretraining_rows

    datasets.disable_progress_bars()  # the trainers' logs have it; the table's output need not

    data = stage.data
    seed = data.seed + plan.seed  # as dist_ft.rank.stage_data.load_stage_data
    rows, _ = pretraining_rows(data.paths, data.text_field, tokenizer, stage.seq_len, seed=seed,
                               long_docs=data.long_documents)
    dp, micro = plan.dp, ds_config["train_micro_batch_size_per_gpu"]
    streams = [BatchStream(rows, micro, seed=seed, dp_rank=r, dp_size=dp) for r in range(dp)]
    batches = [next(stream) for _ in range(steps * ds_config["gradient_accumulation_steps"]) for stream in streams]
    torch.save({key: torch.cat([batch[key] for batch in batches]) for key in batches[0]}, path)


# ---- processes -----------------------------------------------------------------------------

def omp_threads(ranks: int) -> int:
    return max(1, len(os.sched_getaffinity(0)) // ranks)


def rank_env(ranks: int, device: str = "cpu") -> dict[str, str]:
    """The same environment for both frameworks."""
    env = dict(os.environ, OMP_NUM_THREADS=str(omp_threads(ranks)), MALLOC_MMAP_THRESHOLD_=MALLOC_MMAP_THRESHOLD,
               DS_ACCELERATOR=device, WANDB_MODE="disabled", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    env["TORCH_EXTENSIONS_DIR"] = str(extensions_dir())
    env.pop("WANDB_API_KEY", None)
    return env


def extensions_dir() -> Path:
    """DeepSpeed compiles its shm comm op once (~1 min) into this cache; both frameworks share it."""
    default = Path.home() / ".cache" / "dist-ft" / "torch_extensions"
    return Path(os.environ.get("TORCH_EXTENSIONS_DIR", default))


def stale_lock_hint() -> str:
    """torch's extension loader takes a lock file around its (no-op) rebuild check in every process;
    a process killed inside that window leaves it behind and every later DeepSpeed start waits on
    it forever. A timed-out run says so when such a lock is there."""
    locks = sorted(extensions_dir().glob("*/lock"))
    return f"; lock file(s) {', '.join(map(str, locks))} may be stale" if locks else ""


def torchrun(ranks: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", f"--nproc_per_node={ranks}",
            "--master_addr=127.0.0.1", f"--master_port={free_port()}"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(argv: list[str], args: argparse.Namespace, log_path: Path) -> dict | None:
    """Run one training job (a fresh process tree, so no peak carries over); None when it succeeded,
    else {"error": reason, "log": path, "log_tail": ...}."""
    timeout = args.timeout
    with open(log_path, "w") as log:
        proc = subprocess.Popen(argv, cwd=REPO, env=rank_env(args.ranks, args.device), stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _stop(proc)
            code = None
        except BaseException:  # SIGTERM from an outer timeout (gpu_check.sh), Ctrl-C: the job's own session too
            _stop(proc)
            raise
    if code == 0:
        return None
    text = log_path.read_text(errors="replace")
    reason = f"timeout after {timeout} s{stale_lock_hint()}" if code is None else failure_reason(code, text)
    return {"error": reason, "log": str(log_path), "log_tail": text[-4000:]}


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM lets torchrun take its workers down; SIGKILL the group if it does not."""
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


# "RuntimeError: ...", "error: ..." (dist-ft's own messages), optionally behind torchrun's "[rank0]: ".
EXCEPTION_LINE = re.compile(r"^\s*(\[rank\d+\]:\s*)?([A-Za-z_][\w.]*(Error|Exception)|error)\b:?\s*(.*)$")


def failure_reason(code: int, log: str) -> str:
    """A short reason for the table: out of memory, or the worker's last exception line (torchrun's
    own ChildFailedError summary says nothing more)."""
    if "exitcode  : -9" in log or "SIGKILL" in log or code in (-9, 137):
        return "killed by SIGKILL, likely out of memory"
    if "OutOfMemoryError" in log or "CUDA out of memory" in log:
        return "CUDA out of memory"
    lines = [line.strip() for line in log.splitlines()
             if EXCEPTION_LINE.match(line) and "ChildFailedError" not in line]
    return lines[-1][:160] if lines else f"exit code {code}"


def _progress(seq_len: int, who: str, args: argparse.Namespace) -> None:
    name = "dist-ft" if who == "ours" else f"HF Trainer ({args.hf_rows} rows)"
    print(f"[{seq_len}] {name}: {args.steps} steps, {args.ranks} rank(s), ZeRO-{args.zero} ...",
          file=sys.stderr, flush=True)


def _report(seq_len: int, who: str, result: dict) -> dict:
    if "error" in result:
        line = f"failed ({result['error']})" + (f"; log {result['log']}" if "log" in result else "")
    else:
        line = (f"step {result['step_time_s']:.3f} s, {result['tokens_per_s']:,.0f} tok/s, "
                f"peak {result['peak_memory_gib']:.3f} GiB"
                + (f" (then the process died: {result['died_after_measuring']})"
                   if "died_after_measuring" in result else ""))
    print(f"[{seq_len}] {who}: {line}", file=sys.stderr, flush=True)
    return result


# ---- the model's tokenizer -----------------------------------------------------------------

def build_tokenizer(folder: Path, size: int) -> Path:
    """dist-ft's byte tokenizer with its vocabulary padded to `size` entries (32000 for the tiny shape).

    dist-ft sizes a random-init model's embeddings to its tokenizer, so the byte tokenizer alone
    would give a 259-row LM head. The padding entries are multi-character strings that a BPE
    without merges never emits: the text still becomes byte ids (the data is unchanged) while the
    LM head and the logits have the full 32000 columns, as with a real Llama-2 tokenizer.
    """
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    from dist_ft.rank.tokenizer import BOS, EOS, PAD, byte_tokenizer

    byte = byte_tokenizer().backend_tokenizer
    vocab = byte.get_vocab(with_added_tokens=False)
    specials = [BOS, EOS, PAD]
    vocab.update({f"<|unused_{i}|>": i for i in range(len(vocab), size - len(specials))})
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer, backend.decoder = byte.pre_tokenizer, byte.decoder
    backend.add_special_tokens(specials)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                        model_max_length=1 << 30)
    assert len(tokenizer) == size, len(tokenizer)
    tokenizer.save_pretrained(folder)
    return folder


# ---- machine and report --------------------------------------------------------------------

def machine_info(device: str = "cpu") -> dict:
    versions = {}
    for name in ("torch", "deepspeed", "transformers", "accelerate"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return {"cpu_model": _cpu_model(), "cpus": os.cpu_count(), "cpus_usable": len(os.sched_getaffinity(0)),
            "memory_gib": _memory_gib(), "load_average": os.getloadavg(), "python": platform.python_version(),
            "platform": platform.platform(), "dist_ft_git": _git_revision(), **versions, **gpu_info(device)}


def gpu_info(device: str) -> dict:
    if device != "cuda":
        return {}
    import torch

    props = torch.cuda.get_device_properties(0)
    return {"device_name": props.name, "device_memory_gib": round(props.total_memory / 1024**3, 1),
            "cuda": torch.version.cuda}


def _cpu_model() -> str | None:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or None


def _memory_gib() -> float | None:
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 1024**2, 1)
    return None


def _git_revision() -> str | None:
    """HEAD, marked -dirty when the worktree has changes (read-only git commands)."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("-dirty" if dirty else "")


def format_machine(m: dict) -> str:
    load = ", ".join(f"{x:.1f}" for x in m["load_average"])
    gpu = f", {m['device_name']} ({m['device_memory_gib']} GiB)" if m.get("device_name") else ""
    return (f"machine: {m['cpu_model']}, {m['cpus_usable']}/{m['cpus']} CPUs usable, {m['memory_gib']} GiB{gpu}, "
            f"load average {load}\n"
            f"software: python {m['python']}, torch {m['torch']}, deepspeed {m['deepspeed']}, "
            f"transformers {m['transformers']}, accelerate {m['accelerate']}, dist-ft {m['dist_ft_git']}")


COLUMNS = ["seq_len", "ours step s", "ours tok/s", "ours peak GiB", "plan GiB (error)", "ours MFU", "HF step s",
           "HF tok/s", "HF peak GiB", "HF MFU", "mem ratio", "time ratio"]


def format_table(results: list[dict]) -> str:
    """Markdown, so it pastes into docs as is. Ratios are ours / baseline: below 1 is better."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "|".join("---:" for _ in COLUMNS) + "|"]
    for r in results:
        cells = [str(r["seq_len"]), *_cells(r["ours"]), _plan_cell(r["ours"]), _mfu_cell(r["ours"]), *_cells(r["hf"]),
                 _mfu_cell(r["hf"]), _number(r["mem_ratio"], "{:.2f}"), _number(r["time_ratio"], "{:.2f}")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _cells(result: dict) -> list[str]:
    if "error" in result:
        return [f"failed ({result['error']})", "failed", "failed"]
    return [f"{result['step_time_s']:.3f}", f"{result['tokens_per_s']:,.0f}", f"{result['peak_memory_gib']:.3f}"]


def _mfu_cell(result: dict) -> str:
    """MFU where the device has a known peak, else the model TFLOP/s per rank (CPU)."""
    if "error" in result or "model_tflops_per_rank" not in result:
        return "-"
    if result["mfu"] is None:
        return f"{result['model_tflops_per_rank']:.3f} TFLOP/s"
    return f"{result['mfu']:.1%}"


def _plan_cell(ours: dict) -> str:
    """The plan's per-rank memory estimate and how far the measured peak is from it."""
    planned = ours.get("plan_memory_gib")
    if "error" in ours or not planned:
        return "-"
    return f"{planned:.2f} ({ours['peak_memory_gib'] / planned - 1:+.0%})"


def _number(value: float | None, fmt: str) -> str:
    return "-" if value is None else fmt.format(value)


def format_checks(results: list[dict]) -> list[str]:
    """Evidence that both sides trained the same thing: same vocabulary and parameter count, and the
    same loss on step 1 (before any update: same weights and data). ZeRO-3 builds the model under
    zero.Init in both, which draws other initial weights than a plain build, so losses may differ."""
    lines = []
    for r in results:
        ours, hf = r["ours"], r["hf"]
        if "error" in ours or "error" in hf:
            continue
        same = (ours["vocab_size"] == hf["vocab_size"] and ours["num_params"] == hf["num_params"]
                and ours["loss_step1"] is not None and hf["loss_step1"] is not None
                and abs(ours["loss_step1"] - hf["loss_step1"]) < 1e-3)
        hf_loss = "n/a" if hf["loss_step1"] is None else f"{hf['loss_step1']:.4f}"
        verdict = "same model and data" if same else "DIFFERENT"
        if not same and hf.get("rows") == "unpacked":
            verdict += " (expected for unpacked rows: there documents attend to each other)"
        lines.append(f"check {r['seq_len']}: step-1 loss ours {ours['loss_step1']:.4f} / HF {hf_loss}, "
                     f"vocab {ours['vocab_size']}/{hf['vocab_size']}, params {ours['num_params']:,}/"
                     f"{hf['num_params']:,}: {verdict}")
    return lines


def target_verdict(results: list[dict]) -> dict | None:
    row = next((r for r in results if r["seq_len"] == TARGET_LEN and r["mem_ratio"] is not None), None)
    if row is None:
        return None
    mem_ok, time_ok = row["mem_ratio"] <= TARGET_MEM_RATIO, row["time_ratio"] <= TARGET_TIME_RATIO
    line = (f"target at {TARGET_LEN} tokens: peak memory {row['mem_ratio']:.2f}x the baseline "
            f"(goal <= {TARGET_MEM_RATIO}: {'met' if mem_ok else 'MISSED'}), step time {row['time_ratio']:.2f}x "
            f"(goal <= {TARGET_TIME_RATIO}: {'met' if time_ok else 'MISSED'})")
    return {"seq_len": TARGET_LEN, "mem_ratio": row["mem_ratio"], "time_ratio": row["time_ratio"],
            "mem_goal_met": mem_ok, "time_goal_met": time_ok, "line": line}


if __name__ == "__main__":
    sys.exit(main())
