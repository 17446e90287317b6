"""Method options are validated at plan time, with the option's dotted path and a fix."""

from __future__ import annotations

import pytest

from dist_ft.cli import main
from dist_ft.plan.method_options import trainable_params
from dist_ft.plan.plan import make_plan
from dist_ft.plan.plan_report import format_plan
from dist_ft.recipe.config import MethodOptions, recipe_from_dict
from dist_ft.recipe.model_shape import CATALOGUE, shape_from_config
from tests.conftest import LAUNCH, demo_raw
from tests import helpers


def lora_demo() -> dict:
    """The demo recipe with a LoRA fine-tune (the demo itself trains all weights: docs/demo.md), the
    options these tests change from."""
    raw = demo_raw()
    raw["finetune"].update(method="lora", options={"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": "all-linear"})
    return raw


def finetune_only() -> dict:
    raw = lora_demo()
    raw.pop("long_context")
    raw.pop("evaluation")
    return raw


def plan_of(overrides=(), shape="inline", raw=None):
    return helpers.plan_of(overrides, raw or lora_demo(), shape)


def problems_of(overrides, shape="inline"):
    return helpers.problems_of(overrides, lora_demo(), shape)


@pytest.mark.parametrize("method, option, value, methods", [
    ("lora", "prefix_projection", "true", "prefix"),
    ("prefix", "use_rslora", "true", "lora, qlora, dora, longlora"),
    ("ia3", "layers_to_transform", "[0]", "lora, qlora, dora, longlora"),
    ("lora", "prompt_tuning_init_text", "Answer", "prompt"),
    ("prompt", "encoder_reparameterization_type", "LSTM", "ptuning"),
    ("bitfit", "modules_to_save", "[lm_head]", "lora, qlora, dora, longlora, ia3, prefix, prompt, ptuning"),
    ("full", "bias", "all", "lora, qlora, dora, longlora"),
    ("ptuning", "init_lora_weights", "gaussian", "lora, qlora, dora, longlora"),
])
def test_an_option_of_another_method_is_an_error_naming_its_path(method, option, value, methods):
    found = problems_of([f"finetune.method={method}", f"finetune.options.{option}={value}",
                         "finetune.data.packing=false"])
    problem = found[f"finetune.options.{option}"]
    assert problem.what.startswith("applies to method") and methods in problem.what and method in problem.what


def test_the_older_options_only_warn_when_another_method_ignores_them():
    plan = plan_of(["finetune.method=prompt", "finetune.data.packing=false"])  # demo sets r, alpha, dropout
    assert any(w.startswith("finetune.options.r applies to methods lora") for w in plan.warnings)


def test_layers_to_transform_must_be_layers_of_the_model():
    found = problems_of(["finetune.options.layers_to_transform=[0, 2, 5]"])
    assert "[2, 5] are beyond the model's 2 layers" in found["finetune.options.layers_to_transform"].what
    assert plan_of(["finetune.options.layers_to_transform=[1]"])


def test_modules_to_save_must_name_modules_of_the_model_with_a_suggestion():
    found = problems_of(["finetune.options.modules_to_save=[lm_haed, norm]"])
    problem = found["finetune.options.modules_to_save[0]"]
    assert "names no module" in problem.what and "lm_head" in problem.fix
    assert "finetune.options.modules_to_save[1]" not in found


def test_unknown_layouts_leave_module_names_to_the_rank():
    gpt2 = shape_from_config({"model_type": "gpt2", "n_embd": 64, "n_layer": 2, "n_head": 4, "vocab_size": 259,
                              "n_positions": 1024}, "test")
    assert not gpt2.exact_layout
    plan = plan_of(["finetune.options.modules_to_save=[ln_f]"], shape=gpt2, raw=finetune_only())
    assert plan.stage("sft").method_options.modules_to_save == ["ln_f"]


