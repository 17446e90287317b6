"""Recipes a hostile or careless user writes (issue 11, items 2-4 and 10-13): each one gets exit 2,
one line per problem naming the field, nothing written, within seconds, and never runs code.

Every case drives the real CLI in-process, as a user would.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import random
import signal
import sys

import pytest
import yaml

from dist_ft.cli import main
from dist_ft.recipe.config import MAX_STAGES
from tests.conftest import RECIPES, demo_raw

PLAN_SECONDS = 5  # a planner call on any recipe returns well within this (they take ~0.1 s)


@contextlib.contextmanager
def deadline(seconds: int = PLAN_SECONDS):
    """Fail, instead of hanging the suite, when the planner loops."""
    def expire(signum, frame):
        raise TimeoutError(f"the planner ran longer than {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def refused(capsys, argv: list[str], path: str, message: str) -> str:
    """Run the CLI; assert exit 2, `path: ...message...` on one line, no traceback."""
    with deadline():
        assert main(argv) == 2
    err = capsys.readouterr().err
    lines = [line.strip() for line in err.splitlines()]
    assert any(line.startswith(f"{path}: ") and message in line for line in lines), err
    assert "Traceback" not in err
    return err


# ---- --set overrides on the demo recipe ---------------------------------------------------------

OVERRIDES = {
    # item 2: the fine-tune batch never changes silently; warmup leaves steps to decay
    "micro-batch over the global batch": (["finetune.micro_batch_size=64"], "finetune.micro_batch_size",
                                          "would grow to 128 sequences"),
    "micro-batch not dividing a rank's share": (["finetune.micro_batch_size=3"], "finetune.micro_batch_size",
                                                "do not divide the 4"),
    "fine-tune warmup as long as the stage": (["finetune.steps=10", "finetune.warmup_steps=10"],
                                              "finetune.warmup_steps", "leave none of the stage's 10 steps"),
    "long-context warmup beyond the stage": (["long_context.progressive.steps=12",
                                              "long_context.progressive.warmup_steps=12"],
                                             "long_context.progressive.warmup_steps", "leave none"),
    # item 3: non-finite numbers, wherever they are
    "nan learning rate": (["finetune.lr=.nan"], "finetune.lr", "not a finite number"),
    "infinite epochs": (["finetune.steps=null", "finetune.epochs=.inf"], "finetune.epochs", "not a finite number"),
    "infinite rope theta": (["long_context.progressive.rope.rope_theta=.inf"],
                            "long_context.progressive.rope.rope_theta", "not a finite number"),
    "nan growth": (["long_context.progressive.growth=.nan"], "long_context.progressive.growth",
                   "not a finite number"),
    "nan validation fraction": (["finetune.data.validation_fraction=.NaN"], "finetune.data.validation_fraction",
                                "not a finite number"),
    "inf as text": (["finetune.lr=inf"], "finetune.lr", "not a finite number"),
    "overflowing exponent as text": (["finetune.lr=1e999"], "finetune.lr", "not a finite number"),
    "nan inside model.config": (["model.config.rope_scaling={factor: .nan}"], "model.config.rope_scaling.factor",
                                "not a finite number"),
    # item 10: numbers a cluster cannot hold, loops whose length is a user number
    "growth that stalls": (["long_context.progressive.start=16", "long_context.progressive.growth=1.01"],
                           "long_context.progressive.growth", "must be >= 1.1"),
    "too many progressive stages": (["long_context.progressive.start=16", "long_context.progressive.growth=1.1",
                                     "long_context.progressive.target=16000000"],
                                    "long_context.progressive.growth", f"more than {MAX_STAGES} stages"),
    "huge global batch": (["finetune.global_batch_size=1000000000000"], "finetune.global_batch_size",
                          "must be <= 16777216"),
    "huge tokens per step": (["long_context.tokens_per_step=1000000000000000"], "long_context.tokens_per_step",
                             "must be <="),
    "huge procs per node": (["cluster.procs_per_node=100000"], "cluster.procs_per_node", "must be <= 256"),
    "alias bomb in a --set value": (["model.config.x=[&a [1,1,1,1,1,1,1,1,1,1], &b [*a,*a,*a,*a,*a,*a,*a,*a,*a,*a],"
                                     " &c [*b,*b,*b,*b,*b,*b,*b,*b,*b,*b], &d [*c,*c,*c,*c,*c,*c,*c,*c,*c,*c],"
                                     " &e [*d,*d,*d,*d,*d,*d,*d,*d,*d,*d], [*e,*e,*e,*e,*e,*e,*e,*e,*e,*e]]"],
                                    "model.config.x", "expands to more than"),
    "self-referencing anchor in a --set value": (["model.config=&a {x: *a}"], "model.config",
                                                 "alias inside its own anchor"),
    # values JSON cannot hold crashed writing plan.json
    "bytes in model.config": (["model.config.blob=!!binary aGVsbG8="], "model.config.blob",
                              "a bytes value cannot be used"),
    "set in model.config": (["model.config.tags=!!set {a, b}"], "model.config.tags", "a set value cannot be used"),
    "tagged date in model.config": (["model.config.day=!!timestamp 2001-12-14"], "model.config.day",
                                    "a date value cannot be used"),
    # item 12: tracebacks before
    "unclosed YAML in --set": (["seed=["], "seed", "is not valid YAML"),
    "tag its constructor refuses": (["model.config.flag=!!bool maybe"], "model.config.flag",
                                    "a tagged value cannot be read"),
    "data path too long to look at": ([f"finetune.data.paths=[{'x' * 5000}]"], "finetune.data.paths[0]",
                                      "cannot be looked at"),
    "gguf file name too long to look at": (["model.config=null", "model.name_or_path=package:json",
                                            f"model.gguf_file={'x' * 5000}"],
                                           "model.gguf_file", "is not in"),
    "5000-digit integer": ([f"seed={'9' * 5000}"], "seed", "beyond the 64-bit range"),
    "huge hex integer": ([f"finetune.steps=0x{'f' * 5000}"], "finetune.steps", "beyond the 64-bit range"),
    "zero attention heads": (["model.config.num_attention_heads=0"], "model.config.num_attention_heads",
                             "must be a whole number from 1"),
    "hidden size as text": (["model.config.hidden_size=abc"], "model.config.hidden_size",
                            "must be a whole number from 1"),
    "heads not dividing the hidden size": (["model.config.num_attention_heads=3"],
                                           "model.config.num_attention_heads", "does not divide the hidden size"),
    "name too long for a file system": ([f"name={'x' * 300}"], "name", "more than 100"),
    "stage name too long": ([f"finetune.name={'x' * 300}"], "finetune.name", "more than 100"),
    "missing parent package": (["finetune.data.paths=[package:x_no_such_pkg.y]"], "finetune.data.paths[0]",
                               "no installed package"),
    "package name that is a path": (["finetune.data.paths=[package:../../etc]"], "finetune.data.paths[0]",
                                    "no installed package"),
    # item 13: data paths that name no data
    "empty data path": (["finetune.data.paths=['']"], "finetune.data.paths[0]", "is empty"),
    "device as data": (["finetune.data.paths=[/dev/null]"], "finetune.data.paths[0]", "not a regular file"),
}


@pytest.mark.parametrize("case", OVERRIDES, ids=list(OVERRIDES))
def test_hostile_override_exits_2_with_the_field_and_writes_nothing(case, recipe_file, tmp_path, capsys):
    overrides, path, message = OVERRIDES[case]
    recipe = recipe_file(demo_raw())
    sets = [arg for item in overrides for arg in ("--set", item)]
    refused(capsys, ["plan", str(recipe), *sets], path, message)
    refused(capsys, ["render", str(recipe), *sets, "--out", str(tmp_path / "run")], path, message)
    assert not (tmp_path / "run").exists() and not (tmp_path / "runs").exists()


def test_override_key_deeper_than_any_recipe_is_refused(recipe_file, capsys):
    key = "model.config." + "x." * 3000 + "y"
    refused(capsys, ["plan", str(recipe_file(demo_raw())), "--set", f"{key}=1"], key[:80], "levels deep")


def test_times_and_dates_stay_text_not_base_60_numbers(recipe_file, capsys):
    """YAML 1.1 reads 12:00:00 as 43200 and 2024-01-01 as a date; a recipe means the text."""
    sets = ["cluster.time_limit=12:00:00", "model.config.released=2024-01-01"]
    assert main(["plan", str(recipe_file(demo_raw())), "--json", *[a for s in sets for a in ("--set", s)]]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["time_limit_s"] == 12 * 3600 and plan["model"]["config"]["released"] == "2024-01-01"


def test_a_warned_batch_rounding_still_plans(recipe_file, capsys):
    """dp not dividing the global batch rounds it up, and the plan says so (as for tokens_per_step)."""
    recipe = recipe_file(demo_raw())
    assert main(["plan", str(recipe), "--json", "--set", "cluster.procs_per_node=3"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["stages"][-1]["global_batch_size"] == 9
    assert any("sft: 9 sequences per step (asked 8)" in w for w in plan["warnings"])


# ---- whole recipe files -------------------------------------------------------------------------

ALIAS_BOMB = "".join(f"    l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 10)}]\n" for i in range(1, 9))


def bad_files(tmp_path):
    demo = yaml.safe_dump(demo_raw())
    return {
        "non-UTF-8 text": ("latin1.yaml", demo.replace("demo", "d\xe9mo").encode("latin-1"), "not UTF-8"),
        "a directory": ("folder", None, "not a regular file"),
        "alias bomb": ("bomb.yaml", f"name: demo\nmodel:\n  config:\n    l0: &l0 [1, 2]\n{ALIAS_BOMB}".encode(),
                       "expands to more than"),
        "self-referencing anchor": ("self.yaml", b"name: demo\nmodel:\n  config: &c {model_type: llama, me: *c}\n",
                                    "alias inside its own anchor"),
        "deep nesting": ("deep.yaml", b"name: demo\nmodel: " + b"[" * 5000 + b"]" * 5000 + b"\n", "nested more"),
        "a list, not a mapping": ("list.yaml", b"- name: demo\n", "not a mapping"),
        "a huge file": ("huge.yaml", b"# " + b"x" * (2 << 20) + b"\n", "larger than"),
    }


@pytest.mark.parametrize("case", ["non-UTF-8 text", "a directory", "alias bomb", "self-referencing anchor",
                                  "deep nesting", "a list, not a mapping", "a huge file"])
def test_unreadable_recipe_file_exits_2_and_writes_nothing(case, tmp_path, capsys):
    name, content, message = bad_files(tmp_path)[case]
    recipe = tmp_path / name
    if content is None:
        recipe.mkdir()
    else:
        recipe.write_bytes(content)
    refused(capsys, ["render", str(recipe), "--out", str(tmp_path / "run")], "<recipe>", message)
    assert not (tmp_path / "run").exists()


def test_ordinary_anchors_and_aliases_still_load(recipe_file, capsys):
    raw = demo_raw()
    raw["finetune"]["lr"], raw["long_context"]["progressive"]["lr"] = 0.003, 0.002
    recipe = recipe_file(raw)
    text = recipe.read_text().replace("lr: 0.003", "lr: &lr 0.003").replace("lr: 0.002", "lr: *lr")
    recipe.write_text(text)
    assert main(["plan", str(recipe), "--json"]) == 0
    assert {s["lr"] for s in json.loads(capsys.readouterr().out)["stages"]} == {0.003}


@pytest.mark.parametrize("config_json, gguf, field, message", [
    ('{"model_type": "llama", "hidden_size": NaN}', None, "model.name_or_path", "hidden_size must be a whole"),
    ("[1]", None, "model.name_or_path", "not a JSON object"),
    ("{", None, "model.name_or_path", "cannot be read"),
    ("{}", b"not a gguf file", "model.gguf_file", "cannot be read as GGUF"),
])
def test_unusable_model_config_files_are_refused(config_json, gguf, field, message, recipe_file, tmp_path, capsys):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(config_json)
    raw = demo_raw()
    raw["model"] = {"name_or_path": str(model), "tokenizer": "byte", "dtype": "fp32"}
    if gguf:
        (model / "weights.gguf").write_bytes(gguf)
        raw["model"]["gguf_file"] = "weights.gguf"
    refused(capsys, ["plan", str(recipe_file(raw))], field, message)


def test_integer_too_long_in_a_recipe_file_names_its_field(recipe_file, tmp_path, capsys):
    recipe = recipe_file(demo_raw())
    recipe.write_text(recipe.read_text().replace("seed: 0", "seed: " + "7" * 5000))
    refused(capsys, ["plan", str(recipe)], "seed", "beyond the 64-bit range")


def test_out_pointing_at_a_file_is_refused_and_the_file_kept(recipe_file, tmp_path, capsys):
    target = tmp_path / "notes.txt"
    target.write_text("mine")
    recipe = recipe_file(demo_raw())
    refused(capsys, ["render", str(recipe), "--out", str(target)], "--out", "is a file, not a folder")
    refused(capsys, ["render", str(recipe), "--out", str(target / "run")], "--out", "is a file, not a folder")
    refused(capsys, ["render", str(recipe), "--out", str(tmp_path / ("x" * 300))], "--out", "longer than 255")
    assert target.read_text() == "mine" and not (tmp_path / "runs").exists()


def test_data_folder_without_a_data_file_is_refused(recipe_file, tmp_path, capsys):
    empty = tmp_path / "empty"
    (empty / ".git").mkdir(parents=True)
    (empty / ".git" / "notes.txt").write_text("hidden entries are tooling, not data")
    (empty / "blank.jsonl").write_text("")
    (empty / "picture.png").write_bytes(b"\x89PNG")
    raw = demo_raw()
    raw["finetune"]["data"]["paths"] = [str(empty)]
    refused(capsys, ["plan", str(recipe_file(raw))], "finetune.data.paths[0]", "holds no readable, non-empty data")


def test_data_file_of_an_unknown_kind_is_refused(recipe_file, tmp_path, capsys):
    archive = tmp_path / "data.tar.gz"
    archive.write_bytes(b"\x1f\x8b")
    raw = demo_raw()
    raw["finetune"]["data"]["paths"] = [str(archive)]
    refused(capsys, ["plan", str(recipe_file(raw))], "finetune.data.paths[0]", "not a supported kind")


# ---- item 11: plan never runs user code ---------------------------------------------------------

def test_package_data_path_resolves_without_importing_the_package(recipe_file, tmp_path, monkeypatch, capsys):
    evil = tmp_path / "code" / "evil_pkg_for_dist_ft"
    (evil / "data").mkdir(parents=True)
    marker = tmp_path / "ran"
    (evil / "__init__.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    (evil / "data" / "rows.jsonl").write_text(json.dumps({"instruction": "a", "output": "b"}) + "\n")
    monkeypatch.syspath_prepend(str(tmp_path / "code"))
    raw = demo_raw()
    raw["finetune"]["data"]["paths"] = ["package:evil_pkg_for_dist_ft.data"]
    with deadline():
        assert main(["plan", str(recipe_file(raw)), "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["stages"][-1]["data"]["paths"] == [str(evil / "data")]
    assert not marker.exists() and "evil_pkg_for_dist_ft" not in sys.modules


# ---- item 4: model.config on a pretrained model: applied, or refused when it is the shape ----------

def test_shape_keys_over_a_pretrained_model_are_refused(recipe_file, tmp_path, capsys):
    raw = demo_raw()
    raw["model"] = {"name_or_path": "HuggingFaceTB/SmolLM2-135M-Instruct", "tokenizer": "byte", "dtype": "fp32",
                    "config": {"attention_dropout": 0.1, "hidden_size": 128}}
    refused(capsys, ["plan", str(recipe_file(raw))], "model.config.hidden_size", "fixed by the pretrained model")


def test_model_config_overrides_reach_a_pretrained_model(recipe_file, tmp_path, capsys):
    from transformers import AutoConfig, AutoModelForCausalLM

    from dist_ft.plan.plan import Plan
    from dist_ft.rank.stage_model import _base_model
    from dist_ft.rank.tokenizer import byte_tokenizer

    raw = demo_raw()
    pretrained = tmp_path / "pretrained"
    AutoModelForCausalLM.from_config(AutoConfig.for_model(**raw["model"]["config"])).save_pretrained(pretrained)
    raw["model"]["name_or_path"] = str(pretrained)
    raw["model"]["config"] = {"attention_dropout": 0.25}
    capsys.readouterr()  # importing DeepSpeed above may print
    assert main(["plan", str(recipe_file(raw)), "--json"]) == 0
    plan = Plan.from_json(capsys.readouterr().out)
    model = _base_model(plan, plan.stages[0], byte_tokenizer())
    assert model.config.attention_dropout == 0.25  # the plan's model.config is the trainer's


# ---- nothing hangs, nothing else breaks --------------------------------------------------------

@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_shipped_recipes_still_plan(recipe, capsys):
    with deadline():
        assert main(["plan", str(recipe)]) == 0


HOSTILE_VALUES = [0, -1, 1, 2, 3, 7, 15, 16, 17, 1.0001, 1.5, 0.5, -0.0, 1e308, -1e308, math.nan, math.inf,
                  -math.inf, 2**63, 2**64, 10**30, 2**31, 1 << 24, "", " ", "x" * 300, "-x", "../x", "$(id)", "a\nb",
                  "nan", "1e999", "package:json", "/dev/null", None, True, False, [], {}, [None], {"a": None},
                  [1, 2], "auto", "none", "yarn", "lora", "bf16"]


def leaf_paths(node, prefix=()):
    """Every (dotted path) in the raw recipe: sections and leaves alike."""
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else []
    for key, value in items:
        yield prefix + (key,)
        yield from leaf_paths(value, prefix + (key,))


def mutate(raw: dict, rng: random.Random) -> dict:
    """One to three edits: a value swapped for a hostile one, a key deleted, or an unknown key added."""
    out = copy.deepcopy(raw)
    for _ in range(rng.randint(1, 3)):
        path = rng.choice(list(leaf_paths(out)))
        parent = out
        for key in path[:-1]:
            parent = parent[key]
        kind = rng.random()
        if kind < 0.75:
            parent[path[-1]] = copy.deepcopy(rng.choice(HOSTILE_VALUES))
        elif kind < 0.9 and isinstance(parent, dict):
            del parent[path[-1]]
        elif isinstance(parent, dict):
            parent[f"extra{rng.randint(0, 9)}"] = rng.choice(HOSTILE_VALUES)
    return out


def test_fuzzed_recipes_plan_or_fail_cleanly_within_seconds(recipe_file, capsys):
    """200 seeded mutations of the demo recipe: each returns a plan (0) or a RecipeError (2), never
    another exception, never a hang."""
    rng = random.Random(11)
    base = demo_raw()
    recipe = recipe_file(base)  # beside the demo's data; plan writes nothing, so output_root may be anything
    outcomes = {0: 0, 2: 0}
    for case in range(200):
        raw = mutate(base, rng)
        recipe.write_text(yaml.safe_dump(raw))
        try:
            with deadline():
                status = main(["plan", str(recipe)])
        except BaseException as err:  # noqa: BLE001 - any escape is the finding
            raise AssertionError(f"case {case} raised {err!r} for {raw}") from err
        assert status in outcomes, (case, raw)
        outcomes[status] += 1
        capsys.readouterr()
    assert outcomes[0] and outcomes[2]  # the mutations reach both answers
