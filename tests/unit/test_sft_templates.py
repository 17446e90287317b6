"""One row of each SFT format and template, rendered: the exact prompt text the model sees and the
exact label mask (which tokens are -100). The byte tokenizer makes both readable: one token per byte,
special tokens whole. Named templates must resolve to their text (`alpaca` once rendered as the
literal word "alpaca", dropping every instruction); a bad template is a plan-time error."""

from __future__ import annotations

import pytest

from dist_ft.cli import main
from dist_ft.rank.data import IGNORE_INDEX, BadRows, sft_example
from dist_ft.rank.tokenizer import byte_tokenizer
from tests.conftest import demo_raw

ROW = {"instruction": "Reverse the word.", "input": "rocket", "output": "tekcor"}
NO_INPUT = {"instruction": "Name a colour.", "output": "red"}

ALPACA_WITH_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further "
                     "context. Write a response that appropriately completes the request.\n\n"
                     "### Instruction:\nReverse the word.\n\n### Input:\nrocket\n\n### Response:\n")
ALPACA_WITHOUT_INPUT = ("Below is an instruction that describes a task. Write a response that appropriately "
                        "completes the request.\n\n### Instruction:\nName a colour.\n\n### Response:\n")
CHAT_PROMPT = "<|user|>\nReverse the word.\n\nrocket<|eos|>\n<|assistant|>\n"


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


def render(tok, row, fmt="instruction", template=None, seq_len=1024, bad=None):
    """(prompt text, trained text, text after the trained part, labels == ids where trained)."""
    example = sft_example(row, tok, fmt, template, seq_len, bad=bad)
    ids, labels = example["input_ids"], example["labels"]
    trained = [i for i, label in enumerate(labels) if label != IGNORE_INDEX]
    first, last = trained[0], trained[-1]
    assert all(labels[i] == ids[i] for i in trained)  # a trained label is the token itself
    return tok.decode(ids[:first]), tok.decode(ids[first:last + 1]), tok.decode(ids[last + 1:]), labels


def test_alpaca_with_input_is_the_alpaca_prompt(tok):
    prompt, trained, rest, labels = render(tok, ROW, template="alpaca")
    assert (prompt, trained, rest) == (ALPACA_WITH_INPUT, "tekcor<|eos|>", "")
    assert labels == [IGNORE_INDEX] * len(ALPACA_WITH_INPUT.encode()) + [*b"tekcor", tok.eos_token_id]


def test_alpaca_without_input_uses_the_no_input_prompt(tok):
    prompt, trained, rest, labels = render(tok, NO_INPUT, template="alpaca")
    assert (prompt, trained, rest) == (ALPACA_WITHOUT_INPUT, "red<|eos|>", "")
    assert labels.count(IGNORE_INDEX) == len(ALPACA_WITHOUT_INPUT.encode())


@pytest.mark.parametrize("template", [None, "chat_template"])
def test_the_tokenizers_chat_template(tok, template):
    prompt, trained, rest, labels = render(tok, ROW, template=template)
    assert (prompt, trained, rest) == (CHAT_PROMPT, "tekcor<|eos|>\n", "")
    assert labels[:len(tok(CHAT_PROMPT, add_special_tokens=False)["input_ids"])] == \
        [IGNORE_INDEX] * len(tok(CHAT_PROMPT, add_special_tokens=False)["input_ids"])


def test_a_format_string_template(tok):
    prompt, trained, rest, _ = render(tok, ROW, template="Q: {instruction} [{input}] {{literal}}\nA: ")
    assert (prompt, trained, rest) == ("Q: Reverse the word. [rocket] {literal}\nA: ", "tekcor<|eos|>", "")


def test_a_format_string_without_input_keeps_the_row_and_counts_it(tok):
    bad = BadRows()
    prompt, _, _, _ = render(tok, ROW, template="Do this: {instruction}\n", bad=bad)
    assert prompt == "Do this: Reverse the word.\n"
    assert bad.total == 1 and "input_not_in_template" in str(bad)


def test_chat_rows_train_only_the_assistant_turns(tok):
    row = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                        {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Bye"},
                        {"role": "assistant", "content": "Ciao"}]}
    example = sft_example(row, tok, "chat", None, 1024)
    ids, labels = example["input_ids"], example["labels"]
    assert tok.decode(ids) == ("<|system|>\nBe brief.<|eos|>\n<|user|>\nHi<|eos|>\n<|assistant|>\nHello<|eos|>\n"
                               "<|user|>\nBye<|eos|>\n<|assistant|>\nCiao<|eos|>\n")
    spans, current = [], []
    for token, label in zip(ids, labels):
        if label != IGNORE_INDEX:
            current.append(token)
        elif current:
            spans, current = [*spans, tok.decode(current)], []
    assert spans + ([tok.decode(current)] if current else []) == ["Hello<|eos|>\n", "Ciao<|eos|>\n"]


def test_text_rows_train_every_token(tok):
    example = sft_example({"text": "plain words"}, tok, "text", None, 1024)
    assert tok.decode(example["input_ids"]) == "plain words<|eos|>"
    assert example["labels"] == example["input_ids"]


@pytest.mark.parametrize("fmt, template, says", [
    ("instruction", "alpacca", "neither a template name nor a format string"),
    ("instruction", "Answer: {question}", "unknown placeholders ['question']"),
    ("instruction", "{instruction", "not a valid format string"),
    ("instruction", "{input} only", "neither a template name nor a format string"),
    ("chat", "alpaca", "an instruction-row prompt, not a chat template"),
    ("text", "alpaca", "text rows take no template"),
])
def test_a_bad_template_is_a_plan_time_error(recipe_file, tmp_path, capsys, fmt, template, says):
    raw = demo_raw()
    raw["finetune"].update(format=fmt, template=template)
    assert main(["render", str(recipe_file(raw))]) == 2
    err = capsys.readouterr().err
    assert "finetune.template: " in err and says in err and "fix:" in err, err
    assert not (tmp_path / "runs").exists()
