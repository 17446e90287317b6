"""`benchmarks/gpu_check.sh --smoke`: every step of the device check runs on CPU and writes its result, with
the fields a device run will be read for — so a typo never burns device time."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.integration, pytest.mark.slow]  # ~2.5 min: eight torchrun starts


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("gpu_check")
    env = {**os.environ, "PYTHON": sys.executable, "GPU_CHECK_WORK": str(out.parent / "gpu_check_work"),
           "PYTHONPATH": str(ROOT)}
    result = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--smoke", str(out)], env=env,
                            capture_output=True, text=True, timeout=900)
    log = (out / "gpu_check.log").read_text() if (out / "gpu_check.log").exists() else ""
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:] + log[-6000:]
    return out


def read(out: Path, name: str) -> dict:
    return json.loads((out / name).read_text())


def test_every_step_ran_and_the_files_fit_what_the_device_tool_returns(smoke):
    summary = read(smoke, "summary.json")
    assert [(s["step"], s["status"]) for s in summary["steps"]] == [
        (name, "ok") for name in ("env", "pytest", "demo", "throughput", "longest", "extension")]
    assert len(list(smoke.iterdir())) <= 8  # the device tool brings back at most 8 files from $OUT
    assert set(summary["targets"]) == {"longest_tokens", "mfu_at_32k", "memory_ratio"}
    assert summary["targets"]["mfu_at_32k"]["measured"] is None  # no 32k row in a smoke run: nothing invented


def test_env_names_the_versions(smoke):
    env = read(smoke, "01-env.json")
    assert env["torch"] == torch.__version__ and env["versions"]["deepspeed"]
    assert env["cuda_available"] is False and env["device_name"] is None
    assert {"flash-attn", "bitsandbytes", "liger-kernel"} <= set(env["versions"])


def test_gpu_tests_are_collected_and_skipped_with_their_reason(smoke):
    cases = ET.parse(smoke / "02-pytest.xml").getroot().iter("testcase")
    outcome = {f"{c.get('classname')}.{c.get('name')}": [child for child in c] for c in cases}
    names = " ".join(outcome)
    for expected in ("test_varlen_attention_equals_masked_sdpa_on_packed_rows", "test_bf16_zero_stage_trains",
                     "test_qlora_lora_gradients_are_non_zero_on_cuda", "test_liger_fused_head_equals_the_chunked_loss",
                     "test_eval_runs_on_the_gpu"):
        assert expected in names
    for name, children in outcome.items():
        assert [c.tag for c in children] == ["skipped"], name
        assert "CUDA" in children[0].get("message") or "Triton" in children[0].get("message"), name


def test_demo_trained_every_stage(smoke):
    demo = read(smoke, "03-demo.json")
    assert demo["all_done"] and [s["stage"] for s in demo["stages"]] == ["ctx512", "sft"]
    for stage in demo["stages"]:
        assert len(stage["losses"]) == 2 and all(math.isfinite(x) for x in stage["losses"])
        assert stage["device"] == "cpu" and stage["step_time_s"] > 0 and stage["peak_memory_gib"] > 0


def test_throughput_has_both_sides_and_the_flops(smoke):
    result = read(smoke, "04-throughput.json")
    assert result["settings"]["zero_stage"] == 3 and result["settings"]["hf_checkpointing"]
    row = result["results"][0]
    for side in ("ours", "hf"):
        assert row[side]["tokens_per_s"] > 0 and row[side]["model_tflops_per_rank"] > 0
        assert row[side]["mfu"] is None  # a CPU has no bf16 peak in the table: no MFU made up
    assert abs(row["ours"]["loss_step1"] - row["hf"]["loss_step1"]) < 1e-3 and row["mem_ratio"] > 0


def test_longest_sequence_tried_each_side(smoke):
    sides = read(smoke, "05-longest.json")["sides"]
    for side in ("ours", "hf"):
        assert sides[side]["longest_trained"] == 256 and sides[side]["tries"][0]["peak_memory_gib"] > 0


def test_extension_has_every_variant_and_the_stage_before_and_after(smoke):
    ext = read(smoke, "06-extension.json")
    assert set(ext["variants"]) == {"none", "yarnx2", "yarnx4"}
    for variant in ext["variants"].values():
        assert set(variant["ppl"]) == {"256", "512"} and variant["passkey_trials"] == 5
        assert all(math.isfinite(v["all"]) for v in variant["ppl"].values())
    cpt = ext["continued_pretraining"]
    assert cpt["stages"][0] == "base" and len(cpt["stages"]) == 2
    assert all(row["ppl"]["512"]["bands"] for row in cpt["rows"])
