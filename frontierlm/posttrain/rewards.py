"""Verifiable rewards: answer extraction and exact-match checking for GSM8K-style answers, and
the reward functions RL names in its config (exact match, format).

Shared by RL (reward functions), evaluation (exact match) and synthetic data (the verifier), so
all three judge an answer the same way. A GSM8K reference ends with `#### 72`; a model's answer
is read from its own `#### ...` line when it writes one, else (`fallback="last_number"`) from the
last number in the text, as lm-evaluation-harness's flexible-extract filter does.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Callable, Sequence
from decimal import Decimal, InvalidOperation
from fractions import Fraction

FINAL_ANSWER = re.compile(r"####\s*(-?[\d,]*\.?\d+)")
NUMBER = re.compile(r"-?[\d,]*\.?\d+")


def normalize_number(text: str) -> str | None:
    """'1,000' -> '1000', '3.50' -> '3.5', '-0' -> '0'; None when `text` is not a number."""
    try:
        value = Decimal(text.replace(",", "").strip().rstrip("."))
    except InvalidOperation:
        return None
    if value == value.to_integral_value():
        return str(int(value))
    return format(value.normalize(), "f")


def extract_answer(text: str, fallback: str = "none") -> str | None:
    """The normalised final answer of `text`: the number after the first `####`, else (with
    `fallback="last_number"`) the last number in the text, else None."""
    if match := FINAL_ANSWER.search(text):
        return normalize_number(match.group(1))
    if fallback == "last_number":
        return extract_last_number(text)
    if fallback not in ("none", "last_number"):
        raise ValueError(f"fallback must be 'none' or 'last_number', not {fallback!r}")
    return None


def exact_match(completion: str, reference: str, fallback: str = "none") -> bool:
    """True when the completion's final answer equals the reference's (`#### N` or a bare N)."""
    expected = extract_answer(reference) or normalize_number(reference)
    return expected is not None and extract_answer(completion, fallback) == expected


def extract_last_number(text: str) -> str | None:
    """The last number anywhere in `text`, normalised: lm-evaluation-harness's gsm8k
    "flexible-extract" (which ignores `####` and takes the last number it finds)."""
    numbers = NUMBER.findall(text)
    return normalize_number(numbers[-1]) if numbers else None


# A written calculation: numbers joined by + - * / (or ×), then "=" and a number;
# GSM8K's calculator annotations `<<48/2=24>>` are the same thing inside brackets.
_NUM = r"\d[\d,]*(?:\.\d+)?"
_NOT_AFTER = r"(?<![*/+×)-]\s)(?<![\w.,*/+×)-])"  # not the tail of a longer expression
CALCULATION = re.compile(
    rf"{_NOT_AFTER}(\(?-?{_NUM}(?:\s*[-+*/×]\s*\(?-?{_NUM}\)?)+)\s*=\s*\$?(-?{_NUM})(?![\d/])"
)


OPERATORS = ast.Add | ast.Sub | ast.Mult | ast.Div


def _evaluate(expression: str) -> Fraction | None:
    """The exact value of digits, + - * / and brackets; None when it is anything else."""
    cleaned = expression.replace(",", "").replace("×", "*")
    try:
        tree = ast.parse(cleaned, mode="eval").body
    except SyntaxError:
        return None

    def value(node: ast.AST) -> Fraction:
        if isinstance(node, ast.Constant) and isinstance(node.value, int | float):
            return Fraction(str(node.value))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -value(node.operand)
        if isinstance(node, ast.BinOp) and isinstance(
            node.op, ast.Add | ast.Sub | ast.Mult | ast.Div
        ):
            a, b = value(node.left), value(node.right)
            if isinstance(node.op, ast.Add):
                return a + b
            if isinstance(node.op, ast.Sub):
                return a - b
            if isinstance(node.op, ast.Mult):
                return a * b
            return a / b
        raise ValueError(node)

    try:
        return value(tree)
    except (ValueError, ZeroDivisionError):
        return None


def wrong_calculations(text: str) -> list[str]:
    """The written calculations in `text` (`7 + 5 = 12`, `<<48/2=24>>`) whose result is wrong
    (beyond rounding to the digits written); text that is not a calculation is not judged."""
    wrong = []
    for match in CALCULATION.finditer(text):
        expected = _evaluate(match.group(1))
        if expected is None:
            continue
        written = Fraction(match.group(2).replace(",", ""))
        decimals = len(match.group(2).partition(".")[2])
        if abs(expected - written) > Fraction(1, 2 * 10**decimals):
            wrong.append(match.group(0))
    return wrong


# ----------------------------------------------------------------------------- reward functions
# A reward function scores a batch: (prompts, completions, references) -> one float each, the
# signature TRL's reward functions have (prompts and completions as text). RL names them in
# `rl.rewards` (name -> weight); the weighted sum is the reward of a completion.

RewardFn = Callable[[Sequence[str], Sequence[str], Sequence[str]], list[float]]


def exact_match_reward(
    prompts: Sequence[str], completions: Sequence[str], references: Sequence[str]
) -> list[float]:
    """1.0 when the completion's `#### N` answer equals the reference's, else 0.0 (no fallback
    to the last number: the format is part of the task)."""
    return [float(exact_match(c, r)) for c, r in zip(completions, references, strict=True)]


def format_reward(
    prompts: Sequence[str], completions: Sequence[str], references: Sequence[str]
) -> list[float]:
    """1.0 when the completion ends with exactly one `#### N` final-answer line (whatever N)."""
    scores = []
    for text in completions:
        lines = text.strip().splitlines()
        last_is_answer = bool(lines) and FINAL_ANSWER.fullmatch(lines[-1].strip()) is not None
        scores.append(float(last_is_answer and text.count("####") == 1))
    return scores


REWARD_FUNCTIONS: dict[str, RewardFn] = {
    "exact_match": exact_match_reward,
    "format": format_reward,
}
# "reward_model" is built by the rl stage (it needs a trained model): see reward_model.py.
MODEL_REWARDS = ("reward_model",)


def reward_function(name: str) -> RewardFn:
    if name not in REWARD_FUNCTIONS:
        known = sorted([*REWARD_FUNCTIONS, *MODEL_REWARDS])
        raise ValueError(f"rl.rewards: no reward function called {name!r}; known: {known}")
    return REWARD_FUNCTIONS[name]
