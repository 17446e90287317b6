"""The token store: the ranks' rows from it are exactly the in-memory pipeline's; a store is reused, and
refused when partial, damaged or stale; a killed prepare leaves nothing that opens; bad rows are counted
when prepare reads the files."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from dist_ft.plan.preflight import resolve_data_path
from dist_ft.rank.data import BatchStream, mixture_rows, pretraining_rows, sft_rows
from dist_ft.rank.data.packed import PackedDocuments, PackedExamples, RowSet
from dist_ft.rank.data.select import mix, split_rows, split_set
from dist_ft.rank.tokenizer import byte_tokenizer
from dist_ft.store import (DOCUMENTS, EXAMPLES, BadRows, SourceSpec, StoreError, build_store, open_source,
                           store_path, tokenizer_fingerprint)
from tests.conftest import LAUNCH, ROOT

DEMO_DOCS = tuple(resolve_data_path(p, Path(".")) for p in ("package:json", "package:email"))
INSTRUCTIONS = str(LAUNCH / "data" / "tiny_instructions.jsonl")


@pytest.fixture(scope="module")
def tokenizer():
    return byte_tokenizer()


@pytest.fixture(scope="module")
def demo_store(tokenizer, tmp_path_factory):
    return build_store(SourceSpec(DOCUMENTS, DEMO_DOCS), tokenizer, tmp_path_factory.mktemp("stores"),
                       progress=False)[0]


def test_the_demo_rows_are_the_in_memory_pipelines(tokenizer, demo_store):
    """The demo's first stage (seq_len 512, split, seed 0): every row, in order, as pretraining_rows made it."""
    old, _ = pretraining_rows(DEMO_DOCS, "text", tokenizer, 512, seed=0)
    new = PackedDocuments(demo_store, 512, seed=0, long_docs="split", bad=BadRows())
    assert len(new) == len(old) == 851
    assert all(new[i] == old[i] for i in range(len(old)))


@pytest.mark.parametrize("policy,seq_len", [("truncate", 1024), ("skip", 8192), ("only", 8192), ("split", 4096)])
def test_every_long_document_policy_gives_the_same_rows_and_counts(tokenizer, demo_store, policy, seq_len):
    old, old_bad = pretraining_rows(DEMO_DOCS, "text", tokenizer, seq_len, seed=7, long_docs=policy)
    bad = BadRows()
    new = PackedDocuments(demo_store, seq_len, seed=7, long_docs=policy, bad=bad)
    assert [new[i] for i in range(len(new))] == old
    prepare_time = {"unsupported_file", "empty_file"}  # counted by prepare, in the manifest
    assert dict(bad.counts) == {k: n for k, n in old_bad.counts.items() if k not in prepare_time}
    assert {k: demo_store.manifest["bad_rows"].get(k, 0) for k in prepare_time} == \
        {k: old_bad.counts[k] for k in prepare_time}


@pytest.mark.parametrize("seq_len,packing", [(256, True), (256, False), (70, True), (64, False)])
def test_fine_tuning_rows_are_the_in_memory_pipelines(tokenizer, tmp_path, seq_len, packing):
    """Examples are stored whole; the stage's seq_len rules (prompt too long: dropped; too long: cut) apply
    when packing, so one store serves stages of every length."""
    spec = SourceSpec(EXAMPLES, (INSTRUCTIONS,), "text", "instruction", "chat_template")
    store, _ = build_store(spec, tokenizer, tmp_path, progress=False)
    old, old_bad = sft_rows([INSTRUCTIONS], tokenizer, "instruction", "chat_template", seq_len, seed=5,
                            packing=packing)
    bad = BadRows()
    new = PackedExamples(store, seq_len, seed=5, packing=packing, bad=bad)
    assert [new[i] for i in range(len(new))] == old
    assert dict(bad.counts) == dict(old_bad.counts)
    assert seq_len > 64 or bad.counts["prompt_too_long"] > 0  # the rules were exercised
    assert seq_len != 70 or bad.counts["truncated"] > 0


