"""benchmarks/gpu_check.sh's mechanics without running a step: the budget check skips with a recorded reason,
and summary.json's targets read only what steps 4 and 5 measured (the smoke run itself:
tests/integration/test_gpu_check.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
SUMMARIES = ROOT / "benchmarks" / "gpu_summaries.py"


def test_the_scripts_parse():
    for script in ("gpu_check.sh", "gpu_wheels.sh"):
        subprocess.run(["bash", "-n", str(ROOT / "benchmarks" / script)], check=True)


def test_a_spent_budget_skips_every_step_with_its_reason(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "GPU_CHECK_BUDGET_S": "0", "GPU_CHECK_WORK": str(tmp_path / "w"),
           "PYTHONPATH": str(ROOT)}
    subprocess.run(["bash", str(SCRIPT), "--smoke", str(tmp_path / "out")], env=env, check=True, capture_output=True)
    steps = json.loads((tmp_path / "out" / "summary.json").read_text())["steps"]
    assert [s["step"] for s in steps] == ["env", "pytest", "demo", "throughput", "longest", "extension"]
    assert all(s["status"] == "skipped" and s["reason"].startswith("budget: ") for s in steps)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["gpu_check.log", "summary.json"]


def test_usage_without_an_out_dir():
    assert subprocess.run(["bash", str(SCRIPT)], capture_output=True).returncode == 2


def summarize(out: Path, throughput: dict | None, longest: dict | None) -> dict:
    for name, value in (("04-throughput.json", throughput), ("05-longest.json", longest)):
        if value is not None:
            (out / name).write_text(json.dumps(value))
    (out / "steps.tsv").write_text("throughput\tok\t12\t04-throughput.json\t\nlongest\tskipped\t0\t\tbudget: 3 s left\n")
    subprocess.run([sys.executable, str(SUMMARIES), "summary", str(out), str(out / "steps.tsv")], check=True,
                   env={**os.environ, "PYTHONPATH": str(ROOT)})
    return json.loads((out / "summary.json").read_text())


def test_targets_are_null_where_nothing_was_measured(tmp_path):
    summary = summarize(tmp_path, None, None)
    assert summary["steps"][1] == {"step": "longest", "status": "skipped", "wall_s": 0, "result": None,
                                   "reason": "budget: 3 s left"}
    assert all(t["measured"] is None and t["met"] is None for t in summary["targets"].values())


def test_targets_read_the_32k_row_and_the_longest_search(tmp_path):
    row = lambda n, mfu, ratio: {"seq_len": n, "ours": {"mfu": mfu}, "hf": {}, "mem_ratio": ratio}  # noqa: E731
    throughput = {"results": [row(8192, 0.30, 0.4), row(32768, 0.42, 0.6)]}
    longest = {"sides": {"ours": {"longest_trained": 393216}, "hf": {"longest_trained": 16384}}}
    targets = summarize(tmp_path, throughput, longest)["targets"]
    assert targets["mfu_at_32k"] == {"target": 0.4, "measured": 0.42, "met": True}
    assert targets["longest_tokens"] == {"target": 524288, "measured": 393216, "met": False}
    assert targets["memory_ratio"] == {"target": 0.5, "measured": 0.6, "met": False}  # the worst length counts
