"""The RULER-style generators (exact text and answers for a seed, prompts that fit) and RULER's scorer."""

from __future__ import annotations

import re
from collections import Counter

import pytest

from dist_ft.evaluation.ruler_tasks import (HAYSTACK, TASKS, _largest_fitting, make_sample, string_match_all)
from dist_ft.rank.tokenizer import byte_tokenizer

TOKENIZER = byte_tokenizer()


def tokens(text: str) -> int:
    return len(TOKENIZER(text, add_special_tokens=False)["input_ids"])


def test_a_seed_gives_exact_samples_that_fit_the_length():
    single = make_sample("niah_single", TOKENIZER, 1024, 0.5, 0)
    assert single.answers == ["9235312"] and single == make_sample("niah_single", TOKENIZER, 1024, 0.5, 0)
    assert single.prompt.startswith("Some special magic numbers are hidden within the following text. Make sure to "
                                    "memorize it. I will quiz you about the numbers for ramu-lanuba afterwards.\n")
    assert single.prompt.endswith("\nWhat are all the special magic numbers for ramu-lanuba mentioned in the "
                                  "provided text? The special magic numbers for ramu-lanuba mentioned in the "
                                  "provided text are")
    assert single.prompt.count("One of the special magic numbers for ramu-lanuba is: 9235312. ") == 1
    assert make_sample("niah_single", TOKENIZER, 1024, 0.5, 1).answers != single.answers
    for task in TASKS:  # the longest prompt that fits: one more haystack sentence would not
        sample = make_sample(task, TOKENIZER, 1024, 0.5, 0)
        assert 1024 - 100 < tokens(sample.prompt) <= 1024, task


@pytest.mark.parametrize("depth, where", [(0.0, "first"), (1.0, "last")])
def test_the_needle_sits_at_the_requested_depth(depth, where):
    sample = make_sample("niah_single", TOKENIZER, 1024, depth, 0)
    context = sample.prompt.split("\n")[1]
    sentences = re.findall(r"One of the special magic numbers for [a-z-]+ is: \d+\.|The grass is green\.", context)
    assert sentences[0 if where == "first" else -1].startswith("One of the special magic numbers")


def test_multi_key_value_and_query_answers():
    multikey = make_sample("niah_multikey", TOKENIZER, 2048, 0.5, 0)
    assert multikey.prompt.count("One of the special magic numbers for") == 4 and len(multikey.answers) == 1
    multivalue = make_sample("niah_multivalue", TOKENIZER, 2048, 0.5, 0)
    key = re.search(r"numbers for ([a-z-]+) afterwards", multivalue.prompt).group(1)
    assert sorted(re.findall(rf"for {key} is: (\d+)\.", multivalue.prompt)) == sorted(multivalue.answers)
    assert len(multivalue.answers) == 4
    multiquery = make_sample("niah_multiquery", TOKENIZER, 2048, 0.5, 0)
    pairs = dict(re.findall(r"for ([a-z-]+) is: (\d+)\.", multiquery.prompt))
    asked = re.search(r"numbers for (.+) afterwards", multiquery.prompt).group(1).replace(", and ", ", ").split(", ")
    assert [pairs[k] for k in asked] == multiquery.answers and len(asked) == 4


def test_variable_tracking_chains_the_answers_in_order():
    sample = make_sample("vt", TOKENIZER, 1024, 0.5, 0)
    assert sample.answers == ["OXXRG", "XKMTN", "RISAD", "IHNEK", "JJMMV"]
    assert "VAR OXXRG = 90500." in sample.prompt
    links = re.findall(r"VAR ([A-Z]{5}) = VAR ([A-Z]{5})\.", sample.prompt)
    assert links == [("XKMTN", "OXXRG"), ("RISAD", "XKMTN"), ("IHNEK", "RISAD"), ("JJMMV", "IHNEK")]
    assert "5 variables are assigned the value 90500, they are:" in sample.prompt


def test_common_words_are_the_ten_most_frequent():
    sample = make_sample("cwe", TOKENIZER, 1024, 0.0, 0)
    counts = Counter(re.findall(r"\d+\. ([a-z]+)", sample.prompt.split("\n")[1]))
    assert {w for w, n in counts.items() if n == 3} == set(sample.answers) and len(sample.answers) == 10
    assert set(counts.values()) == {1, 3}
    long = make_sample("cwe", TOKENIZER, 4096, 0.0, 0)
    assert set(Counter(re.findall(r"\d+\. ([a-z]+)", long.prompt.split("\n")[1])).values()) == {1, 6}


def test_string_match_all_scores_as_ruler():
    predictions = [" 1234567 and 7654321.", "only ABCDE", "nothing"]
    references = [["1234567", "7654321"], ["abcde", "FGHIJ"], ["42"]]
    assert string_match_all(predictions, references) == pytest.approx(100 * (1 + 0.5 + 0) / 3)


def test_the_bisection_finds_the_largest_haystack_that_fits():
    assert _largest_fitting(lambda k: 10 + 3 * k, 100) == 30
    assert _largest_fitting(lambda k: 10 + 3 * k, 9) is None
    assert tokens(HAYSTACK) == len(HAYSTACK)
