"""Reading, bad-data counting, packing, SFT label masks and the resumable batch stream."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from dist_ft.rank.data import (IGNORE_INDEX, BadRows, BatchStream, DataError, pack_documents, pack_examples,
                          pretraining_rows, read_documents, sft_example, sft_rows)
from dist_ft.rank.tokenizer import byte_tokenizer

EOS = 0


@pytest.fixture(scope="module")
def tokenizer():
    return byte_tokenizer()


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


# ---------------------------------------------------------------- packing

def test_pack_documents_rows_positions_and_labels():
    rows = pack_documents([[1, 2, 3], [4, 5], [6, 7, 8, 9, 10, 11, 12]], seq_len=5, eos_id=EOS, pad_id=99)
    assert rows == [
        {"input_ids": [1, 2, 3, 0, 4], "position_ids": [0, 1, 2, 3, 0], "labels": [-100, 2, 3, 0, -100]},
        {"input_ids": [5, 0, 6, 7, 8], "position_ids": [0, 1, 0, 1, 2], "labels": [-100, 0, -100, 7, 8]},
        {"input_ids": [9, 10, 11, 12, 0], "position_ids": [0, 1, 2, 3, 4], "labels": [-100, 10, 11, 12, 0]},
    ]


def test_pack_documents_pads_the_last_row_without_loss():
    (row,) = pack_documents([[1, 2]], seq_len=6, eos_id=EOS, pad_id=99)
    assert row == {"input_ids": [1, 2, 0, 99, 99, 99], "position_ids": [0, 1, 2, 3, 4, 5],
                   "labels": [-100, 2, 0, -100, -100, -100]}


def test_pack_documents_keeps_every_token_in_order():
    documents = [list(range(1, n + 1)) for n in (3, 17, 1, 40, 8)]
    rows = pack_documents(documents, seq_len=16, eos_id=EOS, pad_id=99)
    assert all(len(row[key]) == 16 for row in rows for key in row)
    stream = [t for row in rows for t in row["input_ids"]]
    expected = [t for doc in documents for t in (*doc, EOS)]
    assert stream[:len(expected)] == expected and set(stream[len(expected):]) <= {99}


@pytest.mark.parametrize("policy, kept, reason", [("truncate", [[1, 2, 3, 4, 5, 6], [7, 0]], "truncated"),
                                                  ("skip", [[7, 0]], "too_long")])
def test_long_documents_truncated_or_skipped_are_counted(policy, kept, reason):
    bad = BadRows()
    rows = pack_documents([[1, 2, 3, 4, 5, 6, 7, 8, 9], [7]], seq_len=6, eos_id=EOS, long_docs=policy, pad_id=99,
                          bad=bad)
    assert [t for row in rows for t in row["input_ids"] if t != 99] == [t for doc in kept for t in doc]
    assert bad.counts == {reason: 1}


def test_pack_examples_keeps_examples_whole_and_their_labels():
    examples = [{"input_ids": [1, 2, 3], "labels": [-100, 2, 3]}, {"input_ids": [4, 5, 6], "labels": [4, 5, 6]},
                {"input_ids": [7], "labels": [7]}]
    packed = pack_examples(examples, seq_len=5, pad_id=99)
    assert packed == [
        {"input_ids": [1, 2, 3, 99, 99], "position_ids": [0, 1, 2, 3, 4], "labels": [-100, 2, 3, -100, -100]},
        {"input_ids": [4, 5, 6, 7, 99], "position_ids": [0, 1, 2, 0, 1], "labels": [-100, 5, 6, -100, -100]},
    ]
    assert len(pack_examples(examples, seq_len=5, pad_id=99, packing=False)) == 3


# ---------------------------------------------------------------- reading and bad data

def test_reads_jsonl_json_parquet_text_and_directories(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [{"text": "one"}, {"text": "two"}])
    (tmp_path / "b.json").write_text(json.dumps([{"text": "three"}]))
    pq.write_table(pa.table({"text": ["four", "five"]}), tmp_path / "c.parquet")
    tree = tmp_path / "tree" / "sub"
    tree.mkdir(parents=True)
    (tree / "x.py").write_text("six")
    (tree.parent / "y.md").write_text("seven")
    (tree / ".hidden").mkdir()
    (tree / ".hidden" / "z.txt").write_text("hidden")
    (tree / "__pycache__").mkdir()
    (tree / "__pycache__" / "x.cpython-311.pyc").write_bytes(b"\x00bytecode")
    (tree / "__pycache__" / "notes.txt").write_text("cache")
    paths = [str(tmp_path / name) for name in ("a.jsonl", "b.json", "c.parquet", "tree")]
    documents, bad = read_documents(paths, "text")
    assert documents == ["one", "two", "three", "four", "five", "six", "seven"]
    assert bad.total == 0, "hidden folders and bytecode caches are skipped, not reported"


def test_bad_rows_are_counted_per_reason_not_raised(tmp_path):
    (tmp_path / "rows.jsonl").write_bytes(b"\n".join([
        b'{"text": "good"}', b'{"body": "no text field"}', b'{"text": 5}', b'{"text": "   "}',
        b'{"text": "bad \xff byte"}', b'{not json', b'["not an object"]']))
    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    pq.write_table(pa.table({"text": pa.array([], pa.string())}), tmp_path / "none.parquet")
    documents, bad = read_documents([str(tmp_path / n) for n in
                                     ("rows.jsonl", "empty.txt", "latin1.txt", "none.parquet")], "text")
    assert documents == ["good"]
    assert bad.counts == {"missing_field": 1, "not_a_string": 1, "empty_text": 1, "undecodable": 2, "bad_json": 1,
                          "not_an_object": 1, "empty_file": 2}
    assert any("rows.jsonl:5" in example for example in bad.examples["undecodable"])
    assert "2 undecodable" in str(bad)


def test_a_row_nested_deeper_than_the_recursion_limit_is_a_bad_row(tmp_path):
    deep = "[" * 200_000 + "]" * 200_000
    parses = "[" * 900 + "]" * 900  # parses, but a repr() of it a few calls deeper would recurse too far
    (tmp_path / "rows.jsonl").write_text(f'{{"text": "good"}}\n{deep}\n{{"text": "also good"}}\n'
                                         f'{{"text": {parses}}}\n{{"text": "x", "meta": [[[["fine"]]]]}}\n')
    (tmp_path / "whole.json").write_text(deep)
    documents, bad = read_documents([str(tmp_path / "rows.jsonl"), str(tmp_path / "whole.json")], "text")
    assert documents == ["good", "also good", "x"]
    assert bad.counts == {"too_deeply_nested": 3}
    assert any("rows.jsonl:2" in example for example in bad.examples["too_deeply_nested"])


def test_missing_path_is_a_data_error_naming_it(tmp_path):
    with pytest.raises(DataError, match="nowhere.jsonl"):
        read_documents([str(tmp_path / "nowhere.jsonl")], "text")


def test_nothing_usable_is_a_data_error_with_the_reasons(tmp_path):
    path = write_jsonl(tmp_path / "rows.jsonl", [{"body": "x"}, {"text": ""}])
    with pytest.raises(DataError, match="missing_field.*empty_text|empty_text.*missing_field"):
        read_documents([path], "text")


def test_pretraining_rows_are_deterministic_per_seed(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "docs.jsonl", [{"text": f"document number {i} " * (i % 5 + 1)} for i in range(30)])
    first, _ = pretraining_rows([path], "text", tokenizer, 64, seed=3)
    again, _ = pretraining_rows([path], "text", tokenizer, 64, seed=3)
    other, _ = pretraining_rows([path], "text", tokenizer, 64, seed=4)
    assert first == again and first != other
    assert all(len(row["input_ids"]) == 64 for row in first)


def test_literal_special_token_text_in_a_document_stays_text(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "docs.jsonl", [{"text": "a<|eos|>b"}])
    (row,), _ = pretraining_rows([path], "text", tokenizer, 16, seed=0)
    assert row["input_ids"].count(tokenizer.eos_token_id) == 1  # only the EOS packing appends


# ---------------------------------------------------------------- SFT

def trained_text(example, tokenizer):
    return tokenizer.decode([t for t, label in zip(example["input_ids"], example["labels"]) if label != IGNORE_INDEX])


def test_instruction_loss_only_on_the_response(tokenizer):
    example = sft_example({"instruction": "Add 2 and 3.", "input": "", "output": "5"}, tokenizer, "instruction",
                          "Q: {instruction}\nA: ", 64)
    assert tokenizer.decode(example["input_ids"]) == "Q: Add 2 and 3.\nA: 5<|eos|>"
    assert trained_text(example, tokenizer) == "5<|eos|>"


def test_chat_loss_only_on_assistant_turns(tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Bye"},
                {"role": "assistant", "content": "Ciao"}]
    example = sft_example({"messages": messages}, tokenizer, "chat", None, 256)
    assert trained_text(example, tokenizer) == "Hello<|eos|>\nCiao<|eos|>\n"


def test_chat_with_smollm2_template(tokenizer):
    from dist_ft.rank.model import load_tokenizer, smollm2_gguf

    gguf = smollm2_gguf()
    smol = load_tokenizer(str(gguf.parent), gguf.name)
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there"}]
    example = sft_example({"messages": messages}, smol, "chat", None, 256)
    assert trained_text(example, smol) == "Hello there<|im_end|>\n"
    assert "You are a helpful AI assistant" in smol.decode(example["input_ids"])  # the template's system prompt


def test_sft_prompt_too_long_is_dropped_and_long_response_cut(tokenizer):
    bad = BadRows()
    row = {"instruction": "x" * 50, "output": "y" * 50}
    assert sft_example(row, tokenizer, "instruction", "{instruction}", 40, bad=bad) is None
    cut = sft_example(row, tokenizer, "instruction", "{instruction}", 60, bad=bad)
    assert len(cut["input_ids"]) == 60 and trained_text(cut, tokenizer) == "y" * 10
    assert bad.counts == {"prompt_too_long": 1, "truncated": 1}


def test_sft_rows_count_bad_rows_and_fail_when_none_is_usable(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "sft.jsonl", [{"instruction": "a", "output": "b"}, {"instruction": "a"},
                                                {"messages": "not a list"}])
    rows, bad = sft_rows([path], tokenizer, "instruction", None, 64, seed=0)
    assert len(rows) == 1 and bad.counts == {"missing_field": 2}
    with pytest.raises(DataError, match="bad_messages"):
        sft_rows([path], tokenizer, "chat", None, 64, seed=0)


# ---------------------------------------------------------------- batch stream

def numbered_rows(count, seq_len=4):
    return [{"input_ids": [i] * seq_len, "position_ids": list(range(seq_len)), "labels": [i] * seq_len}
            for i in range(count)]


def row_ids(batch):
    return batch["input_ids"][:, 0].tolist()


def test_batches_are_long_tensors_without_attention_mask():
    batch = next(BatchStream(numbered_rows(4), 2, seed=0))
    assert set(batch) == {"input_ids", "position_ids", "labels"}
    assert batch["input_ids"].shape == (2, 4) and batch["input_ids"].dtype == torch.long


def test_resumed_stream_continues_with_the_exact_next_batch():
    stream = BatchStream(numbered_rows(10), 3, seed=7)
    for _ in range(5):  # crosses into the second epoch (3 steps per epoch)
        next(stream)
    state = stream.state_dict()
    expected = [row_ids(next(stream)) for _ in range(4)]
    resumed = BatchStream(numbered_rows(10), 3, seed=7)
    resumed.load_state_dict(state)
    assert [row_ids(next(resumed)) for _ in range(4)] == expected


def test_each_epoch_has_a_new_order_from_the_seed():
    def epoch_orders(seed):
        stream = BatchStream(numbered_rows(8), 4, seed=seed)
        return [row_ids(next(stream)) + row_ids(next(stream)) for _ in range(2)]

    first, second = epoch_orders(1)
    assert sorted(first) == sorted(second) == list(range(8)) and first != second
    assert epoch_orders(1) == [first, second]


def test_ranks_get_disjoint_shards_that_cover_the_global_order():
    rows = numbered_rows(13)
    ranks = [BatchStream(rows, 2, seed=5, dp_rank=r, dp_size=3) for r in range(3)]
    seen = [[i for _ in range(ranks[r].steps_per_epoch) for i in row_ids(next(ranks[r]))] for r in range(3)]
    assert all(not set(seen[a]) & set(seen[b]) for a in range(3) for b in range(a + 1, 3))
    assert len({i for shard in seen for i in shard}) == 12  # 2 steps × 3 ranks × 2 rows; 1 row waits
    single = BatchStream(rows, 6, seed=5)
    assert sorted(row_ids(next(single)) + row_ids(next(single))) == sorted(i for shard in seen for i in shard)


def test_resume_with_another_data_parallel_size_continues_the_global_order():
    rows = numbered_rows(16)
    two = [BatchStream(rows, 2, seed=0, dp_rank=r, dp_size=2) for r in range(2)]
    for stream in two:
        next(stream)
    one = BatchStream(rows, 4, seed=0)
    one.load_state_dict(two[0].state_dict())
    assert sorted(row_ids(next(one))) == sorted(row_ids(next(two[0])) + row_ids(next(two[1])))


def test_resume_refuses_other_data():
    state = BatchStream(numbered_rows(8), 2, seed=0).state_dict()
    with pytest.raises(ValueError, match="same data and seed"):
        BatchStream(numbered_rows(9), 2, seed=0).load_state_dict(state)
