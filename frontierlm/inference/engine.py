"""Batched generation: the one entry point every generating stage calls (eval, RL rollouts,
synthetic data, chat).

`generate(model, prompts, params)` returns one `Completion` per prompt, in order. This version
re-reads each sequence's whole context at every step (no KV cache): it is the reference the
KV-cache engine (issue 8) must equal token for token, and it keeps the same signature.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from frontierlm.inference.sampling import SamplingParams, sample_next


@dataclass
class Completion:
    prompt_ids: list[int]
    ids: list[int]  # generated tokens; a stop token or stop string is not included
    finish_reason: str  # "stop" (stop id or stop string) or "length"
    logprobs: list[float] = field(default_factory=list)  # log p(token) under the raw model


def _stop_string_cut(text: str, stops: Sequence[str]) -> int | None:
    hits = [text.find(s) for s in stops if s in text]
    return min(hits) if hits else None


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    params: SamplingParams,
    tokenizer: Any = None,
    on_token: Callable[[int, int], None] | None = None,
) -> list[Completion]:
    """Sample a completion for each prompt. `tokenizer` (anything with `decode(ids)`) is needed
    only for `params.stop_strings`; a completion that produces a stop string is cut before it.
    `on_token(prompt_index, token_id)` is called for each token as it is accepted (streaming;
    tokens that turn out to belong to a stop string are reported before the cut)."""
    if params.stop_strings and tokenizer is None:
        raise ValueError("sampling: stop_strings need a tokenizer to decode the output")
    device = next(model.parameters()).device
    max_len = model.cfg.max_seq_len
    generator = None
    if params.seed is not None:
        generator = torch.Generator(device=device).manual_seed(params.seed)
    was_training = model.training
    model.eval()
    results = []
    for index, prompt in enumerate(prompts):
        if not prompt:
            raise ValueError("sampling: a prompt needs at least one token")
        ids, logprobs, reason = list(prompt), [], "length"
        seen = torch.zeros(1, model.vocab_size, dtype=torch.bool, device=device)
        seen[0, list(prompt)] = True
        for _ in range(params.max_new_tokens):
            context = torch.tensor([ids[-max_len:]], device=device)
            logits = model(context)[:, -1].float()
            token = int(sample_next(logits, params, generator, seen)[0])
            if token in params.stop_ids:
                reason = "stop"
                break
            logprobs.append(float(logits[0].log_softmax(-1)[token]))
            ids.append(token)
            seen[0, token] = True
            if on_token is not None:
                on_token(index, token)
            if params.stop_strings:
                new = ids[len(prompt) :]
                if _stop_string_cut(tokenizer.decode(new), params.stop_strings) is not None:
                    reason = "stop"
                    break
        new = ids[len(prompt) :]
        if reason == "stop" and params.stop_strings:
            new, logprobs = _trim_to_stop_string(new, logprobs, params.stop_strings, tokenizer)
        results.append(Completion(list(prompt), new, reason, logprobs))
    model.train(was_training)
    return results


def _trim_to_stop_string(
    ids: list[int], logprobs: list[float], stops: Sequence[str], tokenizer: Any
) -> tuple[list[int], list[float]]:
    """The longest prefix of tokens whose text ends before the first stop string (a token that
    straddles the stop string's start is dropped with it)."""
    cut = _stop_string_cut(tokenizer.decode(ids), stops)
    keep = len(ids)
    while cut is not None and keep and len(tokenizer.decode(ids[:keep])) > cut:
        keep -= 1
    return ids[:keep], logprobs[:keep]