def test_a_mixture_draws_the_same_rows_as_the_in_memory_one(tokenizer, tmp_path):
    folders = {}
    for name, texts in {"a": [f"short document number {i}." for i in range(40)],
                        "b": [" ".join(f"long{i}-{j}" for j in range(40)) for i in range(6)]}.items():
        folders[name] = tmp_path / name
        folders[name].mkdir()
        for i, text in enumerate(texts):
            (folders[name] / f"{i}.txt").write_text(text)
    sources = [([str(folders["a"])], 1.0, "split"), ([str(folders["b"])], 3.0, "only")]
    old_train, old_val, _, old_report = mixture_rows(sources, "text", tokenizer, 64, seed=3, validation_fraction=0.2)
    packed = [(paths, weight, PackedDocuments(build_store(SourceSpec(DOCUMENTS, tuple(paths)), tokenizer,
                                                          tmp_path / "stores", progress=False)[0],
                                              64, seed=3 + i, long_docs=policy, bad=BadRows()))
              for i, (paths, weight, policy) in enumerate(sources)]
    train, validation, report = mix(packed, 3, 0.2)
    assert list(train) == old_train and list(validation) == old_val and report == old_report
    shares = [r.taken / len(train) for r in report]
    assert shares == pytest.approx([0.25, 0.75], abs=1 / len(train))


def test_a_stream_from_the_memory_map_serves_the_same_batches_at_any_world_size(demo_store):
    rows = RowSet.of(PackedDocuments(demo_store, 512, seed=0, long_docs="split", bad=BadRows()))
    train, validation = split_set(rows, 0.1, 0)
    assert len(validation) == 85 and not set(validation.row) & set(train.row)
    old_train, old_validation = split_rows(list(range(len(rows))), 0.1, 0)  # the in-memory path's split
    assert train.row.tolist() == old_train and validation.row.tolist() == old_validation
    one = BatchStream(train, 2, seed=1)
    two = [BatchStream(train, 1, seed=1, dp_rank=r, dp_size=2) for r in range(2)]
    for _ in range(3):
        whole = next(one)["input_ids"]
        assert [next(s)["input_ids"][0].tolist() for s in two] == whole.tolist()
    resumed = BatchStream(train, 1, seed=1, dp_rank=1, dp_size=2)
    resumed.load_state_dict(two[1].state_dict())
    assert next(resumed)["input_ids"].tolist() == next(two[1])["input_ids"].tolist()


def test_a_store_is_reused_by_another_stage_or_recipe_and_costs_two_bytes_a_token(tokenizer, demo_store):
    again, built = build_store(SourceSpec(DOCUMENTS, DEMO_DOCS), tokenizer, demo_store.path.parent, progress=False)
    assert not built and again.path == demo_store.path
    manifest = demo_store.manifest
    assert manifest["dtype"] == "uint16" and demo_store.tokens.dtype == np.uint16
    assert os.path.getsize(demo_store.path / "tokens.bin") == 2 * manifest["tokens"] == 2 * 435651
    assert len(demo_store.offsets) == manifest["count"] + 1 == 35
    assert sum(manifest["length_histogram"].values()) == 34


def test_the_tokenizer_fingerprint_is_its_content_not_its_name(tokenizer):
    code = ("from dist_ft.rank.tokenizer import byte_tokenizer; from dist_ft.store import tokenizer_fingerprint;"
            "print(tokenizer_fingerprint(byte_tokenizer()))")
    other_process = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                                   cwd=ROOT).stdout.split()[-1]
    assert other_process == tokenizer_fingerprint(tokenizer)
    renamed = byte_tokenizer()
    renamed.name_or_path = "some/other-name"
    assert tokenizer_fingerprint(renamed) == tokenizer_fingerprint(tokenizer)
    other_template = byte_tokenizer()
    other_template.chat_template = "{{ messages }}"
    assert tokenizer_fingerprint(other_template) != tokenizer_fingerprint(tokenizer)


def small_corpus(folder: Path, files: int = 3) -> SourceSpec:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(files):
        (folder / f"d{i}.jsonl").write_text("".join(json.dumps({"text": f"doc {i}.{j} " * 20}) + "\n"
                                                    for j in range(10)))
    return SourceSpec(DOCUMENTS, (str(folder),))


def test_a_stale_store_is_refused_naming_the_command_that_rebuilds_it(tokenizer, tmp_path):
    spec = small_corpus(tmp_path / "data")
    build_store(spec, tokenizer, tmp_path / "stores", progress=False)
    changed = tmp_path / "data" / "d1.jsonl"
    changed.write_text(changed.read_text() + json.dumps({"text": "one more"}) + "\n")
    with pytest.raises(StoreError, match=r"is stale: .*d1.jsonl changed since it was built: run `dist-ft prepare R`"):
        open_source(spec, tokenizer, tmp_path / "stores", "dist-ft prepare R")
    (tmp_path / "data" / "d3.jsonl").write_text(json.dumps({"text": "a new file"}) + "\n")
    with pytest.raises(StoreError, match="d3.jsonl"):
        open_source(spec, tokenizer, tmp_path / "stores", "dist-ft prepare R")
    store, built = build_store(spec, tokenizer, tmp_path / "stores", progress=False)
    assert built and store.count == 32 and open_source(spec, tokenizer, tmp_path / "stores", "x").count == 32


