"""GSM8K-style exact match: a k-shot prompt, a greedy answer, the final number checked.

Two scores as lm-evaluation-harness's gsm8k task reports them: `strict` reads the answer after
`####` (the format the few-shot answers teach), `flexible` the last number in the reply. Answers
are compared as numbers (`frontierlm/posttrain/rewards.py`: "1,000" equals "1000"), the same
check RL rewards and synthetic data use.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from frontierlm.eval.tasks import TaskSpec
from frontierlm.inference.engine import generate
from frontierlm.inference.sampling import SamplingParams
from frontierlm.posttrain.rewards import extract_answer, extract_last_number, normalize_number
from frontierlm.tokenizer.chat import ChatRenderer, Message
from frontierlm.tokenizer.train import BOS, END, EOS


def reference_answer(spec: TaskSpec, item: dict[str, Any]) -> str:
    raw = str(item.get(spec.gold, ""))
    answer = extract_answer(raw) or normalize_number(raw)
    if answer is None:
        raise ValueError(
            f"task {spec.name}: field {spec.gold!r} of item {raw[:80]!r} has no final number "
            "(`#### N` or a bare number)"
        )
    return answer


def prompt_ids(spec: TaskSpec, items: list[dict[str, Any]], tok) -> list[list[int]]:
    """Each item's prompt: BOS + the k-shot text, or (format chat) a user turn and the assistant
    tag, few-shot examples inside the user turn."""
    pool = spec.fewshot_pool()
    contexts = [spec.context(item, pool, i) for i, item in enumerate(items)]
    if spec.format == "chat":
        renderer = ChatRenderer(tok)
        return [
            renderer.render([Message("user", c)], add_generation_prompt=True).ids for c in contexts
        ]
    bos = tok.token_to_id(BOS)
    return [[bos, *tok.encode(c, add_special_tokens=False).ids] for c in contexts]


def stop_ids(tok) -> tuple[int, ...]:
    return tuple(i for i in (tok.token_to_id(t) for t in (END, EOS, BOS)) if i is not None)


def evaluate_exact_match(model, tok, spec: TaskSpec, items: list[dict[str, Any]]) -> dict[str, Any]:
    params = SamplingParams(
        max_new_tokens=spec.max_new_tokens,
        temperature=0.0,
        stop_ids=stop_ids(tok),
        stop_strings=tuple(spec.until),
    )
    completions = generate(model, prompt_ids(spec, items, tok), params, tokenizer=tok)
    records = []
    for item, completion in zip(items, completions, strict=True):
        text = tok.decode(completion.ids)
        reference = reference_answer(spec, item)
        records.append(
            {
                "reference": reference,
                "strict": extract_answer(text) == reference,
                "flexible": extract_last_number(text) == reference,
                "completion": text,
            }
        )
    n = len(records)
    return {
        "metrics": {
            "exact_match_strict": sum(r["strict"] for r in records) / n,
            "exact_match_flexible": sum(r["flexible"] for r in records) / n,
        },
        "items": records,
    }


def paired_comparison(before: Sequence[bool], after: Sequence[bool]) -> dict[str, Any]:
    """Two models' right/wrong on the same items: each accuracy with its Wilson 95% interval,
    the discordant counts, and McNemar's exact two-sided p-value (a binomial test on the items
    only one model gets right), the test for a change measured on shared items."""
    from frontierlm.eval.safety import wilson

    if len(before) != len(after) or not before:
        raise ValueError(f"paired_comparison: {len(before)} and {len(after)} items")
    n = len(before)
    only_after = sum(1 for b, a in zip(before, after, strict=True) if a and not b)
    only_before = sum(1 for b, a in zip(before, after, strict=True) if b and not a)
    discordant = only_after + only_before
    tail = sum(math.comb(discordant, k) for k in range(min(only_after, only_before) + 1))
    return {
        "n": n,
        "before": sum(before) / n,
        "after": sum(after) / n,
        "before_ci": wilson(sum(before), n),
        "after_ci": wilson(sum(after), n),
        "both": sum(1 for b, a in zip(before, after, strict=True) if a and b),
        "only_after": only_after,
        "only_before": only_before,
        "mcnemar_p": min(1.0, 2 * tail / 2**discordant) if discordant else 1.0,
    }
