"""benchmarks/longest_sequence.py's search: doubling, then bisecting, within a budget (tries faked here;
gpu_check.sh --smoke runs real ones)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "longest_sequence.py"


@pytest.fixture
def longest(monkeypatch):
    spec = importlib.util.spec_from_file_location("longest_sequence", PATH)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "longest_sequence", module)
    spec.loader.exec_module(module)
    return module


def fake_tries(module, monkeypatch, limit: int) -> list[int]:
    tried = []

    def one_try(side, seq_len, timeout, passed, tmp):
        tried.append(seq_len)
        return {"seq_len": seq_len, "trained": seq_len <= limit}

    monkeypatch.setattr(module, "one_try", one_try)
    return tried


def search(module, tmp_path, *argv):
    args, passed = module.parse_args([*argv, "--out", str(tmp_path / "o.json")])
    return module.search("ours", args, passed, tmp_path, lambda: None)


def test_doubles_then_bisects_to_the_resolution(longest, monkeypatch, tmp_path):
    tried = fake_tries(longest, monkeypatch, limit=300_000)
    found = search(longest, tmp_path, "--start", "65536", "--align", "1024", "--resolution", "0.125")
    assert tried[:4] == [65536, 131072, 262144, 524288]  # doubling up to the first failure
    assert found["longest_trained"] <= 300_000 < found["first_failed"]
    assert found["first_failed"] - found["longest_trained"] <= 0.125 * found["longest_trained"]
    assert all(n % 1024 == 0 for n in tried)


def test_a_pass_at_max_ends_the_search(longest, monkeypatch, tmp_path):
    tried = fake_tries(longest, monkeypatch, limit=10**9)
    found = search(longest, tmp_path, "--start", "256", "--max", "512")
    assert tried == [256, 512] and found["longest_trained"] == 512 and found["first_failed"] is None


def test_a_spent_budget_stops_before_a_try(longest, monkeypatch, tmp_path):
    tried = fake_tries(longest, monkeypatch, limit=10**9)
    found = search(longest, tmp_path, "--start", "256", "--budget", "5")
    assert tried == [] and found["stopped"] == "budget"


def test_the_baseline_has_its_own_start(longest, monkeypatch, tmp_path):
    tried = fake_tries(longest, monkeypatch, limit=4096)
    args, passed = longest.parse_args(["--start", "65536", "--start-hf", "2048", "--out", str(tmp_path / "o.json")])
    found = longest.search("hf", args, passed, tmp_path, lambda: None)
    assert tried[:3] == [2048, 4096, 8192] and found["longest_trained"] == 4096


def test_a_start_that_fails_halves_down_then_bisects(longest, monkeypatch, tmp_path):
    tried = fake_tries(longest, monkeypatch, limit=100_000)
    found = search(longest, tmp_path, "--start", "262144", "--resolution", "0.25")
    assert tried[:3] == [262144, 131072, 65536]
    assert found["longest_trained"] <= 100_000 < found["first_failed"] <= 1.25 * found["longest_trained"]
