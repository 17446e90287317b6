"""Validation during a long-context stage (issue 27 item 4): the recipe key, the plan's default, the loss by
position band (exact against transformers' own logits) and the warnings that watch the losses."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from dist_ft.decoding.bands import band_edges
from dist_ft.rank.model import build_model
from dist_ft.rank.position_bands import LossWatch, band_losses
from dist_ft.rank.tokenizer import BYTE_VOCAB_SIZE
from dist_ft.recipe.config import apply_overrides, recipe_from_dict
from tests.conftest import demo_raw
from tests.helpers import plan_of, tiny_llama
from tests.unit.test_config import problems

WITH_VALIDATION = ["long_context.data.validation_fraction=0.05"]


def test_long_context_stages_validate_four_times_by_default_where_there_is_validation_data():
    assert [s.eval_every for s in plan_of(WITH_VALIDATION).stages] == [3, 3, 40]  # 12 steps each; sft's own 40
    assert [s.eval_every for s in plan_of([*WITH_VALIDATION, "long_context.eval_every=5"]).stages][:2] == [5, 5]
    assert [s.eval_every for s in plan_of(["long_context.data.validation_fraction=0"]).stages][:2] == [None, None]
    assert plan_of(WITH_VALIDATION).stages[0].metrics == ["loss", "perplexity"]


def test_eval_every_without_held_out_documents_is_refused_with_its_path():
    raw = apply_overrides(demo_raw(), ["long_context.data.validation_fraction=0", "long_context.eval_every=4"])
    problem = problems(raw)["long_context.eval_every"]
    assert problem.what == "has no held-out long documents to validate on"
    assert "long_context.data.validation_fraction: 0.05" in problem.fix
    recipe_from_dict(apply_overrides(demo_raw(), [*WITH_VALIDATION, "long_context.eval_every=4"]))  # accepted


def test_band_losses_equal_transformers_logits_by_document_position():
    """Two packed documents (positions restart at 0) and one unscored label: each band's mean NLL is what the
    model's own full logits give for the tokens whose document position lies in it."""
    model = build_model(name_or_path=None, config_overrides=tiny_llama(max_position_embeddings=64,
                        vocab_size=BYTE_VOCAB_SIZE), attn_implementation="sdpa", seed=1).eval()
    ids = torch.randint(0, BYTE_VOCAB_SIZE, (40,), generator=torch.Generator().manual_seed(0))
    positions = list(range(24)) + list(range(16))
    labels = ids.tolist()
    labels[24] = -100  # the second document's first token is never predicted from the first document
    row = {"input_ids": ids.tolist(), "position_ids": positions, "labels": labels}
    bands = band_edges(32, (), native=16)  # 0-8, 8-16, 16-32
    got = band_losses(model, [row], bands, "cpu")
    want = {}
    for doc, (start, end) in enumerate(((0, 24), (24, 40))):
        with torch.no_grad():
            logits = model(input_ids=ids[None, start:end], use_cache=False).logits[0, :-1]
        nll = F.cross_entropy(logits.double(), ids[start + 1:end], reduction="none")
        for position, value in zip(range(1, end - start), nll.tolist()):
            want.setdefault(next(b.label for b in bands if b.start <= position < b.end), []).append(value)
    assert sorted(got) == sorted([f"loss_{b}" for b in want] + [f"ppl_{b}" for b in want])
    for label, values in want.items():
        assert got[f"loss_{label}"] == pytest.approx(sum(values) / len(values), abs=1e-5)
        assert got[f"ppl_{label}"] == pytest.approx(math.exp(got[f"loss_{label}"]))
    assert (len(want["0-8"]), len(want["8-16"]), len(want["16-32"])) == (7 + 7, 8 + 8, 8)


def test_loss_watch_warns_on_a_spike_and_on_a_rising_validation_loss():
    watch = LossWatch()
    said = [watch.observe({"step": s, "loss": 2.0}) for s in range(1, 6)]
    said.append(watch.observe({"step": 6, "loss": 3.1}))
    said.append(watch.observe({"step": 6, "eval_loss": 2.5}))
    said.append(watch.observe({"step": 9, "eval_loss": 2.52}))  # +0.8 %: noise
    said.append(watch.observe({"step": 12, "eval_loss": 2.7}))
    assert said == [[]] * 5 + [["loss spike at step 6: 3.1000, 1.6x the mean of the last 5 steps (2.0000)"], [], [],
                               ["validation loss rose from 2.5200 (step 9) to 2.7000 (step 12), more than 2%"]]
