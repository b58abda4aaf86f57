"""Log-likelihood of continuations: the scoring under multiple choice, the lm-eval adapter and
reward-model scoring of synthetic data.

Text pairs are split into tokens as lm-evaluation-harness does for causal models: whitespace at
the end of the context moves to the continuation, the whole string is encoded once and the
continuation is what follows the context's tokens. Every sequence starts with BOS, the token
every training document starts with. A sequence longer than the model's context keeps its last
`max_seq_len + 1` tokens (the context is cut from the left; the continuation is always scored).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class Scored:
    logprob: float  # sum of log p(continuation token | everything before it)
    greedy: bool  # every continuation token is the model's argmax (lm-eval's is_greedy)


def encode_pair(tok, bos_id: int, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids with BOS first, continuation ids), split as lm-eval's `_encode_pair`."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    encode = lambda text: tok.encode(text, add_special_tokens=False).ids  # noqa: E731
    whole = encode(context + continuation)
    context_ids = encode(context)
    return [bos_id, *context_ids], whole[len(context_ids) :]


@torch.no_grad()
def score_continuations(
    model: nn.Module,
    requests: Sequence[tuple[Sequence[int], Sequence[int]]],
    batch_size: int = 16,
) -> list[Scored]:
    """Score each (context_ids, continuation_ids): one forward pass per batch of requests,
    longest first so batches pad little; results in request order."""
    device = next(model.parameters()).device
    max_len = model.cfg.max_seq_len
    for i, (context, continuation) in enumerate(requests):
        if not context or not continuation:
            raise ValueError(f"loglikelihood request {i}: context and continuation need tokens")
    order = sorted(range(len(requests)), key=lambda i: -sum(map(len, requests[i])))
    results: list[Scored | None] = [None] * len(requests)
    was_training = model.training
    model.eval()
    for first in range(0, len(order), batch_size):
        chunk = order[first : first + batch_size]
        rows, spans = [], []
        for i in chunk:
            context, continuation = requests[i]
            full = [*context, *continuation][-(max_len + 1) :]
            inputs = full[:-1]
            n = min(len(continuation), len(inputs))  # a continuation longer than the window
            rows.append(inputs)
            spans.append((len(inputs) - n, len(inputs), full[len(full) - n :]))
        width = max(len(r) for r in rows)
        batch = torch.zeros(len(rows), width, dtype=torch.long, device=device)
        for r, ids in enumerate(rows):  # right padding: a causal model never looks at it
            batch[r, : len(ids)] = torch.tensor(ids, device=device)
        logprobs = model(batch).float().log_softmax(dim=-1)
        for r, i in enumerate(chunk):
            start, end, targets = spans[r]
            lp = logprobs[r, start:end]
            target = torch.tensor(targets, device=device)
            results[i] = Scored(
                logprob=float(lp.gather(-1, target[:, None]).sum()),
                greedy=bool((lp.argmax(dim=-1) == target).all()),
            )
    model.train(was_training)
    return results  # type: ignore[return-value]
