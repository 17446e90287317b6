"""The pure plan: batch arithmetic, RoPE per stage (checked against transformers), memory."""

import pytest

from dist_ft.recipe.model_shape import CATALOGUE, shape_from_config
from dist_ft.plan.plan import Plan
from dist_ft.recipe.strict import RecipeError
from tests.conftest import demo_raw
from tests.helpers import plan_of

LLAMA8B = shape_from_config(CATALOGUE["meta-llama/Meta-Llama-3-8B"], "test")




def test_global_batch_is_micro_times_accum_times_dp_and_tokens_follow_the_recipe():
    plan = plan_of(["cluster.procs_per_node=4", "long_context.tokens_per_step=8192"])
    for stage in plan.stages[:2]:
        assert stage.global_batch_size == stage.micro_batch_size * stage.grad_accum * plan.dp
        assert stage.tokens_per_step == 8192


def test_tokens_per_step_rounds_up_to_fill_every_rank_and_says_so():
    plan = plan_of(["cluster.procs_per_node=2", "long_context.tokens_per_step=512",
                    "long_context.progressive.start=512", "long_context.progressive.target=1024"])
    stage = plan.stage("ctx1k")
    assert stage.global_batch_size == 2 and stage.tokens_per_step == 2048
    assert any("ctx1k: 2048 tokens per step" in w for w in plan.warnings)


def test_steps_from_tokens():
    plan = plan_of(["long_context.progressive.steps=null", "long_context.progressive.tokens=40000"])
    assert plan.stage("ctx512").steps == 10  # ceil(40000 / 4096)


def test_rope_factor_is_derived_per_stage_and_finetune_keeps_the_last():
    plan = plan_of()
    assert [s.rope_parameters["factor"] for s in plan.stages] == [2.0, 4.0, 4.0]
    assert plan.stage("sft").rope_parameters == plan.stage("ctx1k").rope_parameters
    assert plan.stage("ctx1k").max_position_embeddings == 1024


@pytest.mark.parametrize("kind", ["linear", "dynamic", "yarn", "llama3"])
def test_rope_parameters_are_what_transformers_builds_a_rotary_embedding_from(kind):
    import torch
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    plan = plan_of([f"long_context.progressive.rope.type={kind}"])
    stage = plan.stage("ctx1k")
    base = dict(demo_raw()["model"]["config"])
    base.pop("model_type")
    cfg = LlamaConfig(**{**base, "max_position_embeddings": stage.max_position_embeddings,
                         "rope_parameters": stage.rope_parameters})
    scaled = LlamaRotaryEmbedding(cfg).inv_freq
    plain = LlamaRotaryEmbedding(LlamaConfig(**base)).inv_freq
    if kind == "linear":
        torch.testing.assert_close(scaled, plain / 4.0)
    elif kind == "dynamic":  # dynamic rescales at run time, beyond the original window
        torch.testing.assert_close(scaled, plain)
    else:  # yarn and llama3 keep the highest frequencies and stretch the lowest
        torch.testing.assert_close(scaled[0], plain[0])
        assert scaled[-1] < plain[-1]


def test_theta_raise_per_stage():
    plan = plan_of(["long_context.progressive.rope.type=linear", "long_context.progressive.rope.rope_theta=500000"])
    assert plan.stage("ctx512").rope_parameters["rope_theta"] == 500000.0


def test_a_stage_without_rope_keeps_the_models_own_and_a_theta_raise_carries_forward():
    stages = {"tokens_per_step": 4096, "data": {"paths": ["package:json"]},
              "stages": [{"name": "a", "seq_len": 512, "steps": 1, "rope": {"rope_theta": 500000}},
                         {"name": "b", "seq_len": 1024, "steps": 1, "rope": {"type": "yarn"}},
                         {"name": "c", "seq_len": 2048, "steps": 1}]}
    plan = plan_of(["finetune=null"], raw={**demo_raw(), "long_context": stages})
    assert plan.stage("a").rope_parameters == {"rope_theta": 500000.0}  # no type: the model's own scaling stays
    assert plan.stage("b").rope_parameters["rope_theta"] == 500000.0  # not the model's 10000 again
    assert plan.stage("c").rope_parameters == {}


def test_the_declared_context_covers_an_explicit_factor():
    plan = plan_of(["long_context.progressive.rope.factor=8"])
    assert plan.stage("ctx512").max_position_embeddings == 256 * 8


def test_packed_rows_under_flash_attention_get_one_row_per_micro_batch():
    gpu = ["cluster.gpus_per_node=1", "cluster.procs_per_node=1"]
    flash = plan_of([*gpu, "model.attn_implementation=flash_attention_2"])
    assert {s.micro_batch_size for s in flash.stages} == {1}
    assert flash.stage("ctx512").global_batch_size == 8  # the tokens per step stay, by accumulation
    sdpa = plan_of([*gpu, "model.attn_implementation=sdpa"])
    assert max(s.micro_batch_size for s in sdpa.stages) > 1
    unpacked = plan_of([*gpu, "model.attn_implementation=flash_attention_2", "finetune.data.packing=false"])
    assert unpacked.stage("sft").micro_batch_size > 1


def test_plan_round_trips_through_json():
    plan = plan_of()
    again = Plan.from_json(plan.to_json())
    assert again == plan and again.stage("sft").method == "full"