@pytest.mark.parametrize("damage", ["no manifest", "short tokens", "long offsets", "bad json", "missing"])
def test_a_partial_or_damaged_store_is_refused(tokenizer, tmp_path, damage):
    spec = small_corpus(tmp_path / "data")
    store, _ = build_store(spec, tokenizer, tmp_path / "stores", progress=False)
    if damage == "no manifest":
        (store.path / "manifest.json").unlink()
    elif damage == "short tokens":
        os.truncate(store.path / "tokens.bin", store.manifest["tokens"] * 2 - 2)
    elif damage == "long offsets":
        with open(store.path / "offsets.bin", "ab") as handle:
            handle.write(b"\0" * 8)
    elif damage == "bad json":
        (store.path / "manifest.json").write_text("{")
    else:
        (store.path / "offsets.bin").unlink()
    with pytest.raises(StoreError, match="run `dist-ft prepare`"):
        open_source(spec, tokenizer, tmp_path / "stores", "dist-ft prepare")
    rebuilt, built = build_store(spec, tokenizer, tmp_path / "stores", progress=False)
    assert built and rebuilt.count == 30


def test_a_killed_prepare_leaves_nothing_that_opens(tokenizer, tmp_path):
    """SIGKILL while the arrays are being written: the store's name holds nothing; a new prepare builds it."""
    data = tmp_path / "data"
    data.mkdir()
    for i in range(40):  # enough text that the byte tokenizer is still writing when the kill comes
        (data / f"d{i}.jsonl").write_text("".join(json.dumps({"text": f"{i} {j} " * 400}) + "\n" for j in range(400)))
    spec = SourceSpec(DOCUMENTS, (str(data),))
    stores = tmp_path / "stores"
    code = ("import sys; from pathlib import Path; from dist_ft.rank.tokenizer import byte_tokenizer;"
            "from dist_ft.store import SourceSpec, build_store;"
            f"build_store(SourceSpec('documents', ({str(data)!r},)), byte_tokenizer(), Path({str(stores)!r}),"
            "progress=False)")
    child = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    deadline = time.monotonic() + 120
    while not any(p.stat().st_size > 0 for p in stores.glob(".*/tokens.bin")):
        assert child.poll() is None and time.monotonic() < deadline, "prepare ended before it could be killed"
        time.sleep(0.05)
    child.send_signal(signal.SIGKILL)
    child.wait()
    path = store_path(stores, spec, tokenizer_fingerprint(tokenizer))
    assert not path.exists() and [p.name for p in stores.iterdir()][0].startswith(".")
    with pytest.raises(StoreError, match="is missing"):
        open_source(spec, tokenizer, stores, "dist-ft prepare")
    assert build_store(spec, tokenizer, stores, progress=False)[0].count == 40 * 400


def test_bad_rows_are_counted_when_prepare_reads_the_files(tokenizer, tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join([json.dumps({"text": "good one"}), "{not json", json.dumps({"body": "x"}),
                               json.dumps({"text": "   "}), json.dumps({"text": 3}), json.dumps([1]),
                               json.dumps({"text": "good two"})]) + "\n")
    store, _ = build_store(SourceSpec(DOCUMENTS, (str(data),)), tokenizer, tmp_path / "s", progress=False)
    assert store.count == 2 and store.manifest["bad_rows"] == {"bad_json": 1, "missing_field": 1, "empty_text": 1,
                                                               "not_a_string": 1, "not_an_object": 1}
    assert store.manifest["bad_examples"]["bad_json"] == [f"{data}:2"]


def test_fine_tuning_rows_that_do_not_fit_their_format_are_counted_at_prepare(tokenizer, tmp_path):
    data = tmp_path / "sft.jsonl"
    data.write_text("\n".join([json.dumps({"instruction": "say hi", "output": "hi"}), json.dumps({"text": "x"}),
                               json.dumps({"instruction": "", "output": "x"})]) + "\n")
    spec = SourceSpec(EXAMPLES, (str(data),), "text", "instruction", None)
    store, _ = build_store(spec, tokenizer, tmp_path / "s", workers=2, progress=False)
    assert store.count == 1 and store.manifest["bad_rows"] == {"missing_field": 2}
    assert int(store.prompt_lengths[0]) == int(np.argmax(store.mask[:store.offsets[1]] == 1)) > 0


