"""Multiple choice by completion log-likelihood (HellaSwag / ARC / MMLU style).

Each choice is scored as a continuation of the same context (`target_delimiter + choice`); the
prediction is the likeliest choice (`acc`) or the likeliest per UTF-8 byte of the choice text
(`acc_norm`, lm-evaluation-harness's length normalisation; lm-eval 0.4 divides by `len(str)`,
the same number for ASCII text). A cloze task (choices are answer texts of different lengths)
is where the two differ; with letter choices (" A", " B") they agree.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from frontierlm.eval.loglik import encode_pair, score_continuations
from frontierlm.eval.tasks import TaskSpec


def choice_requests(
    spec: TaskSpec, items: list[dict[str, Any]], tok, bos_id: int
) -> tuple[list[tuple[list[int], list[int]]], list[tuple[int, list[str], int]]]:
    """Token requests for every (item, choice) and, per item, (first request, choices, gold)."""
    if spec.format != "text":
        raise ValueError(f"task {spec.name}: multiple_choice supports format = 'text' only")
    pool = spec.fewshot_pool()
    requests: list[tuple[list[int], list[int]]] = []
    layout = []
    for index, item in enumerate(items):
        context = spec.context(item, pool, index)
        choices = spec.choice_texts(item)
        layout.append((len(requests), choices, spec.gold_index(item, choices)))
        for choice in choices:
            requests.append(encode_pair(tok, bos_id, context, spec.target_delimiter + choice))
    return requests, layout


def evaluate_multiple_choice(
    model, tok, bos_id: int, spec: TaskSpec, items: list[dict[str, Any]], batch_size: int = 16
) -> dict[str, Any]:
    requests, layout = choice_requests(spec, items, tok, bos_id)
    scores = [s.logprob for s in score_continuations(model, requests, batch_size)]
    records = []
    for first, choices, gold in layout:
        lls = np.array(scores[first : first + len(choices)])
        lengths = np.array([len(c.encode("utf-8")) for c in choices], dtype=float)
        pred, pred_norm = int(np.argmax(lls)), int(np.argmax(lls / np.maximum(lengths, 1)))
        records.append(
            {"gold": gold, "pred": pred, "pred_norm": pred_norm, "loglikelihoods": lls.tolist()}
        )
    n = len(records)
    return {
        "metrics": {
            "acc": sum(r["pred"] == r["gold"] for r in records) / n,
            "acc_norm": sum(r["pred_norm"] == r["gold"] for r in records) / n,
            "chance": float(np.mean([1 / len(c) for _, c, _ in layout])),
        },
        "items": records,
    }