def test_memory_shrinks_with_zero_stage_and_sequence_parallel():
    raw = yaml_cluster_recipe()
    totals = {}
    for zero, sp in ((1, 1), (2, 1), (3, 1), (3, 4)):
        plan = plan_of([f"parallelism.zero_stage={zero}", f"parallelism.sequence_parallel={sp}",
                        "cluster.gpu_memory_gb=1000",
                        "long_context.progressive.start=32768", "long_context.progressive.target=32768"],
                       raw=raw, shape=LLAMA8B)
        stage = plan.stages[0]
        totals[(zero, sp)] = stage.memory["total_gib"] / stage.micro_batch_size
    assert totals[(1, 1)] > totals[(2, 1)] > totals[(3, 1)] > totals[(3, 4)]


def long_stage_memory(*overrides: str) -> dict:
    plan = plan_of(["cluster.gpu_memory_gb=1000", "parallelism.sequence_parallel=1",
                    "long_context.progressive.start=32768", "long_context.progressive.target=32768",
                    *overrides], raw=yaml_cluster_recipe(), shape=LLAMA8B)
    assert plan.stages[0].micro_batch_size == 1
    return plan.stages[0].memory


def test_activation_offload_moves_the_checkpoints_to_the_host():
    kept = long_stage_memory("model.gradient_checkpointing=true")
    offloaded = long_stage_memory("model.gradient_checkpointing=true", "model.offload_activations=true")
    checkpoints = 32 * 32768 * 4096 * 2 / 2**30  # layers × tokens × hidden × bf16
    assert offloaded["host_gib"] == pytest.approx(checkpoints, abs=0.01)
    assert kept["activations_gib"] - offloaded["activations_gib"] == pytest.approx(checkpoints, abs=0.01)
    assert offloaded["total_gib"] == pytest.approx(kept["total_gib"] - checkpoints, abs=0.01)


def test_tiled_mlp_shrinks_the_intermediates_to_one_tile():
    plain = long_stage_memory("model.gradient_checkpointing=true")
    tiled = long_stage_memory("model.gradient_checkpointing=true", "model.tiled_mlp_tokens=4096")
    intermediates = 32768 * 5 * 14336 * 2 / 2**30  # one layer's SwiGLU branches, bf16
    saved = plain["activations_gib"] - tiled["activations_gib"]
    assert saved == pytest.approx(intermediates * (1 - 4096 / 32768), abs=0.01)


def test_sdpa_on_packed_rows_adds_a_quadratic_mask_term():
    linear = long_stage_memory("model.attn_implementation=sdpa_varlen", "model.gradient_checkpointing=true")
    masked = long_stage_memory("model.attn_implementation=sdpa", "model.gradient_checkpointing=true")
    assert masked["activations_gib"] - linear["activations_gib"] == pytest.approx(32768**2 * (1 + 2) / 2**30, abs=0.01)


def test_a_plan_that_cannot_fit_the_gpu_is_an_error_naming_the_parts():
    with pytest.raises(RecipeError) as err:
        plan_of(["parallelism.zero_stage=1", "model.gradient_checkpointing=false", "parallelism.sequence_parallel=1",
                 "cluster.gpu_memory_gb=24"], raw=yaml_cluster_recipe(), shape=LLAMA8B)
    text = str(err.value)
    assert "GiB per GPU" in text and "activations" in text and "gradient_checkpointing" in text


def yaml_cluster_recipe():
    import yaml

    from tests.conftest import LAUNCH

    return yaml.safe_load((LAUNCH / "llama3-8b-64k-4node.yaml").read_text())


def test_the_fused_loss_holds_a_trainable_heads_fp32_gradient_where_it_chunks():
    """Full fine-tuning in several chunks, under ZeRO-2 and ZeRO-3 alike: the head's gradient
    (vocab x hidden x 4 B) waits from forward to backward; one chunk adds nothing."""
    head = LLAMA8B.vocab_size * LLAMA8B.hidden_size * 4 / 1024**3
    zero2, zero3 = long_stage_memory("parallelism.zero_stage=2"), long_stage_memory("parallelism.zero_stage=3")
    assert zero2["logits_gib"] == zero3["logits_gib"]
    one_chunk = long_stage_memory("model.loss_chunk_tokens=32768")
    per_row = (zero3["logits_gib"] - head) / 4096
    assert abs(one_chunk["logits_gib"] - 32768 * per_row) < 1e-2


def test_a_first_stage_inside_the_native_window_is_warned_about():
    """The flagship once spent a billion tokens at Llama-3's native 8k with YaRN factor 1.0."""
    plan = plan_of(["long_context.progressive.start=256"])  # the demo model's native window is 256
    assert [w for w in plan.warnings if "extends nothing" in w] == [
        "long_context.progressive: stage ctx256 trains at seq_len 256, inside the model's native 256 tokens: it "
        "extends nothing (its tokens are continued pretraining at a length the model already has); start the "
        "schedule above 256 or drop the stage"]
    assert not [w for w in plan_of().warnings if "extends nothing" in w]
    flagship = plan_of(raw=yaml_cluster_recipe(), shape=LLAMA8B)
    assert not [w for w in flagship.warnings if "extends nothing" in w]
    assert [(s.name, s.seq_len) for s in flagship.stages] == [("ctx16k", 16384), ("ctx32k", 32768),
                                                              ("ctx64k", 65536), ("chat-lora", 8192)]