def test_worker_processes_write_the_same_store(tokenizer, tmp_path):
    spec = SourceSpec(DOCUMENTS, DEMO_DOCS)
    one, _ = build_store(spec, tokenizer, tmp_path / "one", workers=1, progress=False)
    two, _ = build_store(spec, tokenizer, tmp_path / "two", workers=2, progress=False)
    assert np.array_equal(one.tokens, two.tokens) and np.array_equal(one.offsets, two.offsets)
    assert one.manifest["key"] == two.manifest["key"]


def test_sharegpt_rows_are_chat_rows(tokenizer):
    from dist_ft.store.sft import sft_example

    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "hello"}]
    sharegpt = {"conversations": [{"from": "system", "value": "be brief"}, {"from": "human", "value": "hi"},
                                  {"from": "gpt", "value": "hello"}]}
    assert sft_example(sharegpt, tokenizer, "chat", None, 512) == sft_example({"messages": messages}, tokenizer,
                                                                             "chat", None, 512) is not None
    bad = BadRows()
    assert sft_example({"conversations": [{"from": "bot", "value": "x"}]}, tokenizer, "chat", None, 512,
                       bad=bad) is None and bad.counts == {"bad_messages": 1}


def test_upsampling_long_documents_raises_their_share_inside_a_source(tokenizer, tmp_path):
    data = tmp_path / "mixed"
    data.mkdir()
    for i in range(30):  # 30 short documents of 20 tokens, 5 long ones of 200
        (data / f"s{i}.txt").write_text(f"short {i:03d} documents.")
    for i in range(5):
        (data / f"l{i}.txt").write_text(f"long {i} " + "x" * 193)
    store, _ = build_store(SourceSpec(DOCUMENTS, (str(data),)), tokenizer, tmp_path / "s", progress=False)
    plain = PackedDocuments(store, 64, seed=1, long_docs="split", bad=BadRows())
    assert plain.long_share(100) == pytest.approx(5 * 200 / (5 * 200 + 30 * 20))
    same = PackedDocuments(store, 64, seed=1, long_docs="split", bad=BadRows(), upsample=(100, 1))
    assert list(same) == list(plain)
    up = PackedDocuments(store, 64, seed=1, long_docs="split", bad=BadRows(), upsample=(100, 4))
    assert up.long_share(100) == pytest.approx(4 * 5 * 200 / (4 * 5 * 200 + 30 * 20))
    copies = np.bincount(up.order, minlength=store.count)
    assert sorted(copies.tolist()) == [1] * 30 + [4] * 5 and up.total == 30 * 21 + 20 * 201


PAD = 258  # the byte tokenizer's pad id; no example ends with it


def segments(row):
    """(ids, labels) of each segment of a row (positions restart at 0), the row's padding left out."""
    real = len(row["input_ids"])
    while row["input_ids"][real - 1] == PAD:
        real -= 1
    starts = [i for i, p in enumerate(row["position_ids"][:real]) if p == 0] + [real]
    pieces = [(tuple(row["input_ids"][a:b]), tuple(row["labels"][a:b])) for a, b in zip(starts, starts[1:])]
    return [(ids, labels) for ids, labels in pieces if any(label != -100 for label in labels)]


