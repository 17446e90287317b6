"""benchmarks/long_context.py keeps a side's measured steps when its process dies after writing them (ZeRO-3
on gloo can abort at interpreter exit: 'terminate called without an active exception', seen in the suite's
gpu_check smoke on 2026-12-06), and says so; a side that died before measuring stays a failure."""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys

from tests.conftest import ROOT


def long_context():
    spec = importlib.util.spec_from_file_location("long_context_bench", ROOT / "benchmarks" / "long_context.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_a_baseline_that_died_after_its_steps_keeps_them_and_one_that_died_before_stays_failed(tmp_path,
                                                                                              monkeypatch):
    bench = long_context()
    run = tmp_path / "len256" / "run"
    run.mkdir(parents=True)
    died = {"error": "exit code -6 (SIGABRT)", "log": "hf.log", "log_tail": "terminate called"}
    monkeypatch.setattr(bench, "baseline_spec", lambda run, args: tmp_path / "spec.json")
    monkeypatch.setattr(bench, "launch", lambda argv, args, log: died)
    monkeypatch.setattr(bench, "tokens_per_step", lambda run: 512)
    args = argparse.Namespace(ranks=1, hf_rows="packed", steps=2, zero=3)

    assert bench.measure_baseline(run, 256, args) == died  # nothing measured: a failure

    (run.parent / "hf_result.json").write_text(json.dumps(
        {"step_times_s": [0.5, 0.25], "peak_memory_gib": 1.5, "loss_step1": 10.5, "vocab_size": 32000,
         "num_params": 17}))
    kept = bench.measure_baseline(run, 256, args)
    assert (kept["step_time_s"], kept["tokens_per_s"], kept["loss_step1"]) == (0.25, 2048.0, 10.5)
    assert kept["died_after_measuring"] == "exit code -6 (SIGABRT)" and "error" not in kept
