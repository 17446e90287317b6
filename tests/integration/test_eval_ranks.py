"""The after-stage evaluation divided among 2 gloo ranks gives the numbers of one process (fp32, 1e-4),
including when one rank gets no window at all (it still joins the one all-reduce)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dist_ft.evaluation.evaluate import run_eval
from dist_ft.rank.model import build_model
from dist_ft.rank.tokenizer import BYTE_VOCAB_SIZE, byte_tokenizer
from tests.helpers import tiny_llama
from tests.integration import eval_worker
from tests.integration.training_helpers import run_worker

pytestmark = pytest.mark.integration


def numbers(results: dict) -> dict[str, float]:
    """Every perplexity (overall, per window, per band) and passkey accuracy, by a readable key."""
    flat = {}
    for length, row in results["variants"]["keep"]["perplexity"].items():
        flat[f"ppl@{length}"] = row["ppl"]
        flat.update({f"ppl@{length}/window{i}": v for i, v in enumerate(row["window_ppl"])})
        flat.update({f"ppl@{length}/{b['band']}": b["ppl"] for b in row["bands"]})
        flat.update({f"tokens@{length}/{b['band']}": b["tokens"] for b in row["bands"]})
    for length, row in results["variants"]["keep"]["passkey"].items():
        flat.update({f"passkey@{length}/{d}": v for d, v in row.items()})
    return flat


def test_two_ranks_give_the_numbers_of_one_process(tmp_path):
    model_dir = tmp_path / "model"
    build_model(name_or_path=None, config_overrides=tiny_llama(max_position_embeddings=128,
                vocab_size=BYTE_VOCAB_SIZE), attn_implementation="sdpa", seed=3).save_pretrained(model_dir)
    byte_tokenizer().save_pretrained(model_dir)
    run_worker(Path(eval_worker.__file__), [str(model_dir), str(tmp_path / "ranks")], nproc=2, timeout=120,
               what="the shared evaluation hung")
    for name, request in eval_worker.requests(str(model_dir), tmp_path / "alone").items():
        shared = json.loads((tmp_path / "ranks" / f"{name}.json").read_text())
        alone = run_eval(request)
        assert (shared["ranks"], alone["ranks"]) == (2, 1)
        assert numbers(shared).keys() == numbers(alone).keys()
        assert numbers(shared) == pytest.approx(numbers(alone), rel=1e-4), name
    assert len(numbers(alone)) == 1 + 1 + 3 * 2  # one_window: overall, its window, 3 bands (ppl and tokens)
