"""Write the demo's fine-tuning task, launch/data/demo_tasks.jsonl: instructions a 2-layer, 64-wide
byte-level model learns with LoRA in a few dozen steps, so `make demo` shows before/after learning.

Each answer is read off the end of the input, at a fixed distance from where the answer starts, and comes
from a small closed vocabulary: a number -> even/odd, a word -> its last letter, a word -> whether it is
written in capitals. The tiny model cannot copy or compute (reversing, adding, upper-casing a word stay
at 0-8 % exact match in the budget a demo has: docs/demo.md), but a fixed-offset lookup it learns.
Words and numbers are drawn without repeats, so held-out rows ask about inputs training never showed.

    python benchmarks/make_demo_data.py                      # deterministic: seed 0, the same file every time
    python benchmarks/make_demo_data.py --candidate copy --out /tmp/copy.jsonl   # the study's other sets
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from task_rows import unique_rows

OUT = Path(__file__).resolve().parents[1] / "launch" / "data" / "demo_tasks.jsonl"
ROWS = 480
WORDS = """apple river stone cloud maple tiger lemon ocean pixel raven candle forest garden silver bridge window
rocket violin harbor meadow basket button carpet castle cherry circle copper dragon engine falcon feather
finger flower ginger hammer helmet island jacket jungle kettle ladder lantern letter magnet marble mirror
monkey needle orange oyster paddle parrot pencil pepper pillow planet pocket puzzle rabbit ribbon saddle
salmon shadow shovel spider spoon squirrel summer sunset tablet teapot thunder ticket tomato tunnel turtle
valley velvet walnut whistle winter wizard yellow zebra anchor arrow badge bamboo barrel beacon blanket
bottle branch breeze bucket cactus camera canyon cobalt comet compass cotton crayon desert diamond dolphin
donkey eagle easel fabric fossil galaxy glacier goblet granite gravel guitar hazel hollow insect jasmine
kitten koala lagoon lizard lobster meteor mitten muffin napkin nectar nickel noodle oasis olive panda
pebble pickle pirate plum poppy quartz quill radish rainbow ranch reef saffron sapling scarf shell
sparrow spruce statue stump swan thistle timber tulip umbrella vapor walrus wagon willow yacht""".split()
BY_RULE = {
    "even_odd": lambda rng: _even_odd(rng),
    "last_letter": lambda rng: _last_letter(rng),
    "capitals": lambda rng: _capitals(rng),
    "first_letter": lambda rng: _first_letter(rng),
    "repeat": lambda rng: _repeat(rng),
}
CANDIDATES = {  # name -> the tasks it cycles through
    "lookup": ("even_odd", "last_letter", "capitals"),
    "copy": ("first_letter", "repeat", "last_letter"),
}


def _even_odd(rng: random.Random) -> dict[str, str]:
    n = rng.randint(1, 9999)
    return {"instruction": "Is the number even or odd?", "input": str(n), "output": "odd" if n % 2 else "even"}


def _last_letter(rng: random.Random) -> dict[str, str]:
    word = rng.choice(WORDS)
    return {"instruction": "What is the last letter of the word?", "input": word, "output": word[-1]}


def _capitals(rng: random.Random) -> dict[str, str]:
    word, upper = rng.choice(WORDS), rng.random() < 0.5
    return {"instruction": "Is the word written in capitals?", "input": word.upper() if upper else word,
            "output": "yes" if upper else "no"}


def _first_letter(rng: random.Random) -> dict[str, str]:
    word = rng.choice(WORDS)
    return {"instruction": "What is the first letter of the word?", "input": word, "output": word[0]}


def _repeat(rng: random.Random) -> dict[str, str]:
    word = rng.choice(WORDS)
    return {"instruction": "Repeat the word.", "input": word, "output": word}


def rows(tasks: tuple[str, ...], count: int, rng: random.Random) -> list[dict[str, str]]:
    """`count` rows cycling through `tasks`; a (task, input) pair appears once."""
    return unique_rows([BY_RULE[task] for task in tasks], count, rng, set())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--candidate", choices=sorted(CANDIDATES), default="lookup")
    parser.add_argument("--rows", type=int, default=ROWS)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    data = rows(CANDIDATES[args.candidate], args.rows, random.Random(0))
    args.out.write_text("".join(json.dumps(row) + "\n" for row in data))
    print(f"wrote {len(data)} rows to {args.out}")


if __name__ == "__main__":
    main()
