"""Synthetic chat datasets of small text transformations, for demos and tests: a tiny model visibly learns them.

Each task is a deterministic rule from a user message to the assistant reply (reverse the words,
sort the numbers, ...), over a small fixed vocabulary, so that even a randomly initialised model
trained for ~100 steps on a CPU lowers its validation loss: first the reply's format and word
distribution, then the rule itself. Train and validation splits come from one seeded stream and
never share an example.

    python -m workers.synthetic out/ --task reverse --n-train 400 --n-val 64 --seed 0
"""

from __future__ import annotations

import argparse
import json
import logging
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["TASKS", "make_synthetic_examples", "write_synthetic_dataset", "write_synthetic_splits"]

logger = logging.getLogger(__name__)

_WORDS = ("red", "blue", "green", "cat", "dog", "sun", "moon", "tree", "fish", "bird", "rock", "star")


def _reverse(rng: random.Random) -> tuple[str, str]:
    words = [rng.choice(_WORDS) for _ in range(rng.randint(3, 6))]
    return " ".join(words), " ".join(reversed(words))


def _sort(rng: random.Random) -> tuple[str, str]:
    numbers = [rng.randint(0, 99) for _ in range(rng.randint(3, 6))]
    return " ".join(map(str, numbers)), " ".join(map(str, sorted(numbers)))


def _uppercase(rng: random.Random) -> tuple[str, str]:
    words = [rng.choice(_WORDS) for _ in range(rng.randint(2, 5))]
    return " ".join(words), " ".join(words).upper()


def _first_last(rng: random.Random) -> tuple[str, str]:
    words = [rng.choice(_WORDS) for _ in range(rng.randint(3, 7))]
    return " ".join(words), f"{words[0]} {words[-1]}"


# task name -> (system instruction, generator of (user text, assistant reply))
TASKS: dict[str, tuple[str, Callable[[random.Random], tuple[str, str]]]] = {
    "reverse": ("Reverse the order of the words.", _reverse),
    "sort": ("Sort the numbers from smallest to largest.", _sort),
    "uppercase": ("Repeat the words in capital letters.", _uppercase),
    "first_last": ("Say the first and the last word.", _first_last),
}


def make_synthetic_examples(n: int, *, seed: int, task: str = "reverse") -> list[dict[str, Any]]:
    """`n` distinct chat examples of `task`, the same for the same seed."""
    if task not in TASKS:
        raise ValueError(f"unknown synthetic task {task!r}; choose one of {', '.join(TASKS)}")
    instruction, generate = TASKS[task]
    rng = random.Random(f"lorafleet-synthetic:{task}:{seed}")
    seen: set[str] = set()
    examples: list[dict[str, Any]] = []
    attempts = 0
    while len(examples) < n:
        attempts += 1
        if attempts > 100 * n + 1000:
            raise ValueError(f"task {task!r} cannot produce {n} distinct examples")
        question, answer = generate(rng)
        if question in seen:
            continue
        seen.add(question)
        examples.append(
            {
                "messages": [
                    {"role": "system", "content": instruction},
                    {"role": "user", "content": question},
                    {"role": "assistant", "content": answer},
                ]
            }
        )
    return examples


def _write_jsonl(path: Path, records: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
    return path


def write_synthetic_dataset(path: Path | str, n: int, *, seed: int, task: str = "reverse") -> Path:
    """Write `n` examples of `task` as chat JSONL to `path` and return it."""
    return _write_jsonl(Path(path), make_synthetic_examples(n, seed=seed, task=task))


def write_synthetic_splits(
    out_dir: Path | str, *, n_train: int, n_val: int, seed: int, task: str = "reverse"
) -> tuple[Path, Path]:
    """Write `train.jsonl` and `val.jsonl` (disjoint) under `out_dir`; returns their paths."""
    examples = make_synthetic_examples(n_train + n_val, seed=seed, task=task)
    out = Path(out_dir)
    train = _write_jsonl(out / "train.jsonl", examples[:n_train])
    val = _write_jsonl(out / "val.jsonl", examples[n_train:])
    logger.info("wrote %d train and %d validation examples of %r to %s", n_train, n_val, task, out)
    return train, val


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--task", choices=sorted(TASKS), default="reverse")
    parser.add_argument("--n-train", type=int, default=400)
    parser.add_argument("--n-val", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    write_synthetic_splits(args.out_dir, n_train=args.n_train, n_val=args.n_val, seed=args.seed, task=args.task)


if __name__ == "__main__":
    main()
