"""A procedurally generated arithmetic task whose difficulty a tiny model can climb.

"What is 17 + 25?" -> "#### 42". Difficulty is the number of digits per operand, the operators
allowed and the number of terms; problems are a pure function of (seed, index), so the SFT set,
the RL prompts and the held-out evaluation never overlap when drawn from different seeds.
Answers use the GSM8K final-answer form, so `rewards.exact_match` checks them like GSM8K.

Write an SFT file (question/answer JSONL, format "qa" in a recipe):
  python -m frontierlm.posttrain.arithmetic data/arithmetic/sft.jsonl --n 4000 --digits 1
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
from dataclasses import dataclass
from pathlib import Path

from frontierlm.atomic import atomic_file

OPERATORS = "+-*"


@dataclass(frozen=True)
class Problem:
    question: str
    answer: str  # "#### 42": the GSM8K form every reward and eval reads


@dataclass(frozen=True)
class Difficulty:
    digits: int = 1  # operands have up to this many digits
    operators: str = "+"  # drawn uniformly for each gap between terms
    terms: int = 2

    def __post_init__(self) -> None:
        if self.digits < 1 or self.terms < 2:
            raise ValueError(f"arithmetic: digits >= 1 and terms >= 2, got {self}")
        if not self.operators or set(self.operators) - set(OPERATORS):
            raise ValueError(
                f"arithmetic: operators must be drawn from {OPERATORS!r}, got {self.operators!r}"
            )


def make_problem(difficulty: Difficulty, seed: int, index: int) -> Problem:
    """Problem number `index` of the stream `seed` (independent of every other index)."""
    rng = random.Random(f"{seed}:{index}:{difficulty}")
    top = 10**difficulty.digits - 1
    terms = [rng.randint(0, top) for _ in range(difficulty.terms)]
    ops = [rng.choice(difficulty.operators) for _ in range(difficulty.terms - 1)]
    expression = str(terms[0])
    for op, term in zip(ops, terms[1:], strict=True):
        expression += f" {op} {term}"
    value = eval(expression, {"__builtins__": {}})  # digits and + - * only, built above
    return Problem(f"What is {expression}?", f"#### {value}")


def problems(difficulty: Difficulty, seed: int, n: int, start: int = 0) -> list[Problem]:
    return [make_problem(difficulty, seed, i) for i in range(start, start + n)]


def write_sft_file(path: Path, difficulty: Difficulty, seed: int, n: int) -> None:
    """JSONL (gzip when the name ends in .gz) of {"question", "answer"} records."""
    lines = "".join(
        json.dumps({"question": p.question, "answer": p.answer}) + "\n"
        for p in problems(difficulty, seed, n)
    )
    data = gzip.compress(lines.encode(), mtime=0) if path.suffix == ".gz" else lines.encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as f:
        f.write(data)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="write arithmetic Q/A pairs for SFT")
    parser.add_argument("out")
    parser.add_argument("--n", type=int, default=4000)
    parser.add_argument("--digits", type=int, default=1)
    parser.add_argument("--operators", default="+")
    parser.add_argument("--terms", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    difficulty = Difficulty(args.digits, args.operators, args.terms)
    write_sft_file(Path(args.out), difficulty, args.seed, args.n)
    print(f"wrote {args.n} problems ({difficulty}) to {args.out}")


if __name__ == "__main__":
    main()
