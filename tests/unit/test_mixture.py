"""Data mixtures for long-context stages: sources drawn by weight, deterministic, resumable, the same at
another world size, validation never holding a copy of a training row, the realised mixture reported."""

from __future__ import annotations

import pytest

from dist_ft.cli import main
from dist_ft.rank.data import BatchStream, mixture_rows
from dist_ft.rank.stage_data import _mixture_report
from dist_ft.rank.tokenizer import byte_tokenizer
from tests.conftest import demo_raw

SEQ = 64


@pytest.fixture
def sources(tmp_path):
    """A: 40 short documents (~20 bytes); B: 6 long ones (~300 bytes); C: short and long mixed."""
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    for folder in (a, b, c):
        folder.mkdir()
    for i in range(40):
        (a / f"s{i}.txt").write_text(f"short document number {i}.")
    for i in range(6):
        (b / f"l{i}.txt").write_text(" ".join(f"long{i}-{j}" for j in range(40)))
    for i in range(4):
        (c / f"m{i}.txt").write_text("tiny" if i % 2 else " ".join(f"mid{i}-{j}" for j in range(30)))
    return {"a": [str(a)], "b": [str(b)], "c": [str(c)]}


def rows_of(sources, weights, seed=0, policies=None, fraction=0.0):
    spec = [(sources[k], w, (policies or {}).get(k, "split")) for k, w in weights.items()]
    return mixture_rows(spec, "text", byte_tokenizer(), SEQ, seed=seed, validation_fraction=fraction)


def key(row):
    return tuple(row["input_ids"])


def test_sources_make_up_their_weights_share_of_the_rows(sources):
    train, _, _, report = rows_of(sources, {"a": 1.0, "b": 3.0})
    total = report[0].available + report[1].available
    assert len(train) == total
    assert [r.taken for r in report] == [round(total / 4), round(total * 3 / 4)]
    assert report[1].taken > report[1].available  # B is up-sampled: its rows repeat
    b_rows = {key(r) for r in rows_of(sources, {"b": 1.0}, seed=1)[0]}  # B alone, packed as in the pair
    assert sum(key(r) in b_rows for r in train) == report[1].taken
    scored_b = sum(sum(label != -100 for label in r["labels"]) for r in train if key(r) in b_rows)
    scored_all = sum(sum(label != -100 for label in r["labels"]) for r in train)
    assert report[1].scored_tokens == scored_b and report[0].scored_tokens == scored_all - scored_b > 0


def test_the_mixture_is_a_function_of_data_and_seed(sources):
    first, second = rows_of(sources, {"a": 1.0, "b": 3.0}), rows_of(sources, {"a": 1.0, "b": 3.0})
    assert [key(r) for r in first[0]] == [key(r) for r in second[0]]
    assert [key(r) for r in rows_of(sources, {"a": 1.0, "b": 3.0}, seed=1)[0]] != [key(r) for r in first[0]]


def test_only_keeps_the_long_documents(sources):
    train, _, bad, report = rows_of(sources, {"c": 1.0}, policies={"c": "only"})
    text = "".join(byte_tokenizer().decode(r["input_ids"]) for r in train)
    assert "mid0" in text and "mid2" in text and "tiny" not in text
    assert bad.counts["shorter_than_seq_len"] == 2


def test_validation_never_holds_a_copy_of_a_training_row(sources):
    train, validation, _, _ = rows_of(sources, {"a": 1.0, "b": 5.0}, fraction=0.2)
    assert validation and not {key(r) for r in validation} & {key(r) for r in train}


def test_a_stream_over_the_mixture_resumes_and_changes_world_size_exactly(sources):
    train = rows_of(sources, {"a": 1.0, "b": 3.0})[0]

    def steps(stream_for_rank, dp, count):
        streams = [stream_for_rank(rank) for rank in range(dp)]
        return [sorted(key(r) for s in streams for r in _rows(next(s))) for _ in range(count)]

    one = steps(lambda r: BatchStream(train, 4, seed=5, dp_rank=r, dp_size=1), 1, 12)
    two = steps(lambda r: BatchStream(train, 2, seed=5, dp_rank=r, dp_size=2), 2, 12)
    assert one == two  # every step trains the same rows at world size 1 and 2
    stream = BatchStream(train, 4, seed=5)
    for _ in range(7):
        next(stream)
    resumed = BatchStream(train, 4, seed=5)
    resumed.load_state_dict(stream.state_dict())
    assert [_rows(next(resumed)) for _ in range(5)] == [_rows(next(stream)) for _ in range(5)]


