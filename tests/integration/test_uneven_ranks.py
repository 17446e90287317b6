"""Ranks whose data score different numbers of tokens, one of them none, under ZeRO-3 (and ZeRO-2),
with and without sequence parallelism and LoRA: every rank finishes the step, and the loss and
DeepSpeed's reduced gradients equal transformers' unchunked loss over all ranks' tokens together.

Before the chunk count was agreed across ranks, the rank with fewer chunks reached the next
collective while the other waited in the LM head's all-gather: these runs hung (the timeout below
turns a hang into a failure)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.integration import uneven_worker
from tests.integration.training_helpers import run_worker

pytestmark = pytest.mark.integration

VARIANTS = ("dp-none.zero2", "dp-none.zero3", "dp-few.zero3", "lora-none.zero3", "frozen-none.zero3",
            "tied-none.zero3", "sp-none.zero3")


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict[str, dict]:
    out = tmp_path_factory.mktemp("uneven")
    run_worker(Path(uneven_worker.__file__), [str(out), *VARIANTS], nproc=2, timeout=360,
               what="ranks with uneven data hung")
    return {variant: torch.load(out / f"{variant}.pt") for variant in VARIANTS}


def unchunked(variant: str) -> dict:
    """One process, no DeepSpeed: transformers' own loss over every rank's rows at once."""
    model = uneven_worker.build_model(variant)
    loss = model(**uneven_worker.reference_batch(variant), use_cache=False).loss
    loss.backward()
    return {"loss": loss.item(),
            "grads": {name: p.grad for name, p in model.named_parameters() if p.requires_grad}}


@pytest.mark.parametrize("variant", VARIANTS)
def test_uneven_ranks_finish_with_the_unchunked_loss_and_gradients(variant, results):
    got, want = results[variant], unchunked(variant)
    assert got["losses"] == pytest.approx([want["loss"]] * 2, abs=1e-6)  # the same mean on both ranks
    assert got["grads"].keys() == want["grads"].keys()
    error = sum(((got["grads"][k] - g) ** 2).sum() for k, g in want["grads"].items()) ** 0.5
    norm = sum((g ** 2).sum() for g in want["grads"].values()) ** 0.5
    assert error / norm < 1e-5, f"gradient relative error {error / norm:.2e}"


@pytest.mark.parametrize("variant", [v for v in VARIANTS if v.endswith("zero3")])
def test_zero3_runs_each_chunk_through_the_head_once(variant, results):
    """Under ZeRO-3 the head's weights are gathered once for every chunk, each chunk's gradients are taken
    while its logits exist, and a trainable Linear's gradient goes back through one call of it (the carrier):
    transformers' forward calls the head on no rows, then once per chunk, on the rank that scores nothing too,
    plus one carrier call for a plain trainable head (LoRA's carriers are its A and B, inside the head; a
    frozen head has none). A recompute would call the head twice per chunk."""
    chunks = agreed_chunks(variant)
    carrier = 0 if variant.startswith(("lora", "frozen")) else 1
    assert chunks >= 2
    assert results[variant]["head_calls"] == [1 + chunks + carrier] * 2


def agreed_chunks(variant: str) -> int:
    """The chunk count both ranks run: the larger rank's scored tokens over CHUNK_TOKENS."""
    family, kind = variant.split(".")[0].split("-")
    if family == "sp":  # rank r holds half of each row; its targets are the labels one position on
        labels, half = uneven_worker.sp_batch()["labels"], uneven_worker.sp_worker.SEQ_LEN // 2
        scored = [int((labels[:, 1:half + 1] != -100).sum()), int((labels[:, half + 1:] != -100).sum())]
    else:
        scored = [int((uneven_worker.rank_batch(kind, r)["labels"][:, 1:] != -100).sum()) for r in (0, 1)]
    return -(-max(scored) // uneven_worker.sp_worker.CHUNK_TOKENS)


def test_the_uneven_batches_really_are_uneven():
    """Rank 1 scores none (or 5) of the tokens rank 0 scores, across more than one chunk."""
    counts = {kind: [int((uneven_worker.rank_batch(kind, r)["labels"][:, 1:] != -100).sum()) for r in (0, 1)]
              for kind in ("none", "few")}
    assert counts["none"][1] == 0 and counts["few"][1] == 5
    assert counts["none"][0] > 2 * uneven_worker.sp_worker.CHUNK_TOKENS
    half = uneven_worker.sp_batch()["labels"][:, uneven_worker.sp_worker.SEQ_LEN // 2:]
    assert bool((half == -100).all())
