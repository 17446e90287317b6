"""Supervised fine-tuning examples: token ids with loss only on what the model should say.

A row becomes text pieces, each marked trained or not (the prompt is not, the
response is); pieces are tokenized separately so the label mask follows the
text exactly, whatever the tokenizer.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from transformers import PreTrainedTokenizerBase

from dist_ft.recipe.prompts import CHAT_TEMPLATE, chat_template, drops_input, instruction_prompt, uses_chat_template
from .format import IGNORE_INDEX
from .read import BadRows

FORMATS = ("instruction", "chat", "text")

Piece = tuple[str, bool]  # (text, trained)


def sft_example(row: Mapping[str, Any], tokenizer: PreTrainedTokenizerBase, fmt: str, template: str | None,
                seq_len: int, *, text_field: str = "text", bad: BadRows | None = None) -> dict[str, list[int]] | None:
    """{"input_ids", "labels"} of at most `seq_len` tokens, or None (counted in `bad`).

    fmt "instruction": rows with instruction / input (optional) / output; `template`
    as prompts.py says (a name, or a str.format prompt with {instruction} and {input}).
    fmt "chat": rows with `messages` [{role, content}] (or ShareGPT's `conversations` [{from, value}]); loss
    on assistant turns.
    `template` is a Jinja chat template overriding the tokenizer's (or `chat_template`).
    fmt "text": loss on all of row[text_field].
    A prompt that alone fills `seq_len` drops the row; a long response is cut.
    """
    if fmt not in FORMATS:
        raise ValueError(f"fmt must be one of {FORMATS}, got {fmt!r}")
    bad = bad if bad is not None else BadRows()
    pieces = _pieces(row, tokenizer, fmt, template, text_field, bad)
    if pieces is None:
        return None
    input_ids, labels = _tokenize(pieces, tokenizer)
    if all(label == IGNORE_INDEX for label in labels):
        bad.add("no_response", _show(row))
        return None
    prompt_len = next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)
    if prompt_len >= seq_len:
        bad.add("prompt_too_long", f"{prompt_len} prompt tokens: {_show(row)}")
        return None
    if len(input_ids) > seq_len:
        bad.add("truncated", f"{len(input_ids)} tokens: {_show(row)}")
    return {"input_ids": input_ids[:seq_len], "labels": labels[:seq_len]}


def _pieces(row: Mapping[str, Any], tokenizer: PreTrainedTokenizerBase, fmt: str, template: str | None,
            text_field: str, bad: BadRows) -> list[Piece] | None:
    problem = format_problem(row, fmt, text_field)
    if problem:
        bad.add(problem, _show(row))
        return None
    if fmt == "chat":
        messages = row.get("messages") if "messages" in row else _sharegpt(row.get("conversations"))
        return _chat_pieces(messages, tokenizer, template, row, bad)
    if fmt == "text":
        return [(row[text_field], True), (tokenizer.eos_token, True)]
    return _instruction_pieces(row, tokenizer, template, bad)


def _instruction_pieces(row: Mapping[str, Any], tokenizer: PreTrainedTokenizerBase, template: str | None,
                        bad: BadRows) -> list[Piece]:
    instruction, output, extra = row["instruction"], row["output"], row.get("input") or ""
    if uses_chat_template(template, bool(tokenizer.chat_template)):
        user = f"{instruction}\n\n{extra}" if extra else instruction
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
        return _chat_pieces(messages, tokenizer, None, row, bad)
    if extra and drops_input(template):
        bad.add("input_not_in_template", _show(row))  # kept, but the user should know
    return [(instruction_prompt(template, instruction, extra), False), (output, True), (tokenizer.eos_token, True)]


def _chat_pieces(messages: list[dict[str, str]], tokenizer: PreTrainedTokenizerBase, template: str | None,
                 row: Mapping[str, Any], bad: BadRows) -> list[Piece] | None:
    """Split the rendered conversation at each assistant turn's start and end.

    A turn starts where the template's generation prompt for it ends, and ends
    where the conversation rendered up to it ends. That only holds for templates
    whose rendering of a conversation starts with its rendering of each prefix.
    """
    if template == CHAT_TEMPLATE:
        template = None
    template = template or tokenizer.chat_template or chat_template(tokenizer.eos_token)

    def render(turns: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
        return tokenizer.apply_chat_template(turns, chat_template=template, tokenize=False,
                                             add_generation_prompt=add_generation_prompt)

    full = render(messages)
    pieces, done = [], 0
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start, end = render(messages[:index], True), render(messages[:index + 1])
        if not (full.startswith(start) and full.startswith(end) and done <= len(start) <= len(end)):
            bad.add("chat_template_not_prefix_stable", _show(row))
            return None
        pieces += [(full[done:len(start)], False), (full[len(start):len(end)], True)]
        done = len(end)
    return [*pieces, (full[done:], False)]


def _tokenize(pieces: list[Piece], tokenizer: PreTrainedTokenizerBase) -> tuple[list[int], list[int]]:
    input_ids: list[int] = []
    labels: list[int] = []
    for text, trained in pieces:
        if not text:
            continue
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        input_ids += ids
        labels += ids if trained else [IGNORE_INDEX] * len(ids)
    return input_ids, labels


SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


def _sharegpt(turns: Any) -> Any:
    """ShareGPT rows (`conversations: [{from: human|gpt|system, value}]`) as chat messages; anything else as
    given, for _valid_messages to refuse."""
    if not isinstance(turns, list) or not all(isinstance(t, dict) and t.get("from") in SHAREGPT_ROLES
                                              for t in turns):
        return turns
    return [{"role": SHAREGPT_ROLES[t["from"]], "content": t.get("value")} for t in turns]


def format_problem(row: Mapping[str, Any], fmt: str, text_field: str = "text") -> str | None:
    """Why a row lacks what its format reads (the bad-row reason sft_example gives it), else None: a check
    that needs no tokenizer (the launcher samples rows with it before a prepare job)."""
    if fmt == "chat":
        messages = row.get("messages") if "messages" in row else _sharegpt(row.get("conversations"))
        return None if _valid_messages(messages) else "bad_messages"
    if fmt == "text":
        text = row.get(text_field)
        return None if isinstance(text, str) and text.strip() else "missing_field"
    extra = row.get("input") or ""
    fits = _nonempty(row.get("instruction")) and _nonempty(row.get("output")) and isinstance(extra, str)
    return None if fits else "missing_field"


def show_row(row: Mapping[str, Any]) -> str:
    return _show(row)


def _valid_messages(messages: Any) -> bool:
    return (isinstance(messages, list) and bool(messages)
            and all(isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                    for m in messages))


def _nonempty(value: Any) -> bool:
    return isinstance(value, str) and bool(value.strip())


def _show(row: Mapping[str, Any]) -> str:
    return repr(dict(row))[:120]


# ---- prompts and references for generation (evaluation during fine-tuning) ----------------------------------

def answer_examples(rows: list[Mapping[str, list[int]]]) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, reference ids) of every example in SFT rows, packed or not, in order: the tokens the
    model saw before its first trained span, and that span (the first assistant turn, its end-of-turn
    tokens included). Examples are the rows' segments (where position_ids restart); one without a trained
    token (padding) gives none."""
    examples = []
    for row in rows:
        ids, labels = row["input_ids"], row["labels"]
        positions = row.get("position_ids") or range(len(ids))
        starts = [0] + [i for i in range(1, len(ids)) if positions[i] != positions[i - 1] + 1]
        for start, end in zip(starts, [*starts[1:], len(ids)]):
            first = next((i for i in range(start, end) if labels[i] != IGNORE_INDEX), None)
            if first is None or first == start:
                continue
            last = next((i for i in range(first, end) if labels[i] == IGNORE_INDEX), end)
            examples.append((list(ids[start:first]), list(ids[first:last])))
    return examples


def prompt_ids(text: str, tokenizer: PreTrainedTokenizerBase, fmt: str, template: str | None,
               seq_len: int) -> list[int] | None:
    """The tokens a stage puts before the answer to `text`: an instruction (or a chat user turn) rendered as
    fine-tuning renders it; text rows continue the text as given. None when it does not fit seq_len."""
    if fmt == "text":
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        return ids if 0 < len(ids) < seq_len else None
    row = {"instruction": text, "output": "x"} if fmt == "instruction" else \
        {"messages": [{"role": "user", "content": text}, {"role": "assistant", "content": "x"}]}
    example = sft_example(row, tokenizer, fmt, template, seq_len + 8, bad=BadRows())
    if example is None:
        return None
    first = next(i for i, label in enumerate(example["labels"]) if label != IGNORE_INDEX)
    return example["input_ids"][:first] if first < seq_len else None
