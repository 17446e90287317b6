"""Task metrics against hand-computed values and the libraries' own definitions."""

import pytest

from dist_ft.decoding.task_metrics import accuracy, bleu, chrf, exact_match, rouge_l, score


def test_exact_match_ignores_whitespace_runs_only():
    assert exact_match(["05/03/2024 ", "HOPPER, Grace", "x"], ["05/03/2024", "HOPPER,  Grace", "X"]) == \
        pytest.approx(200 / 3)
    assert exact_match(["The date is 05/03/2024"], ["05/03/2024"]) == 0.0


def test_accuracy_reads_the_label_on_the_first_line():
    assert accuracy(["Positive.\nbecause ...", "negative", ""], ["positive", "positive", "neutral"]) == \
        pytest.approx(100 / 3)


def test_rouge_l_is_the_longest_common_subsequence_f_measure():
    # LCS of "a b c d" and "a c d e" is "a c d": precision 3/4, recall 3/4
    assert rouge_l(["a b c d"], ["a c d e"]) == pytest.approx(75.0)
    assert rouge_l(["same words here"], ["same words here"]) == pytest.approx(100.0)


def test_bleu_and_chrf_are_sacrebleus_corpus_scores():
    assert bleu(["the cat sat on the mat"], ["the cat sat on the mat"]) == pytest.approx(100.0)
    assert chrf(["the cat sat on the mat"], ["the cat sat on the mat"]) == pytest.approx(100.0)
    assert 0 < chrf(["the cat sat"], ["the cat sat on the mat"]) < 100


def test_score_names_and_rejects_unknown_metrics():
    assert score(["exact_match"], ["a"], ["a"]) == {"exact_match": 100.0}
    with pytest.raises(ValueError, match="unknown metric"):
        score(["bleurt"], ["a"], ["a"])
    with pytest.raises(ValueError):
        exact_match(["a", "b"], ["a"])
