"""Fine-tuning rows at prepare time: a format that does not fit the rows fails before any job starts (naming
the source and a bad row); `data.columns` maps rows' own field names, is checked at plan time and keys the
store; a `datasets.save_to_disk` folder is read by prepare only."""

from __future__ import annotations

import json

import pytest

from dist_ft.rank.tokenizer import byte_tokenizer
from dist_ft.recipe.config import Data, Finetune, LongContext
from dist_ft.recipe.strict import Invalid
from dist_ft.store import EXAMPLES, DataError, SourceSpec, build_store, store_path, tokenizer_fingerprint
from dist_ft.store.sft import sft_example

CHAT = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}


@pytest.fixture(scope="module")
def tokenizer():
    return byte_tokenizer()


def write_rows(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def test_chat_rows_read_as_instruction_rows_fail_at_prepare_naming_the_source_and_a_row(tokenizer, tmp_path):
    data = write_rows(tmp_path / "chat.jsonl", [CHAT] * 3 + [{"instruction": "a", "output": "b"}] * 2)
    with pytest.raises(DataError) as error:
        build_store(SourceSpec(EXAMPLES, (data,), "text", "instruction"), tokenizer, tmp_path / "s", progress=False)
    assert str(error.value) == (
        f"3 of 5 rows of {data} do not fit format 'instruction', which reads `instruction` and `output` strings "
        f"(`input` optional); e.g. {CHAT!r}. Set `finetune.format` to what the rows are, or map their fields with "
        "`data.columns` (e.g. `columns: {instruction: question, output: answer}`)")
    assert not any((tmp_path / "s").iterdir())  # nothing that passes for a store


def test_mapped_columns_give_the_same_examples_under_another_store_key(tokenizer, tmp_path):
    plain = write_rows(tmp_path / "plain.jsonl", [{"instruction": f"add {i}", "output": str(i)} for i in range(4)])
    other = write_rows(tmp_path / "other.jsonl", [{"question": f"add {i}", "answer": str(i)} for i in range(4)])
    columns = (("instruction", "question"), ("output", "answer"))
    mapped, _ = build_store(SourceSpec(EXAMPLES, (other,), "text", "instruction", None, columns), tokenizer,
                            tmp_path / "s", progress=False)
    reference, _ = build_store(SourceSpec(EXAMPLES, (plain,), "text", "instruction"), tokenizer, tmp_path / "s",
                               progress=False)
    assert mapped.count == 4 and mapped.tokens.tolist() == reference.tokens.tolist()
    assert mapped.mask.tolist() == reference.mask.tolist() and mapped.manifest["bad_rows"] == {}
    fingerprint = tokenizer_fingerprint(tokenizer)
    assert store_path(tmp_path, SourceSpec(EXAMPLES, (other,), "text", "instruction", None, columns), fingerprint) != \
        store_path(tmp_path, SourceSpec(EXAMPLES, (other,), "text", "instruction", None, (("input", "answer"),)),
                   fingerprint)


def test_sharegpt_rows_under_another_column_are_chat_rows(tokenizer):
    spec = SourceSpec(EXAMPLES, (), "text", "chat", None, (("conversations", "dialog"),))
    row = spec.renamed({"dialog": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]})
    assert sft_example(row, tokenizer, "chat", None, 512) == sft_example(CHAT, tokenizer, "chat", None, 512)


@pytest.mark.parametrize("section,columns,message", [
    ("finetune", {"messages": "dialog"}, "data.columns.messages: instruction rows have no field 'messages' "
                                         "(they read instruction, input, output)"),
    ("finetune", {"question": "q"}, "columns.question: maps 'question' to 'q'; the format fields are "
                                    "instruction, input, output, messages, conversations"),
    ("long_context", {"instruction": "q"}, "data.columns: maps fine-tuning rows' fields"),
])
def test_columns_are_checked_against_the_format_at_plan_time(section, columns, message):
    with pytest.raises(Invalid) as error:
        data = Data(paths=["x.jsonl"], columns=columns)
        if section == "finetune":
            Finetune(data=data, steps=1)
        else:
            LongContext(tokens_per_step=1024, data=data)
    assert message in str(error.value)


