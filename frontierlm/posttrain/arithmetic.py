"""A procedurally generated arithmetic task whose difficulty a tiny model can climb.

Two styles of the same problems:
  expression  "What is 17 + 25?" -> "#### 42"
  word        GSM8K-style word problems with a worked answer, one line per step:
              "Mia has 7 apples. She buys 5 more. Then she gives away 3. How many apples does
              Mia have now?" -> "7 + 5 = 12\n12 - 3 = 9\n#### 9"
Difficulty is the number of digits per operand, the operators allowed and the number of terms;
problems are a pure function of (seed, index), so the SFT set, the RL or synth prompts and the
held-out evaluation are independent streams when drawn from different seeds. A word problem is
a story told in order, so its steps apply left to right (no operator precedence) and a step
never takes away more than there is. Answers end in the GSM8K final-answer form, so
`rewards.exact_match` checks them like GSM8K.

Write an SFT file (question/answer JSONL, format "qa" in a recipe):
  python -m frontierlm.posttrain.arithmetic data/arithmetic/sft.jsonl --n 4000 --digits 1
  python -m frontierlm.posttrain.arithmetic word.jsonl.gz --style word --operators +- --seed 3
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
STYLES = ("expression", "word")


@dataclass(frozen=True)
class Problem:
    question: str
    answer: str  # "#### 42": the GSM8K form every reward and eval reads


@dataclass(frozen=True)
class Difficulty:
    digits: int = 1  # operands have up to this many digits
    operators: str = "+"  # drawn uniformly for each gap between terms
    terms: int = 2
    style: str = "expression"  # or "word": GSM8K-style word problems (STYLES)

    def __post_init__(self) -> None:
        if self.digits < 1 or self.terms < 2:
            raise ValueError(f"arithmetic: digits >= 1 and terms >= 2, got {self}")
        if self.style not in STYLES:
            raise ValueError(f"arithmetic: style must be one of {STYLES}, got {self.style!r}")
        if not self.operators or set(self.operators) - set(OPERATORS):
            raise ValueError(
                f"arithmetic: operators must be drawn from {OPERATORS!r}, got {self.operators!r}"
            )


def make_problem(difficulty: Difficulty, seed: int, index: int) -> Problem:
    """Problem number `index` of the stream `seed` (independent of every other index)."""
    d = difficulty
    # The expression stream keeps the seed string it had before styles existed, so recipes and
    # results made with it draw the same problems.
    stream = f"Difficulty(digits={d.digits}, operators={d.operators!r}, terms={d.terms})"
    if d.style != "expression":
        stream = f"{stream}:{d.style}"
    rng = random.Random(f"{seed}:{index}:{stream}")
    if d.style == "word":
        return word_problem(d, rng)
    top = 10**difficulty.digits - 1
    terms = [rng.randint(0, top) for _ in range(difficulty.terms)]
    ops = [rng.choice(difficulty.operators) for _ in range(difficulty.terms - 1)]
    expression = str(terms[0])
    for op, term in zip(ops, terms[1:], strict=True):
        expression += f" {op} {term}"
    value = eval(expression, {"__builtins__": {}})  # digits and + - * only, built above
    return Problem(f"What is {expression}?", f"#### {value}")


# ----------------------------------------------------------------------------- word problems

NAMES = [("Mia", "she"), ("Tom", "he"), ("Ava", "she"), ("Sam", "he"), ("Lily", "she"),
         ("Ben", "he"), ("Emma", "she"), ("Jack", "he"), ("Zoe", "she"), ("Leo", "he")]  # fmt: skip
THINGS = ["apples", "marbles", "stickers", "books", "coins", "cookies", "pencils", "shells",
          "cards", "stamps"]  # fmt: skip
MORE = ["{P} buys {n} more.", "{P} finds {n} more.", "A friend gives {o} {n} more.",
        "{P} gets {n} more."]  # fmt: skip
LESS = ["{P} gives away {n}.", "{P} loses {n}.", "{P} sells {n}.", "{P} uses {n}."]
TIMES = ["Then {p} ends up with {n} times as many.", "Then the number grows {n} times."]
OBJECT = {"she": "her", "he": "him"}


def word_problem(d: Difficulty, rng: random.Random) -> Problem:
    """A story of one quantity changed term by term, and its worked answer."""
    name, pronoun = rng.choice(NAMES)
    things = rng.choice(THINGS)
    top = 10**d.digits - 1
    value = rng.randint(1, top)  # "has 0 apples" and "buys 0 more" read oddly: counts start at 1
    first_times = d.operators == "*" or (rng.random() < 0.5 and "*" in d.operators)
    sentences, steps = [], []
    if first_times:  # "3 bags with 4 apples in each": the product is the first quantity
        n = rng.randint(1, top)
        sentences.append(f"{name} has {value} bags with {n} {things} in each bag.")
        steps.append(f"{value} * {n} = {value * n}")
        value *= n
        more_terms = d.terms - 2
    else:
        sentences.append(f"{name} has {value} {things}.")
        more_terms = d.terms - 1
    subject = pronoun.capitalize()
    for _ in range(more_terms):
        op = rng.choice(d.operators)
        if op == "-":
            n = rng.randint(min(1, value), min(top, value))  # never more than there is
            template, new = rng.choice(LESS), value - n
        elif op == "+":
            n = rng.randint(1, top)
            template, new = rng.choice(MORE), value + n
        else:
            n = rng.randint(1, top)
            template, new = rng.choice(TIMES), value * n
        sentences.append(template.format(P=subject, p=pronoun, o=OBJECT[pronoun], n=n))
        steps.append(f"{value} {op} {n} = {new}")
        value = new
    sentences.append(f"How many {things} does {name} have now?")
    return Problem(" ".join(sentences), "\n".join([*steps, f"#### {value}"]))


def problems(difficulty: Difficulty, seed: int, n: int, start: int = 0) -> list[Problem]:
    return [make_problem(difficulty, seed, i) for i in range(start, start + n)]


def write_sft_file(
    path: Path, difficulty: Difficulty, seed: int, n: int, exclude: frozenset[str] = frozenset()
) -> None:
    """JSONL (gzip when the name ends in .gz) of `n` {"question", "answer"} records, skipping
    questions in `exclude` (a held-out file that shares no question with the training files)."""
    kept: list[Problem] = []
    index = 0
    while len(kept) < n:
        problem = make_problem(difficulty, seed, index)
        index += 1
        if problem.question not in exclude:
            kept.append(problem)
        elif index > 100 * n:
            raise ValueError(f"arithmetic: fewer than {n} problems outside --exclude")
    lines = "".join(json.dumps({"question": p.question, "answer": p.answer}) + "\n" for p in kept)
    data = gzip.compress(lines.encode(), mtime=0) if path.suffix == ".gz" else lines.encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as f:
        f.write(data)


def read_questions(path: Path) -> set[str]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        return {json.loads(line)["question"] for line in f if line.strip()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="write arithmetic Q/A pairs for SFT")
    parser.add_argument("out")
    parser.add_argument("--n", type=int, default=4000)
    parser.add_argument("--digits", type=int, default=1)
    parser.add_argument("--operators", default="+")
    parser.add_argument("--terms", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--style", choices=STYLES, default="expression")
    parser.add_argument(
        "--exclude", nargs="*", default=[], help="JSONL files whose questions are skipped"
    )
    args = parser.parse_args(argv)
    difficulty = Difficulty(args.digits, args.operators, args.terms, args.style)
    exclude = frozenset().union(*(read_questions(Path(p)) for p in args.exclude))
    write_sft_file(Path(args.out), difficulty, args.seed, args.n, exclude)
    print(f"wrote {args.n} problems ({difficulty}) to {args.out}")


if __name__ == "__main__":
    main()
