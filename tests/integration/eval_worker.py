"""One rank of the shared-evaluation check (run by test_eval_ranks under torchrun, 2 CPU ranks on gloo).

    torchrun --nproc_per_node 2 tests/integration/eval_worker.py MODEL_DIR OUT_DIR

Runs `run_eval` for each request of `requests()` with the process group up, as the train command does
after a stage; rank 0 writes each request's results to OUT_DIR/<name>.json.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from dist_ft.evaluation.evaluate import EvalRequest, run_eval


def requests(model_dir: str, out: Path) -> dict[str, EvalRequest]:
    """`mixed`: windows of two lengths and passkey trials, dealt over both ranks; `one_window`: a single
    window, which rank 0 takes, so rank 1 scores nothing and still joins the all-reduce."""
    common = dict(model=model_dir, dtype="fp32", depths=[0.0, 1.0])
    return {"mixed": EvalRequest(lengths=[64, 128], windows=3, passkey_lengths=[256], trials=2,
                                 out=str(out / "mixed"), **common),
            "one_window": EvalRequest(lengths=[128], windows=1, passkey_lengths=[], out=str(out / "one"), **common)}


def main(model_dir: str, out: str) -> None:
    torch.distributed.init_process_group("gloo")
    for name, request in requests(model_dir, Path(out)).items():
        results = run_eval(request)
        if torch.distributed.get_rank() == 0:
            (Path(out) / f"{name}.json").write_text(json.dumps(results))
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:3])