def test_a_saved_dataset_folder_is_read_by_prepare_and_never_by_a_rank(tmp_path, monkeypatch, capsys):
    import datasets
    import yaml

    from dist_ft.cli import main
    from dist_ft.plan.plan import Plan
    from dist_ft.plan.batching import RankBatch
    from dist_ft.rank.stage_data import load_stage_data
    from tests.conftest import LAUNCH

    def save(rows):
        datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "saved"))

    save([{"question": f"add {i} and {i}", "answer": str(2 * i)} for i in range(40)])
    raw = yaml.safe_load((LAUNCH / "demo.yaml").read_text())
    del raw["long_context"], raw["evaluation"]
    raw["finetune"]["data"] = {"hub_dataset": "./saved", "validation_fraction": 0.1,
                               "columns": {"instruction": "question", "output": "answer"}}
    raw["checkpointing"]["output_root"] = str(tmp_path)
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(raw))
    args = [str(tmp_path / "recipe.yaml"), "--out", str(tmp_path / "run")]
    assert main(["render", *args]) == 0 and main(["prepare", *args, "--workers", "1"]) == 0
    assert "40 examples" in capsys.readouterr().out
    save([{"question": f"add {i} and {i}", "answer": str(2 * i)} for i in range(50)])  # the folder changed
    assert main(["prepare", *args, "--workers", "1"]) == 0 and "50 examples" in capsys.readouterr().out
    monkeypatch.setattr(datasets, "load_from_disk", None)  # a rank that tried would fail
    monkeypatch.setattr(datasets, "load_dataset", None)
    plan = Plan.from_json((tmp_path / "run" / "plan.json").read_text())
    data = load_stage_data(plan, plan.stage("sft"), RankBatch(micro=1, accum=1, dp=1, dp_rank=0), byte_tokenizer())
    assert len(data.validation) >= 1 and next(data.train)["input_ids"].shape == (1, 256)


def test_with_a_prepare_job_the_launcher_refuses_a_wrong_format_before_submitting(tmp_path, capsys):
    """data.prepare: job tokenizes on the cluster; the launcher samples each fine-tuning file's first rows
    so a wrong format still fails before any job (exit 2, nothing submitted)."""
    import yaml

    from dist_ft.cli import main
    from tests.conftest import LAUNCH

    data = write_rows(tmp_path / "chat.jsonl", [CHAT] * 100)
    raw = yaml.safe_load((LAUNCH / "demo.yaml").read_text())
    del raw["long_context"], raw["evaluation"]
    raw["finetune"]["data"] = {"paths": [data], "validation_fraction": 0.1, "prepare": "job"}
    raw["checkpointing"]["output_root"] = str(tmp_path)
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(raw))
    assert main(["launch", str(tmp_path / "recipe.yaml"), "--backend", "slurm", "--out", str(tmp_path / "run")]) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: 64 of 64 rows of {data} do not fit format 'instruction', which reads `instruction` and `output` "
        f"strings (`input` optional); e.g. {CHAT!r}. Set `finetune.format` to what the rows are, or map their "
        "fields with `data.columns` (e.g. `columns: {instruction: question, output: answer}`)")
    assert not (tmp_path / "run" / "jobs.json").exists() and not (tmp_path / "token_store").exists()


def test_a_saved_dataset_folder_that_is_not_there_is_a_plan_error(tmp_path, capsys):
    import yaml

    from dist_ft.cli import main
    from tests.conftest import LAUNCH

    raw = yaml.safe_load((LAUNCH / "demo.yaml").read_text())
    del raw["long_context"], raw["evaluation"]
    raw["finetune"]["data"] = {"hub_dataset": "./saved", "validation_fraction": 0.1}
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(raw))
    assert main(["plan", str(tmp_path / "recipe.yaml")]) == 2
    assert f"finetune.data.hub_dataset: {tmp_path}/saved is not a directory" in capsys.readouterr().err
