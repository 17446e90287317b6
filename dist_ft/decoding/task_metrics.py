"""Task metrics over generated answers and their references, as fine-tuning tutorials report them:
exact match, ROUGE-L (`rouge-score`), BLEU and chrF (`sacrebleu`), and accuracy when the references
are labels. Pure functions of two lists of strings; every value is in [0, 100].

Exact match and accuracy compare answers after `normalise` (runs of whitespace, and case for
accuracy only): a model that writes the right answer and stops is right; one that adds words is not. ROUGE-L, BLEU and chrF score the raw strings as those libraries define them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

METRICS = ("exact_match", "rouge_l", "bleu", "chrf", "accuracy")


def normalise(text: str) -> str:
    return " ".join(text.split())


def exact_match(predictions: Sequence[str], references: Sequence[str]) -> float:
    return _percent([normalise(p) == normalise(r) for p, r in zip(predictions, references, strict=True)])


def accuracy(predictions: Sequence[str], references: Sequence[str]) -> float:
    """References are class labels: a prediction is right when its first line names the label."""
    def label(text: str) -> str:
        return normalise(text.strip().splitlines()[0] if text.strip() else "").lower().rstrip(".")

    return _percent([label(p) == label(r) for p, r in zip(predictions, references, strict=True)])


def rouge_l(predictions: Sequence[str], references: Sequence[str]) -> float:
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    scores = [scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(predictions, references, strict=True)]
    return 100.0 * sum(scores) / len(scores) if scores else 0.0


def bleu(predictions: Sequence[str], references: Sequence[str]) -> float:
    import sacrebleu

    _check_lengths(predictions, references)
    return float(sacrebleu.corpus_bleu(list(predictions), [list(references)]).score) if predictions else 0.0


def chrf(predictions: Sequence[str], references: Sequence[str]) -> float:
    import sacrebleu

    _check_lengths(predictions, references)
    return float(sacrebleu.corpus_chrf(list(predictions), [list(references)]).score) if predictions else 0.0


SCORERS: dict[str, Callable[[Sequence[str], Sequence[str]], float]] = {
    "exact_match": exact_match, "rouge_l": rouge_l, "bleu": bleu, "chrf": chrf, "accuracy": accuracy}


def score(names: Sequence[str], predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """{metric: value} for each requested metric name (see METRICS)."""
    unknown = [name for name in names if name not in SCORERS]
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}; choose from {', '.join(METRICS)}")
    return {name: round(SCORERS[name](predictions, references), 4) for name in names}


def _percent(hits: list[bool]) -> float:
    return 100.0 * sum(hits) / len(hits) if hits else 0.0


def _check_lengths(predictions: Sequence[str], references: Sequence[str]) -> None:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
