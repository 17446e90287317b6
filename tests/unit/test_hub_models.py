"""Models named by hub id, GGUF folders and paths that do not exist: the plan reads the local Hugging Face
cache (a pinned revision too) so ranks load a folder, and refuses what every rank would fail on."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dist_ft.plan.plan_recipe import plan_recipe
from dist_ft.recipe.strict import RecipeError
from tests.conftest import LAUNCH
from tests.helpers import demo_raw

CONFIG = demo_raw()["model"]["config"]  # the demo's tiny Llama

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hub_cache(tmp_path, monkeypatch) -> Path:
    """A Hugging Face cache holding acme/tiny-llama at `main` (COMMIT), as snapshot_download leaves it."""
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    repo = cache / "models--acme--tiny-llama"
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text(json.dumps(CONFIG))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


def plan(tmp_path: Path, **model):
    raw = demo_raw()
    raw["model"] = {k: v for k, v in raw["model"].items() if k != "config"} | model
    raw["finetune"]["data"]["paths"] = [str(LAUNCH / p) for p in raw["finetune"]["data"]["paths"]]
    raw["long_context"]["progressive"]["rope"]["original_max_position_embeddings"] = 256  # a config may be unread
    return plan_recipe(raw, tmp_path, lambda r: str(tmp_path / "run"), 23.0)


def problems(tmp_path: Path, **model) -> dict[str, str]:
    with pytest.raises(RecipeError) as err:
        plan(tmp_path, **model)
    return {p.path: f"{p.what} | {p.fix}" for p in err.value.problems}


def test_a_cached_hub_model_is_planned_from_its_snapshot_folder(tmp_path, hub_cache):
    recipe, p = plan(tmp_path, name_or_path="acme/tiny-llama", tokenizer="byte")
    snapshot = str(hub_cache / "models--acme--tiny-llama" / "snapshots" / COMMIT)
    assert recipe.model.name_or_path == p.model.name_or_path == snapshot
    assert p.model_shape is not None and p.model_shape.hidden_size == CONFIG["hidden_size"]
    assert not [w for w in p.warnings if "Hugging Face cache" in w]
    pinned, _ = plan(tmp_path, name_or_path="acme/tiny-llama", tokenizer="byte", revision=COMMIT)
    assert pinned.model.name_or_path == snapshot


def test_a_revision_the_cache_lacks_is_refused_with_the_command_that_fetches_it(tmp_path, hub_cache):
    found = problems(tmp_path, name_or_path="acme/tiny-llama", tokenizer="byte", revision="v2.0")
    assert {k: v for k, v in found.items() if k == "model.revision"} == {"model.revision": f"acme/tiny-llama at v2.0 is not in this machine's Hugging Face cache "
                     f"({hub_cache}) | fetch it once with `dist-ft prepare RECIPE` (HF_HOME on the shared file "
                     "system), or fix the revision"}


def test_an_uncached_hub_model_plans_with_a_warning_naming_what_the_ranks_need(tmp_path, hub_cache):
    _, p = plan(tmp_path, name_or_path="acme/not-here", tokenizer="byte")
    (warning,) = [w for w in p.warnings if w.startswith("model.name_or_path")]
    assert warning.startswith("model.name_or_path: acme/not-here is not in this machine's Hugging Face cache; no "
                              "memory estimate or trainable count without its config. Every rank would download it")
    assert "HF_HUB_OFFLINE=1" in warning and "HF_TOKEN" in warning and "dist-ft prepare" in warning


@pytest.mark.parametrize("name", ["models/llama/8b", "models/llama", "missing/"])
def test_a_missing_path_is_not_taken_for_a_hub_id(tmp_path, hub_cache, name):
    (tmp_path / "models").mkdir()  # `models/llama`: its first part is a folder here, so it is a path
    assert problems(tmp_path, name_or_path=name, tokenizer="byte")["model.name_or_path"] == \
        f"{name} is not a directory (relative paths are read from the recipe's folder, {tmp_path}) | give an " \
        "existing model folder, or a hub id `org/name`"


def test_a_gguf_folder_without_gguf_file_names_the_file(tmp_path):
    folder = tmp_path / "gguf-model"
    folder.mkdir()
    (folder / "Model.Q4_1.gguf").write_bytes(b"GGUF")
    assert problems(tmp_path, name_or_path=str(folder), tokenizer="byte")["model.gguf_file"] == \
        f"{folder} holds no config.json but GGUF file(s): Model.Q4_1.gguf | set model.gguf_file: Model.Q4_1.gguf"
    (folder / "Model.Q4_1.gguf").unlink()
    assert problems(tmp_path, name_or_path=str(folder), tokenizer="byte")["model.name_or_path"] == \
        f"{folder} holds no config.json: not a Hugging Face model folder | point at the folder save_pretrained " \
        "wrote (config.json, weights)"


def test_a_revision_on_a_local_folder_is_refused(tmp_path):
    folder = tmp_path / "local"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(CONFIG))
    assert "model.revision" in problems(tmp_path, name_or_path=str(folder), tokenizer="byte", revision="main")


def test_prepare_fetches_a_hub_model_or_says_why_it_cannot(tmp_path, hub_cache, monkeypatch, capsys):
    import yaml

    from dist_ft.cli import main

    raw = demo_raw()
    raw["model"] = {k: v for k, v in raw["model"].items() if k != "config"} | {"name_or_path": "acme/not-here",
                                                                              "tokenizer": "byte"}
    raw["long_context"]["progressive"]["rope"]["original_max_position_embeddings"] = 256
    raw["finetune"]["data"]["paths"] = [str(LAUNCH / p) for p in raw["finetune"]["data"]["paths"]]
    recipe = tmp_path / "hub.yaml"
    recipe.write_text(yaml.safe_dump(raw))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["prepare", str(recipe), "--out", str(tmp_path / "run")]) == 2
    assert f"error: acme/not-here is not in the Hugging Face cache ({hub_cache}) and HF_HUB_OFFLINE is set: run " \
           "`dist-ft prepare` on a machine with network" in capsys.readouterr().err
