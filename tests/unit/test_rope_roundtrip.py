"""Every RoPE kind, built the way the trainer builds a stage, survives export → plain transformers load.

For each kind a tiny random Llama with a 64-token window is planned, built through
`stage_model.build_stage_model` and exported with `export_model_dir` (what `export_stage`
calls). The reloaded model must give the same logits as the trained one at 3× the
original window, and those logits must differ from the unscaled model's: a RoPE setting
that got lost on the way would fail the test.
"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from dist_ft.recipe.config import recipe_from_dict
from dist_ft.rank.model import build_model, export_model_dir
from dist_ft.recipe.model_shape import shape_from_config
from dist_ft.plan.plan import make_plan
from dist_ft.rank.stage_model import build_stage_model
from dist_ft.rank.tokenizer import byte_tokenizer
from tests.helpers import tiny_llama

ORIGINAL, SEQ_LEN, PROBE = 64, 128, 192  # probe at 3× the original window
TINY = tiny_llama(max_position_embeddings=ORIGINAL)
HALF_HEAD = TINY["hidden_size"] // TINY["num_attention_heads"] // 2
LONGROPE = {"type": "longrope", "short_factor": [1.0, 1.1, 1.3, 1.6][:HALF_HEAD],
            "long_factor": [1.0, 1.5, 2.5, 4.0][:HALF_HEAD]}
KINDS = {
    "linear": {"type": "linear"},
    "dynamic": {"type": "dynamic"},
    "yarn": {"type": "yarn"},
    "llama3": {"type": "llama3", "low_freq_factor": 1.0, "high_freq_factor": 4.0},
    "longrope": LONGROPE,
    "theta_raise": {"type": "none", "rope_theta": 500000.0},
}
USES_ORIGINAL = ("linear", "yarn", "llama3", "longrope")
DS_CONFIG = {"zero_optimization": {"stage": 2}}
IDS = torch.randint(0, 256, (1, PROBE), generator=torch.Generator().manual_seed(0))


def recipe(run_root, stages):
    return recipe_from_dict({
        "name": "rope", "model": {"config": TINY, "tokenizer": "byte", "dtype": "fp32", "attn_implementation": "sdpa"},
        "long_context": {"tokens_per_step": 2 * stages[-1]["seq_len"], "data": {"paths": ["package:json"]},
                         "stages": [{"steps": 1, **stage} for stage in stages]},
        "cluster": {"procs_per_node": 1}, "checkpointing": {"output_root": str(run_root)}})


def planned(tmp_path, stages):
    r = recipe(tmp_path, stages)
    return make_plan(r, shape_from_config(r.model.config, "test"), str(tmp_path / "run"))


def stage_model(plan, name):
    return build_stage_model(plan, plan.stage(name), DS_CONFIG, byte_tokenizer())


def export_dir(plan, name):
    return str(plan.run.stage(name).export)


def logits(model, ids=IDS):
    with torch.no_grad():
        return model.eval()(input_ids=ids, use_cache=False).logits


@pytest.fixture(scope="module")
def unscaled_logits():
    model = build_model(name_or_path=None, config_overrides=TINY, attn_implementation="sdpa", vocab_size=259)
    return logits(model)


@pytest.mark.parametrize("kind", KINDS)
def test_export_reload_gives_identical_logits_beyond_the_original_window(kind, tmp_path, unscaled_logits):
    plan = planned(tmp_path, [{"name": "ctx", "seq_len": SEQ_LEN, "rope": KINDS[kind]}])
    model = stage_model(plan, "ctx")
    out = export_model_dir(model, byte_tokenizer(), export_dir(plan, "ctx"))

    saved = json.loads((out / "config.json").read_text())
    rope = saved["rope_parameters"]
    assert saved["rope_theta"] == rope["rope_theta"] == KINDS[kind].get("rope_theta", 10000.0)
    if kind == "theta_raise":
        assert rope == {"rope_type": "default", "rope_theta": 500000.0} and "rope_scaling" not in saved
    else:
        assert rope["rope_type"] == saved["rope_scaling"]["rope_type"] == kind
        assert rope["factor"] == saved["rope_scaling"]["factor"] == SEQ_LEN / ORIGINAL
    if kind in USES_ORIGINAL:
        assert rope["original_max_position_embeddings"] == ORIGINAL
        assert saved["rope_scaling"]["original_max_position_embeddings"] == ORIGINAL
    if kind == "dynamic":  # transformers' dynamic NTK measures its original window by max_position_embeddings
        assert saved["max_position_embeddings"] == ORIGINAL
    else:
        assert saved["max_position_embeddings"] == SEQ_LEN

    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert reloaded.config.rope_parameters == model.config.rope_parameters
    trained = logits(model)
    assert torch.equal(logits(reloaded), trained)
    # Same seed, same weights: without the RoPE setting the logits would be bit-identical.
    assert (trained - unscaled_logits).abs().max() > 1e-5


def test_longrope_switches_factor_lists_at_the_original_window(tmp_path):
    plan = planned(tmp_path, [{"name": "ctx", "seq_len": SEQ_LEN, "rope": LONGROPE}])
    reloaded = AutoModelForCausalLM.from_pretrained(
        export_model_dir(stage_model(plan, "ctx"), None, export_dir(plan, "ctx")))
    rotary = reloaded.model.rotary_emb
    logits(reloaded, IDS[:, :ORIGINAL])
    short = rotary.inv_freq.clone()
    logits(reloaded)
    long = rotary.inv_freq.clone()
    ratio = short / long
    torch.testing.assert_close(ratio, torch.tensor(LONGROPE["long_factor"]) / torch.tensor(LONGROPE["short_factor"]))


def test_a_theta_raise_carries_into_later_stages_that_scale(tmp_path):
    plan = planned(tmp_path, [{"name": "theta", "seq_len": SEQ_LEN, "rope": KINDS["theta_raise"]},
                              {"name": "yarn", "seq_len": PROBE, "rope": {"type": "yarn"}}])
    assert plan.stage("yarn").rope_parameters["rope_theta"] == 500000.0
    export_model_dir(stage_model(plan, "theta"), byte_tokenizer(), export_dir(plan, "theta"))
    second = stage_model(plan, "yarn")  # built from the first stage's export, as the trainer does
    assert second.config.rope_parameters == {"rope_type": "yarn", "rope_theta": 500000.0,
                                             "factor": PROBE / ORIGINAL, "original_max_position_embeddings": ORIGINAL}
    reloaded = AutoModelForCausalLM.from_pretrained(export_model_dir(second, None, export_dir(plan, "yarn")))
    assert torch.equal(logits(reloaded), logits(second))


def test_a_stage_without_rope_keeps_the_scaling_the_model_has(tmp_path):
    plan = planned(tmp_path, [{"name": "yarn", "seq_len": SEQ_LEN, "rope": {"type": "yarn"}},
                              {"name": "plain", "seq_len": PROBE}])
    assert plan.stage("plain").rope_parameters == {}
    export_model_dir(stage_model(plan, "yarn"), byte_tokenizer(), export_dir(plan, "yarn"))
    kept = stage_model(plan, "plain").config.rope_parameters
    assert kept["rope_type"] == "yarn" and kept["factor"] == SEQ_LEN / ORIGINAL
