#!/usr/bin/env python
"""Is the demo's 256-512 band at 1k (ppl ~70 vs ~35 for its neighbours, one window) noise or a defect?

    .venv/bin/python benchmarks/demo_band_check.py RUN_DIR      # a finished `make demo` run dir

With the demo's own held-out text (dist-ft eval's default: stdlib source minus the demo's training packages):
1. the ctx1k export's bands over window 0 (what the demo printed) and over 16 windows (pooled, and each
   window's 256-512 band);
2. position or text: the NLL of window 0's tokens 256-512 when those same tokens sit at positions 256-512
   (the demo's window), at 128-384 (a window starting 128 tokens later) and at 0-256 (a window starting at
   them), for the ctx1k and ctx512 exports. If the tokens are as hard wherever they sit, it is the text.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import torch

from dist_ft.evaluation.eval_model import RopeVariant, load_eval_tokenizer, load_variant, resolve_target
from dist_ft.evaluation.eval_nll import heldout_tokens, token_nll
from dist_ft.evaluation.evaluate import perplexity_at


def span_ppl(model, ids: list[int], window_start: int, length: int, lo: int, hi: int) -> float:
    """Perplexity of tokens ids[lo:hi] inside the window ids[window_start:window_start+length]."""
    nll = token_nll(model, torch.tensor([ids[window_start:window_start + length]]))
    # entry i of nll is token position i+1 of the window; a window's first token is never predicted
    lo = max(lo, window_start + 1)
    piece = nll[lo - window_start - 1:hi - window_start - 1]
    return math.exp(float(piece.double().mean()))


def main(run_dir: str) -> int:
    run = Path(run_dir)
    windows = 16
    report: dict = {"run_dir": str(run)}
    for stage in ("ctx512", "ctx1k"):
        target = resolve_target(str(run / "stages" / stage / "export"), None)
        tokenizer = load_eval_tokenizer(target)
        ids = heldout_tokens(tokenizer, 1024 * windows)
        model = load_variant(target, RopeVariant("keep", None), torch.float32)
        first = perplexity_at(model, ids, 1024, 1, [256, 1024], 256)
        pooled = perplexity_at(model, ids, 1024, windows, [256, 1024], 256)
        per_window = [perplexity_at(model, ids[i * 1024:(i + 1) * 1024], 1024, 1, [256, 1024], 256)
                      for i in range(windows)]
        band_windows = {b["band"]: [round(w["bands"][j]["ppl"], 2) for w in per_window]
                        for j, b in enumerate(pooled["bands"])}
        placements = {"positions 256-512 (demo window)": span_ppl(model, ids, 0, 1024, 256, 512),
                      "positions 128-384 (window from token 128)": span_ppl(model, ids, 128, 1024, 256, 512),
                      "positions 0-256 (window from token 256)": span_ppl(model, ids, 256, 256, 256, 512)}
        neighbours = {"tokens 0-256 at positions 0-256": span_ppl(model, ids, 0, 1024, 0, 256),
                      "tokens 512-768 at positions 512-768": span_ppl(model, ids, 0, 1024, 512, 768),
                      "tokens 512-768 at positions 0-256": span_ppl(model, ids, 512, 256, 512, 768)}
        report[stage] = {"window0": {b["band"]: round(b["ppl"], 2) for b in first["bands"]},
                         f"pooled_{windows}": {b["band"]: round(b["ppl"], 2) for b in pooled["bands"]},
                         "per_window": band_windows,
                         "tokens_256_512": {k: round(v, 2) for k, v in placements.items()},
                         "neighbours": {k: round(v, 2) for k, v in neighbours.items()}}
        print(f"== {stage}")
        print(json.dumps(report[stage], indent=1))
    print("text of window 0, tokens 256-512:", repr(tokenizer.decode(ids[256:512])))
    (run / "eval" / "band_check.json").parent.mkdir(parents=True, exist_ok=True)
    (run / "eval" / "band_check.json").write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
