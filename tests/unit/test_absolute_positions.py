"""Learned position tables (GPT-2 style) grow past their pre-training length, export and reload as trained."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from dist_ft.recipe.config import recipe_from_dict
from dist_ft.rank.data import pack_documents
from dist_ft.rank.model import build_model, export_model_dir
from dist_ft.recipe.model_shape import shape_from_config
from dist_ft.plan.plan import make_plan
from dist_ft.rank.positions import grown_rows, position_table
from dist_ft.rank.stage_model import build_stage_model
from dist_ft.recipe.strict import RecipeError
from dist_ft.rank.tokenizer import byte_tokenizer

OLD, NEW = 64, 128
GPT2 = {"model_type": "gpt2", "n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": OLD, "vocab_size": 259,
        "bos_token_id": 256, "eos_token_id": 257}
OPT = {"model_type": "opt", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "ffn_dim": 64,
       "word_embed_proj_dim": 32, "max_position_embeddings": OLD, "vocab_size": 259, "bos_token_id": 256,
       "eos_token_id": 257, "pad_token_id": 258}
TABLE = torch.arange(4 * 3, dtype=torch.float32).reshape(4, 3) ** 1.5  # 4 positions, 3 dimensions
IDS = torch.randint(0, 256, (1, NEW), generator=torch.Generator().manual_seed(0))


def logits(model, ids=IDS):
    with torch.no_grad():
        return model.eval()(input_ids=ids, use_cache=False).logits


def table(model):
    embedding, offset = position_table(model)
    return embedding.weight.detach()[offset:]


# ---- the table maths ----------------------------------------------------------------------------

def test_interpolate_resamples_the_table_over_the_new_length():
    grown = grown_rows(TABLE, 7, "interpolate")  # new row i reads old position i * 3 / 6 = i / 2
    assert grown.shape == (7, 3)
    torch.testing.assert_close(grown[0::2], TABLE)  # whole old positions land on even rows, unchanged
    torch.testing.assert_close(grown[1::2], (TABLE[:-1] + TABLE[1:]) / 2)  # half positions: midpoints


def test_copy_keeps_the_rows_and_repeats_them():
    grown = grown_rows(TABLE, 10, "copy")
    assert torch.equal(grown[:4], TABLE) and torch.equal(grown[4:8], TABLE) and torch.equal(grown[8:], TABLE[:2])


def test_init_keeps_the_rows_and_draws_new_ones_seeded_at_their_scale():
    grown = grown_rows(TABLE, 4 + 2000, "init", seed=3)
    assert torch.equal(grown[:4], TABLE) and torch.equal(grown, grown_rows(TABLE, 2004, "init", seed=3))
    torch.testing.assert_close(grown[4:].mean(0), TABLE.mean(0), atol=0.1 * TABLE.std(0).max(), rtol=0)
    torch.testing.assert_close(grown[4:].std(0), TABLE.std(0), rtol=0.1, atol=0)


def test_bf16_tables_keep_their_dtype_and_shrinking_is_refused():
    assert grown_rows(TABLE.bfloat16(), 9, "interpolate").dtype == torch.bfloat16
    with pytest.raises(ValueError, match="cannot shrink"):
        grown_rows(TABLE, 3, "copy")


# ---- the model ----------------------------------------------------------------------------------

def tiny(config=GPT2, **kwargs):
    return build_model(name_or_path=None, config_overrides=config, attn_implementation="sdpa", **kwargs)


@pytest.mark.parametrize("config", [GPT2, OPT], ids=["gpt2", "opt"])
def test_copy_grows_the_table_keeping_every_old_row_and_runs_at_the_new_length(config):
    old = table(tiny(config))
    model = tiny(config, max_position_embeddings=NEW, extend_positions="copy")
    assert model.config.max_position_embeddings == NEW and table(model).shape == (NEW, old.shape[1])
    assert torch.equal(table(model)[:OLD], old) and torch.equal(table(model)[OLD:], old)
    assert logits(model).shape == (1, NEW, 259)
    with pytest.raises(IndexError):  # the unextended table has no row for position 64
        logits(tiny(config))


def test_interpolate_stretches_the_table_and_keeps_its_ends():
    old = table(tiny())
    grown = table(tiny(max_position_embeddings=NEW, extend_positions="interpolate"))
    assert torch.equal(grown[0], old[0]) and torch.equal(grown[-1], old[-1])
    torch.testing.assert_close(grown, grown_rows(old, NEW, "interpolate"))


def test_a_longer_table_needs_an_explicit_choice():
    with pytest.raises(ValueError, match="learned table of 64 positions"):
        tiny(max_position_embeddings=NEW)


def test_export_declares_the_grown_table_and_reloads_with_identical_logits(tmp_path):
    model = tiny(max_position_embeddings=NEW, extend_positions="interpolate")
    export_model_dir(model, byte_tokenizer(), tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["n_positions"] == NEW and not {"rope_parameters", "rope_scaling", "rope_theta"} & set(saved)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert torch.equal(table(reloaded), table(model))
    assert torch.equal(logits(reloaded), logits(model))


# ---- the trainer's path: plan → stage model ------------------------------------------------------

def gpt2_recipe(extend="interpolate", seq_len=NEW, rope=None):
    stage = {"name": "ctx", "seq_len": seq_len, "steps": 1, "extend_positions": extend,
             **({"rope": rope} if rope else {})}
    return recipe_from_dict({"name": "gpt2", "model": {"config": GPT2, "tokenizer": "byte", "dtype": "fp32",
                                                       "attn_implementation": "sdpa"},
                             "long_context": {"tokens_per_step": 2 * seq_len, "data": {"paths": ["package:json"]},
                                              "stages": [stage]},
                             "cluster": {"procs_per_node": 1}})


def plan_of(recipe):
    return make_plan(recipe, shape_from_config(recipe.model.config, "test"), "/tmp/run")


def test_the_plan_grows_the_table_and_the_stage_model_has_it():
    plan = plan_of(gpt2_recipe("copy"))
    stage = plan.stage("ctx")
    assert (stage.rope_parameters, stage.max_position_embeddings, stage.extend_positions) == ({}, NEW, "copy")
    model = build_stage_model(plan, stage, {"zero_optimization": {"stage": 2}}, byte_tokenizer())
    assert table(model).shape[0] == NEW and logits(model).shape == (1, NEW, 259)


@pytest.mark.parametrize("recipe, path, message", [
    (gpt2_recipe("none"), "long_context.stages[0].extend_positions", "learned table of 64 positions"),
    (gpt2_recipe(rope={"type": "yarn"}), "long_context.stages[0].rope.type", "has no RoPE to scale"),
    (gpt2_recipe(rope={"rope_theta": 500000.0}), "long_context.stages[0].rope.rope_theta", "no RoPE base"),
])
def test_the_plan_refuses_rope_on_learned_positions_and_an_unchosen_growth(recipe, path, message):
    with pytest.raises(RecipeError) as err:
        plan_of(recipe)
    assert any(p.path == path and message in p.what and p.fix for p in err.value.problems), err.value


def test_a_table_long_enough_needs_no_choice():
    assert plan_of(gpt2_recipe("none", seq_len=OLD)).stage("ctx").max_position_embeddings == OLD


# ---- packing: gpt2 separates documents by position_ids too ---------------------------------------

@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_gpt2_documents_see_only_themselves(attn):
    model = build_model(name_or_path=None, config_overrides=GPT2, attn_implementation=attn).eval()
    documents = [[(5 * i + j) % 250 for j in range(n)] for i, n in enumerate((9, 12, 5, 10))]
    (row,) = pack_documents(documents, 48, 257, pad_id=258)
    starts = [i for i, p in enumerate(row["position_ids"]) if p == 0]
    assert len(starts) == 4
    packed = model(input_ids=torch.tensor([row["input_ids"]]), position_ids=torch.tensor([row["position_ids"]]),
                   use_cache=False).logits[0]
    for start, end in zip(starts, starts[1:] + [48]):
        alone = logits(model, torch.tensor([row["input_ids"][start:end]]))[0]
        torch.testing.assert_close(packed[start:end], alone, atol=1e-5, rtol=0)
