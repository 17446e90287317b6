"""A long-context stage on 2 ranks under ZeRO-3 (the linear weights and the head partitioned: the band pass
calls the model's modules outside the engine) validates every eval_every steps by position band, and the train command then
evaluates the export on both ranks of the same job."""

from __future__ import annotations

import json

import pytest

from tests.integration.training_helpers import metric_rows, render, tiny_recipe, train

pytestmark = pytest.mark.integration


def test_long_context_validation_by_band_and_the_after_stage_evaluation_on_two_ranks(tmp_path):
    run = tmp_path / "validated"
    raw = tiny_recipe(zero=3, steps=4, every=None, ranks=2)
    raw["long_context"]["data"]["validation_fraction"] = 0.1
    raw["long_context"]["eval_every"] = 2
    raw["evaluation"] = {"after_each_stage": True, "lengths": [128], "passkey_lengths": [], "windows": 2}
    render(raw, run)
    out = train(run, "ctx", nproc=2).stdout
    rows = [r for r in metric_rows(run, "ctx") if "eval_loss" in r]
    assert [r["step"] for r in rows] == [2, 4]
    bands = ["0-64", "64-128", "128-256"]  # quarters of 256, cut at the model's native 128
    for row in rows:
        assert {f"eval_loss_{b}" for b in bands} | {f"eval_ppl_{b}" for b in bands} | {"eval_perplexity"} <= set(row)
    assert rows[1]["eval_loss_0-64"] < rows[0]["eval_loss_0-64"]  # it learns
    results = json.loads((run / "eval" / "ctx" / "results.json").read_text())
    assert (results["ranks"], results["variants"]["keep"]["perplexity"]["128"]["windows"]) == (2, 2)
    assert f"[eval] {raw['name']}/ctx: RoPE keep, fp32 on cpu (2 ranks)" in out