@pytest.mark.parametrize("overrides, path, words", [
    (["finetune.options.target_modules=.*mlp.*"], "finetune.options.target_modules", "not a linear layer"),
    (["finetune.options.target_modules=[nothing_proj]"], "finetune.options.target_modules", "no linear layer"),
    (["finetune.options.target_modules=[q_proj]", "finetune.options.modules_to_save=[self_attn]"],
     "finetune.options.target_modules", "modules_to_save"),
    (["finetune.options.target_modules=(unclosed"], "finetune.options.target_modules", "not a regular expression"),
    (["finetune.options.target_modules=.*_proj", "finetune.options.layers_to_transform=[0]"],
     "finetune.options.layers_to_transform", "regular expression"),
    (["finetune.options.layers_to_transform=[]"], "finetune.options.layers_to_transform", "empty"),
    (["finetune.options.modules_to_save=[lm_head, lm_head]"], "finetune.options.modules_to_save", "twice"),
    (["finetune.options.prompt_tuning_init_text=' '", "finetune.method=prompt"],
     "finetune.options.prompt_tuning_init_text", "empty"),
    (["finetune.options.encoder_reparameterization_type=GRU"], "finetune.options.encoder_reparameterization_type",
     "not one of MLP, LSTM"),
    (["finetune.options.init_lora_weights=loftq"], "finetune.options.init_lora_weights", "not one of"),
])
def test_bad_values_are_refused_with_their_path(overrides, path, words):
    found = problems_of(overrides)
    assert words in found[path].what


@pytest.mark.parametrize("init", ["pissa", "olora"])
@pytest.mark.parametrize("overrides, words", [
    (["finetune.method=dora"], "does not combine with dora"),
    (["finetune.method=qlora", "cluster.gpus_per_node=1", "cluster.procs_per_node=1", "model.dtype=bf16"],
     "does not combine with qlora"),
    (["parallelism.zero_stage=3"], "ZeRO-3"),
])
def test_pissa_and_olora_refuse_what_cannot_export_or_initialise(init, overrides, words):
    found = problems_of([f"finetune.options.init_lora_weights={init}", *overrides])
    assert words in found["finetune.options.init_lora_weights"].what


def test_pissa_under_bf16_warns_about_the_rounding_and_fp32_is_quiet():
    assert not any("init_lora_weights" in w for w in
                   plan_of(["finetune.options.init_lora_weights=pissa"]).warnings)  # the demo trains in fp32
    bf16 = plan_of(["finetune.options.init_lora_weights=pissa", "model.dtype=bf16"])
    assert any("rounded to bf16" in w for w in bf16.warnings)


def test_the_report_prints_each_stages_trainable_parameters():
    plan = plan_of(["finetune.options.modules_to_save=[lm_head]"])
    shape = plan.model_shape
    lora = trainable_params(shape, "lora", plan.stage("sft").method_options)
    text = format_plan(plan, "python3")
    assert f"trainable: {shape.num_params:,} parameters (100% of the model's {shape.num_params:,})" in text
    percent = 100 * lora / shape.num_params
    assert f"trainable: {lora:,} parameters ({percent:.3g}% of the model's {shape.num_params:,})" in text


def test_the_report_without_a_model_shape_says_so():
    recipe = recipe_from_dict(finetune_only())
    text = format_plan(make_plan(recipe, None, "/tmp/run"), "python3")
    assert "trainable: unknown (model config not readable)" in text


def test_the_catalogued_8b_lora_count():
    """Llama-3-8B, LoRA r 16 on all linear layers: the well-known 41.9M."""
    shape = shape_from_config(CATALOGUE["meta-llama/Meta-Llama-3-8B"], "test")
    assert trainable_params(shape, "lora", MethodOptions(r=16)) == 41_943_040
    assert shape.num_params == 8_030_261_248


def test_the_catalogued_smollm2_counts_are_the_ones_the_methods_benchmark_measured():
    """docs/methods.md: trainable parameters that benchmarks/methods.py read from the real model."""
    shape = shape_from_config(CATALOGUE["HuggingFaceTB/SmolLM2-135M-Instruct"], "test")
    opts = MethodOptions(r=16)
    assert [trainable_params(shape, m, opts) for m in ("lora", "dora", "full")] == \
        [4_884_480, 5_040_000, 134_515_008]


def test_dist_ft_plan_prints_the_trainable_line(capsys, tmp_path):
    recipe = tmp_path / "demo.yaml"
    recipe.write_text((LAUNCH / "demo.yaml").read_text().replace("[data/", f"[{LAUNCH}/data/"))
    assert main(["plan", str(recipe)]) == 0
    assert capsys.readouterr().out.count("    trainable: ") == 3


def test_bitfit_on_a_model_without_biases_is_refused_at_plan_time():
    """It used to pass the planner and fail on every rank once the model was built."""
    problem = problems_of(["finetune.method=bitfit", "model.config.attention_bias=false"])["finetune.method"]
    assert "has none" in problem.what and "lora" in problem.fix
    plan = plan_of(["finetune.method=bitfit", "model.config.attention_bias=true"])
    assert plan.stages[-1].method == "bitfit"
