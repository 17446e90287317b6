"""Passkey retrieval (Mohtashami & Jaggi 2023): a 5-digit key hidden in filler at a chosen depth.

Everything is built from token ids, so a haystack has exactly the requested token length
and the key sits at the requested relative depth of the filler, whatever the tokenizer.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .eval_nll import greedy_matches

INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
         "I will quiz you about the important info there.\n")
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = "\nWhat is the pass key? The pass key is"


@dataclass(frozen=True)
class Haystack:
    input_ids: list[int]  # prompt followed by the answer tokens
    answer_len: int
    key: str
    needle_start: int  # token position where the needle begins

    @property
    def prompt_len(self) -> int:
        return len(self.input_ids) - self.answer_len


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def make_haystack(tokenizer, length: int, depth: float, key: str) -> Haystack:
    """A prompt of exactly `length` tokens with the needle after `depth` of the filler tokens."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth {depth} is outside [0, 1]")
    intro, needle, question = _ids(tokenizer, INTRO), _ids(tokenizer, NEEDLE.format(key=key)), \
        _ids(tokenizer, QUESTION)
    answer = _ids(tokenizer, " " + key)
    filler_len = length - len(intro) - len(needle) - len(question)
    if filler_len < 0:
        raise ValueError(f"passkey length {length} is too short for the prompt "
                         f"({length - filler_len} tokens without filler)")
    filler = _filler(tokenizer, filler_len)
    before = min(_sentence_boundary(tokenizer, round(depth * filler_len)), filler_len)
    ids = intro + filler[:before] + needle + filler[before:] + question
    return Haystack(ids + answer, len(answer), key, len(intro) + before)


def _filler(tokenizer, count: int) -> list[int]:
    sentence = _ids(tokenizer, FILLER)
    repeats = count // len(sentence) + 1
    return (sentence * repeats)[:count]


def _sentence_boundary(tokenizer, position: int) -> int:
    # Snap to the nearest whole filler block so the needle never splits a sentence's tokens.
    block = len(_ids(tokenizer, FILLER))
    return round(position / block) * block if block else position


def random_keys(count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [str(rng.randint(10000, 99999)) for _ in range(count)]


def passkey_grid(model, tokenizer, lengths: Sequence[int], depths: Sequence[float], trials: int,
                 seed: int = 0, on_cell=None) -> dict[str, dict[str, float]]:
    """Accuracy per (length, depth): {str(length): {str(depth): fraction of trials retrieved}}."""
    grid: dict[str, dict[str, float]] = {}
    for length in lengths:
        row = grid.setdefault(str(length), {})
        for d_index, depth in enumerate(depths):
            keys = random_keys(trials, seed * 100_003 + length * 101 + d_index)
            hits = sum(_retrieved(model, tokenizer, length, depth, key) for key in keys)
            row[str(depth)] = hits / trials
            if on_cell is not None:
                on_cell(length, depth, row[str(depth)])
    return grid


def _retrieved(model, tokenizer, length: int, depth: float, key: str) -> bool:
    hay = make_haystack(tokenizer, length, depth, key)
    return greedy_matches(model, torch.tensor([hay.input_ids]), hay.answer_len)
