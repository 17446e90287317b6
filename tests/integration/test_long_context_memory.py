"""Peak memory of a real training step grows linearly with seq_len, not quadratically.

Each length trains one step in a fresh single-rank trainer (torchrun, DeepSpeed ZeRO-2) on packed
documents, with the recipe defaults that matter: `sdpa_varlen` attention and the chunked loss. The
rank's peak RSS is what it reports. glibc is told to serve big blocks by mmap so that freed tensors
leave the RSS at once, and the model is wide enough that the step, not the imports, sets the peak.

The quadratic term this guards against is attention's: with transformers' `sdpa` on packed rows (an
L×L block-diagonal mask) the peak of a forward+backward grew 0.10, 0.41, 1.58 GiB per doubling from 2k
to 16k tokens (measured in-process); with `sdpa_varlen`, 0.00, 0.04, 0.08. The 32k-vocabulary head
keeps the chunked loss's logits in the picture: one 1024-token chunk (0.37 GiB), whatever the length;
transformers' own loss would add 0.24 GiB per 1k tokens (a linear term, but the one that dominates
at long context; tests/unit/test_loss.py shows the chunked loss equals it).
"""

from __future__ import annotations

import os

import pytest

from tests.integration.training_helpers import free_port, metric_rows, render, tiny_recipe, torchrun_argv

pytestmark = [pytest.mark.integration, pytest.mark.slow]

LENGTHS = (4096, 8192, 16384)


def one_step_peak_gib(tmp_path, seq_len: int, intermediate_size: int = 512, name: str = "",
                      **model) -> tuple[float, dict]:
    import subprocess

    raw = tiny_recipe(zero=2, steps=1, every=None, ranks=1)
    raw["model"].update(dtype="fp32", loss_chunk_tokens=1024, **model)
    raw["model"]["config"].update(hidden_size=256, intermediate_size=intermediate_size, num_attention_heads=4,
                                  num_key_value_heads=2, vocab_size=32000, max_position_embeddings=seq_len)
    raw["long_context"]["tokens_per_step"] = seq_len
    stage = raw["long_context"]["stages"][0]
    stage.update(seq_len=seq_len, rope={"type": "none"})
    raw["tracking"] = {"mode": "disabled"}
    run = tmp_path / f"len{seq_len}{name}"
    plan = render(raw, run)
    env = dict(os.environ, OMP_NUM_THREADS="2", MALLOC_MMAP_THRESHOLD_="65536", WANDB_MODE="disabled")
    result = subprocess.run(torchrun_argv(run, "ctx", 1, free_port()), env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    (row,) = [r for r in metric_rows(run, "ctx") if "peak_memory_gib" in r]
    return row["peak_memory_gib"], plan.stages[0].memory


def test_peak_memory_grows_linearly_with_seq_len(tmp_path):
    measured = {n: one_step_peak_gib(tmp_path, n) for n in LENGTHS}
    peaks = [measured[n][0] for n in LENGTHS]
    first, second = peaks[1] - peaks[0], peaks[2] - peaks[1]
    print(f"peak RSS GiB at {LENGTHS}: {peaks}; increments {first:.3f}, {second:.3f}")
    assert first > 0.02, f"no growth measured: {peaks}"
    # Doubling seq_len doubles a linear increment; a quadratic term would quadruple it.
    assert second < 2.7 * first, f"superlinear growth: {peaks}"
    # The plan's estimate of what grows with seq_len (activations, logits) tracks the measurement.
    planned = [measured[n][1]["activations_gib"] + measured[n][1]["logits_gib"] for n in LENGTHS]
    assert planned[2] - planned[1] == pytest.approx(second, rel=0.6), (planned, peaks)


def test_tiled_mlp_frees_what_the_plan_says(tmp_path):
    """DeepSpeed's TiledMLP through our trainer: at 8k tokens with a wide MLP (2048 channels, fp32) each
    layer's SwiGLU intermediates are 8192 × 5 × 2048 × 4 B = 0.31 GiB; over 1024-token tiles only one
    tile's exist. The measured saving matches the plan's activations estimate."""
    plain, plain_plan = one_step_peak_gib(tmp_path, 8192, intermediate_size=2048, name="plain")
    tiled, tiled_plan = one_step_peak_gib(tmp_path, 8192, intermediate_size=2048, name="tiled",
                                          tiled_mlp_tokens=1024)
    planned = plain_plan["activations_gib"] - tiled_plan["activations_gib"]
    print(f"peak RSS GiB at 8k: plain {plain:.3f}, tiled {tiled:.3f}; planned saving {planned:.3f}")
    assert planned > 0.3
    assert plain - tiled == pytest.approx(planned, rel=0.5)