def _rows(batch):
    return [{"input_ids": ids.tolist()} for ids in batch["input_ids"]]


def test_the_report_gives_each_sources_share(sources):
    _, _, _, report = rows_of(sources, {"a": 1.0, "b": 3.0})
    text = _mixture_report(report)
    assert "source 0 (a): weight 1" in text and "source 1 (b): weight 3" in text and "(up-sampled)" in text
    shares = [float(line.split(", ")[-1].split("%")[0]) for line in text.strip().splitlines()]
    assert sum(shares) == pytest.approx(100, abs=0.2)


@pytest.mark.parametrize("edit, path, message", [
    ({"sources": [{"paths": ["data/tiny_instructions.jsonl"]}], "paths": ["data/tiny_instructions.jsonl"]},
     "long_context.data.sources", "not both"),
    ({"sources": [{"paths": ["nope.jsonl"]}], "paths": []}, "long_context.data.sources[0].paths[0]", "does not exist"),
    ({"sources": [{"paths": ["data/tiny_instructions.jsonl"], "weight": 0}], "paths": []},
     "long_context.data.sources[0].weight", ">= 1e-06"),
    ({"sources": [{"paths": []}], "paths": []}, "long_context.data.sources[0].paths", "at least one path"),
])
def test_bad_sources_are_plan_time_errors(recipe_file, capsys, edit, path, message):
    raw = demo_raw()
    raw["long_context"]["data"].update(edit)
    assert main(["plan", str(recipe_file(raw))]) == 2
    err = capsys.readouterr().err
    assert f"{path}: " in err and message in err, err


def test_fine_tuning_takes_paths_not_sources(recipe_file, capsys):
    raw = demo_raw()
    raw["finetune"]["data"] = {"sources": [{"paths": ["data/tiny_instructions.jsonl"]}]}
    assert main(["plan", str(recipe_file(raw))]) == 2
    assert "finetune.data.sources: a mixture of sources is for long-context stages" in capsys.readouterr().err


def test_a_mixture_recipe_plans(recipe_file, tmp_path):
    raw = demo_raw()
    raw["long_context"]["data"] = {"sources": [{"paths": ["package:json"], "weight": 3},
                                               {"paths": ["package:email"], "weight": 1, "long_documents": "only"}]}
    assert main(["plan", str(recipe_file(raw))]) == 0


def test_a_stage_loads_its_mixture_and_reports_it(sources, tmp_path):
    """The rank side: load_stage_data builds the stream from the mixture and reports it (one rank)."""
    from dist_ft.launcher.prepare import prepare
    from dist_ft.plan.plan import make_plan
    from dist_ft.plan.batching import RankBatch
    from dist_ft.rank.stage_data import load_stage_data
    from dist_ft.recipe.config import recipe_from_dict
    from dist_ft.recipe.model_shape import shape_from_config

    raw = demo_raw()
    raw["long_context"]["data"] = {"sources": [{"paths": sources["a"], "weight": 1},
                                               {"paths": sources["b"], "weight": 3,
                                                "upsample_long": {"min_tokens": 100, "factor": 2}}],
                                   "validation_fraction": 0.1,
                                   "cache_dir": str(tmp_path / "stores")}
    raw["long_context"]["progressive"].update(start=64, target=128, growth=2)
    raw["long_context"]["tokens_per_step"] = 256
    del raw["finetune"]  # its relative paths are resolved by the CLI, not here
    recipe = recipe_from_dict(raw)
    plan = make_plan(recipe, shape_from_config(recipe.model.config, "test"), str(tmp_path / "run"))
    prepare(plan, byte_tokenizer(), workers=1, progress=False)  # the ranks only read token stores
    data = load_stage_data(plan, plan.stages[0], RankBatch(micro=2, accum=1, dp=1, dp_rank=0), byte_tokenizer())
    assert "source 0 (a): weight 1" in data.report and "source 1 (b): weight 3" in data.report
    assert "100.0% of its own in long documents" in data.report.split("source 1")[1]
    assert data.validation and next(data.train)["input_ids"].shape == (2, 64)