def test_best_fit_decreasing_packs_every_example_whole_into_fewer_rows(tokenizer, tmp_path):
    spec = SourceSpec(EXAMPLES, (INSTRUCTIONS,), "text", "instruction", "chat_template")
    store, _ = build_store(spec, tokenizer, tmp_path, progress=False)
    next_fit = PackedExamples(store, 256, seed=5, packing=True, bad=BadRows())
    best = PackedExamples(store, 256, seed=5, packing=True, bad=BadRows(), method="best_fit_decreasing")
    assert len(best) < len(next_fit) and best.efficiency > next_fit.efficiency
    assert best.efficiency == pytest.approx(int(store.lengths().sum()) / (256 * len(best)))
    # every example once, whole, its own segment: attention (positions restart) never crosses examples
    assert sorted(s for row in best for s in segments(row)) == sorted(s for row in next_fit for s in segments(row))
    assert len(sorted(s for row in best for s in segments(row))) == store.count
    lower_bound = -(-int(store.lengths().sum()) // 256)
    assert len(best) <= 11 / 9 * lower_bound + 1


def test_a_rank_without_its_store_stops_naming_the_prepare_command(tmp_path):
    from dist_ft.cli import main
    from dist_ft.plan.plan import Plan
    from dist_ft.plan.batching import RankBatch
    from dist_ft.rank.stage_data import load_stage_data

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text((LAUNCH / "demo.yaml").read_text().replace("[data/", f"[{LAUNCH}/data/"))
    assert main(["render", str(recipe), "--out", str(tmp_path / "run"),
                 "--set", f"checkpointing.output_root={tmp_path}"]) == 0
    plan = Plan.from_json((tmp_path / "run" / "plan.json").read_text())
    assert plan.stage("sft").data.cache_dir == str(tmp_path / "token_store")
    resolved = yaml.safe_load((tmp_path / "run" / "recipe.resolved.yaml").read_text())
    assert resolved["finetune"]["data"]["cache_dir"] == str(tmp_path / "token_store")  # prepare from anywhere
    with pytest.raises(SystemExit) as stop:
        load_stage_data(plan, plan.stage("sft"), RankBatch(micro=1, accum=1, dp=1, dp_rank=0), byte_tokenizer())
    assert str(stop.value) == (f"error: [sft] the token store {tmp_path}/token_store/{store_path_name(plan)} is "
                               f"missing: run `dist-ft prepare {tmp_path}/run/recipe.resolved.yaml`")


def store_path_name(plan) -> str:
    from dist_ft.store.sources import stage_specs

    stage = plan.stage("sft")
    spec = stage_specs(stage.data, stage.phase, stage.data_format, stage.template)[0]
    return store_path(Path("."), spec, tokenizer_fingerprint(byte_tokenizer())).name


def test_a_hub_dataset_is_exported_by_prepare_and_read_by_the_ranks_from_the_store(tmp_path, monkeypatch):
    """prepare is the only step that touches the hub (here a stand-in for the download); the rank reads the
    exported rows' store and never calls load_dataset."""
    import datasets

    from dist_ft.cli import main
    from dist_ft.plan.plan import Plan
    from dist_ft.plan.batching import RankBatch
    from dist_ft.rank.stage_data import load_stage_data

    rows = [{"instruction": f"add {i} and {i}", "output": str(2 * i)} for i in range(40)]
    calls = []
    monkeypatch.setattr(datasets, "load_dataset", lambda name, split: calls.append((name, split)) or
                        datasets.Dataset.from_list(rows))
    recipe = tmp_path / "recipe.yaml"
    raw = yaml.safe_load((LAUNCH / "demo.yaml").read_text())
    del raw["long_context"], raw["evaluation"]
    raw["finetune"]["data"] = {"hub_dataset": "org/adding", "hub_split": "train", "validation_fraction": 0.1}
    raw["checkpointing"]["output_root"] = str(tmp_path)
    recipe.write_text(yaml.safe_dump(raw))
    args = [str(recipe), "--out", str(tmp_path / "run")]
    assert main(["render", *args]) == 0 and main(["prepare", *args, "--workers", "1"]) == 0
    assert calls == [("org/adding", "train")]
    assert (tmp_path / "token_store" / "hub" / "org__adding.train.jsonl").read_text().count("\n") == 40
    assert main(["prepare", *args]) == 0 and len(calls) == 1  # exported once, the store reused
    monkeypatch.setattr(datasets, "load_dataset", None)  # a rank that tried would fail
    plan = Plan.from_json((tmp_path / "run" / "plan.json").read_text())
    data = load_stage_data(plan, plan.stage("sft"), RankBatch(micro=1, accum=1, dp=1, dp_rank=0), byte_tokenizer())
    assert len(data.validation) >= 1 and next(data.train)["input_ids"].shape == (1, 256)


def test_the_plan_shows_the_data_budget_before_and_after_prepare(tmp_path, capsys):
    from dist_ft.cli import main

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text((LAUNCH / "demo.yaml").read_text().replace("[data/", f"[{LAUNCH}/data/"))
    args = [str(recipe), "--set", f"checkpointing.output_root={tmp_path}"]
    assert main(["plan", *args]) == 0
    before = capsys.readouterr().out
    assert f"data (token stores in {tmp_path}/token_store):" in before
    assert before.count("no store yet: `dist-ft prepare` builds it") == 2
    assert main(["prepare", *args, "--workers", "1"]) == 0 and main(["plan", *args]) == 0
    after = capsys.readouterr().out.split("data (token stores")[-1]
    assert "34 documents, 435651 tokens" in after and "480 examples, 32580 tokens" in after
    assert "ctx512: trains 49152 tokens = 0.11 passes; 34 documents reach seq_len 512" in after
    assert "ctx1k: trains 49152 tokens = 0.11 passes; 32 documents reach seq_len 1024" in after
