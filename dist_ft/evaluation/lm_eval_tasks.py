"""`dist-ft eval MODEL --lm-eval TASKS`: EleutherAI's lm-evaluation-harness (`lm-eval`) on any export, where it is
installed. dist-ft does not depend on it (it pulls many task datasets from the hub at run time): without it the
command stops before loading anything, naming the package to install.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

from dist_ft.decoding.generate import EvalError
from .eval_model import Target, eval_device

PACKAGE = "lm-eval"


def check_lm_eval(tasks: list[str], target: Target) -> None:
    """Before any weights load: the package, the task list, a model lm-eval's `hf` backend can load."""
    if importlib.util.find_spec("lm_eval") is None:
        raise EvalError(f"--lm-eval needs the `{PACKAGE}` package (EleutherAI's lm-evaluation-harness), which is not "
                        f"installed here: pip install {PACKAGE}")
    if not tasks:
        raise EvalError("--lm-eval: name at least one task, e.g. --lm-eval hellaswag,arc_easy")
    if target.gguf_file:
        raise EvalError(f"--lm-eval: {target.label} is a GGUF file; lm-eval's hf backend needs a model dir "
                        "(export the stage, or save the model with save_pretrained)")


def run_lm_eval(tasks: list[str], target: Target, dtype: str, out: Path, echo) -> dict[str, Any]:
    """lm-eval's scores per task, written to OUT/lm_eval.json."""
    check_lm_eval(tasks, target)
    import lm_eval

    args = f"pretrained={target.model_dir},dtype={'bfloat16' if dtype == 'bf16' else 'float32'}"
    if target.adapter_dir:
        args += f",peft={target.adapter_dir}"
    device = eval_device()
    echo(f"[eval] {target.label}: lm-eval {','.join(tasks)}, {dtype} on {device.type}")
    results = lm_eval.simple_evaluate(model="hf", model_args=args, tasks=tasks, device=str(device), batch_size=1)
    scores = {"model": target.label, "tasks": tasks, "results": results.get("results", {})}
    out.mkdir(parents=True, exist_ok=True)
    (out / "lm_eval.json").write_text(json.dumps(scores, indent=1, default=str) + "\n")
    echo(f"[eval] wrote {out / 'lm_eval.json'}")
    return scores
