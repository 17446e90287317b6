"""Write the small learnable instruction task in launch/data/ (train / validation / test JSONL).

Three formatting tasks whose answers are checked exactly, in one fixed phrasing each, so a model
either learned the format or did not: a date written out → DD/MM/YYYY; a "First Last" name →
"LAST, First"; a list of words → the words sorted and joined by commas. An instruct model answers
them zero-shot with extra words or another format; fine-tuning teaches the terse exact answer.

    python benchmarks/make_task_data.py   # deterministic: seed 0, the same files every time
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from task_rows import unique_rows

OUT = Path(__file__).resolve().parents[1] / "launch" / "data"
SPLITS = {"train": 600, "validation": 60, "test": 60}
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]
FIRST = ["Ada", "Alan", "Grace", "Linus", "Barbara", "Edsger", "Donald", "Margaret", "Ken", "Dennis", "Frances",
         "John", "Radia", "Tim", "Sophie", "Guido", "Bjarne", "Hedy", "Claude", "Katherine"]
LAST = ["Lovelace", "Turing", "Hopper", "Torvalds", "Liskov", "Dijkstra", "Knuth", "Hamilton", "Thompson",
        "Ritchie", "Allen", "McCarthy", "Perlman", "Berners", "Wilson", "Rossum", "Stroustrup", "Lamarr",
        "Shannon", "Johnson"]
WORDS = ["apple", "river", "stone", "cloud", "maple", "tiger", "lemon", "ocean", "pixel", "raven", "candle",
         "forest", "garden", "silver", "bridge", "window", "rocket", "violin", "harbor", "meadow"]


def date_row(rng: random.Random) -> dict[str, str]:
    year, month, day = rng.randint(1950, 2049), rng.randint(1, 12), rng.randint(1, 28)
    return {"instruction": "Rewrite the date as DD/MM/YYYY.", "input": f"{MONTHS[month - 1]} {day}, {year}",
            "output": f"{day:02d}/{month:02d}/{year}"}


def name_row(rng: random.Random) -> dict[str, str]:
    first, last = rng.choice(FIRST), rng.choice(LAST)
    return {"instruction": "Write the name as LAST, First.", "input": f"{first} {last}",
            "output": f"{last.upper()}, {first}"}


def sort_row(rng: random.Random) -> dict[str, str]:
    words = rng.sample(WORDS, rng.randint(3, 5))
    return {"instruction": "Sort the words alphabetically, separated by commas.", "input": " ".join(words),
            "output": ", ".join(sorted(words))}


def rows(count: int, rng: random.Random, seen: set[str]) -> list[dict[str, str]]:
    """`count` rows cycling through the tasks; no input appears in two splits."""
    return unique_rows((date_row, name_row, sort_row), count, rng, seen)


def main() -> None:
    rng, seen = random.Random(0), set()
    for split, count in SPLITS.items():
        path = OUT / f"format_task_{split}.jsonl"
        path.write_text("".join(json.dumps(row) + "\n" for row in rows(count, rng, seen)))
        print(f"wrote {count} rows to {path}")


if __name__ == "__main__":
    main()
