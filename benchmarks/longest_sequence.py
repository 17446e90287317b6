"""The longest sequence that trains one optimizer step: ours against the baseline, doubling then bisecting.

Each try is `long_context.py --only SIDE --steps 1 --lengths N` in a fresh process (so no memory carries
over) with a timeout; a try that fails (out of memory, timeout, any error) bounds the search from above.
Everything after `--` goes to long_context.py unchanged (shape, device, dtype, ranks, ZeRO stage, levers).

    python benchmarks/longest_sequence.py --start 8192 --max 1048576 --budget 300 --out longest.json -- \\
        --shape llama-3.2-1b --device cuda --dtype bf16 --zero 3 --set model.gradient_checkpointing=true

The JSON is rewritten after every try, so a run cut short keeps what it found.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

LONG_CONTEXT = Path(__file__).with_name("long_context.py")


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    argv = list(sys.argv[1:] if argv is None else argv)
    passed = argv[argv.index("--") + 1:] if "--" in argv else []
    own = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sides", default="ours,hf", help="comma-separated: ours, hf")
    p.add_argument("--start", type=int, default=8192, help="first seq_len tried")
    p.add_argument("--start-hf", type=int, help="the baseline's first seq_len (default: --start); it stops far sooner")
    p.add_argument("--max", type=int, default=1 << 20, help="doubling stops here (a pass at max ends the search)")
    p.add_argument("--align", type=int, default=1024, help="bisection points are multiples of this")
    p.add_argument("--resolution", type=float, default=0.125,
                   help="bisect until the first failure is within this fraction above the longest pass")
    p.add_argument("--try-timeout", type=int, default=600, help="seconds per try; a slower step counts as failed")
    p.add_argument("--budget", type=float, default=3600, help="seconds per side; no try starts past it")
    p.add_argument("--budget-hf", type=float, help="the baseline's seconds (default: --budget)")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(own)
    for side in args.sides.split(","):
        if side not in ("ours", "hf"):
            p.error(f"--sides: {side!r} is neither ours nor hf")
    return args, passed


def main(argv: list[str] | None = None) -> int:
    args, passed = parse_args(argv)
    report = {"settings": {**{k: v for k, v in vars(args).items() if k != "out"}, "long_context_args": passed},
              "sides": {}}
    with tempfile.TemporaryDirectory(prefix="dist_ft_longest_") as tmp:
        for side in args.sides.split(","):
            report["sides"][side] = search(side, args, passed, Path(tmp), lambda: write(report, args.out))
    report["ratio"] = longest_ratio(report["sides"])
    write(report, args.out)
    print(json.dumps({side: {k: r[k] for k in ("longest_trained", "first_failed", "stopped")}
                      for side, r in report["sides"].items()}))
    return 0


def write(report: dict, out: Path) -> None:
    out.write_text(json.dumps(report, indent=2) + "\n")


def search(side: str, args: argparse.Namespace, passed: list[str], tmp: Path, save) -> dict:
    """Double from --start while steps train (halve when the start already fails), then bisect between the
    longest pass and the first failure."""
    found = {"longest_trained": None, "first_failed": None, "tries": [], "stopped": "searched"}
    hf = side == "hf"
    deadline = time.monotonic() + (args.budget_hf if hf and args.budget_hf else args.budget)

    def attempt(seq_len: int) -> bool | None:
        left = deadline - time.monotonic()
        if left < 10:
            found["stopped"] = "budget"
            return None
        row = one_try(side, seq_len, min(args.try_timeout, int(left)), passed, tmp)
        found["tries"].append(row)
        key = "longest_trained" if row["trained"] else "first_failed"
        found[key] = seq_len
        save()
        return row["trained"]

    seq_len = args.start_hf if hf and args.start_hf else args.start
    while seq_len <= args.max:
        ok = attempt(seq_len)
        if not ok:
            break
        seq_len *= 2
    while found["longest_trained"] is None and found["first_failed"] and seq_len // 2 >= args.align:
        seq_len //= 2  # the start was already too long: halve until a step trains
        if attempt(seq_len) is None:
            break
    lo, hi = found["longest_trained"], found["first_failed"]
    while lo and hi and hi - lo > max(args.align, lo * args.resolution):
        mid = (lo + hi) // 2 // args.align * args.align
        if mid <= lo:
            break
        ok = attempt(mid)
        if ok is None:
            break
        lo, hi = (mid, hi) if ok else (lo, mid)
    return found


def one_try(side: str, seq_len: int, timeout: int, passed: list[str], tmp: Path) -> dict:
    out = tmp / f"{side}-{seq_len}.json"
    argv = [sys.executable, str(LONG_CONTEXT), "--only", side, "--steps", "1", "--lengths", str(seq_len),
            "--timeout", str(timeout), "--out", str(out), *passed]
    started = time.monotonic()
    # The try's own timeout stops its torchrun; this one only guards long_context.py itself.
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout + 120)
    row = {"seq_len": seq_len, "wall_s": round(time.monotonic() - started, 1)}
    if proc.returncode != 0 or not out.exists():
        return {**row, "trained": False, "error": f"long_context.py exit {proc.returncode}: {proc.stderr[-300:]}"}
    result = json.loads(out.read_text())["results"][0][side]
    if "error" in result:
        return {**row, "trained": False, "error": result["error"]}
    return {**row, "trained": True, "step_time_s": result["step_time_s"], "peak_memory_gib": result["peak_memory_gib"],
            "plan_memory_gib": result.get("plan_memory_gib")}


def longest_ratio(sides: dict) -> float | None:
    ours, hf = (sides.get(s, {}).get("longest_trained") for s in ("ours", "hf"))
    return ours / hf if ours and hf else None


if __name__ == "__main__":
    sys.exit(main())
