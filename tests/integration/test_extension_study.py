"""The extension study's central inequality, on its short `ci` profile (benchmarks/extension_study.py).

Pretrain a tiny Llama at a native context of 128 (two CPU ranks through `dist-ft launch`), continue it at
512 with YaRN (x4), and evaluate on held-out stdlib modules: after the stage, the band beyond the native
context must be about as good as the in-window band, and better than YaRN applied zero-shot.
Measured figures and the margin's origin: docs/extension-study.md.
"""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

STUDY = Path(__file__).resolve().parents[2] / "benchmarks" / "extension_study.py"
# beyond-native / in-window band perplexity after the YaRN stage: 0.988 in both runs that printed it (old and
# current core code, identical figures: 13.54 -> 12.53 in the beyond band); this test passed on a third.
# 1.15 leaves room for another machine's arithmetic and thread count. Runtime: 71 s on a lightly loaded
# machine, 2.4-2.6 min with the 2 cores shared by other sessions' runs.
MARGIN = 1.15


def _study_module():
    spec = importlib.util.spec_from_file_location("extension_study", STUDY)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_after_a_yarn_stage_the_extended_band_is_near_the_window_and_beats_zero_shot(tmp_path):
    study_mod = _study_module()
    profile = study_mod.PROFILES["ci"]
    study = study_mod.run_study("ci", tmp_path / "study")
    native, long = profile.native, profile.native * profile.factor

    trained, zero = study.trained["yarn"], study.zero_shot["yarn"]
    in_window = study_mod.band(trained, long, 0)
    beyond = study_mod.band(trained, long, 2 * native)  # positions [2n, 4n): never seen before the stage
    zero_beyond = study_mod.band(zero, long, 2 * native)
    windows = trained["perplexity"][str(long)]["windows"]
    assert windows >= 8 and beyond["tokens"] == (long - 2 * native) * windows
    assert all(math.isfinite(b["ppl"]) for b in (in_window, beyond, zero_beyond))

    assert beyond["ppl"] <= MARGIN * in_window["ppl"], (beyond["ppl"], in_window["ppl"])
    assert beyond["ppl"] < zero_beyond["ppl"], (beyond["ppl"], zero_beyond["ppl"])
    # not one lucky window: most held-out windows improve over zero-shot in the extended band
    better = sum(t < z for t, z in zip(beyond["window_ppl"], zero_beyond["window_ppl"]))
    assert better >= 0.75 * len(beyond["window_ppl"]), (better, len(beyond["window_ppl"]))

    stage = study.runs["yarn"]["stages"][f"ctx{long}"]
    assert stage["tokens"] == profile.branch_tokens
