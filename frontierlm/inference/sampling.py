"""Choosing the next token from logits: temperature, top-k, top-p, min-p, repetition penalty.

Every filter works on a batch of rows at once, so the engine samples all its sequences in one
call. The order follows transformers' logits processors: repetition penalty on the raw logits,
then temperature, then the truncations (top-k, top-p, min-p) on the scaled distribution.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 256
    temperature: float = 1.0  # 0 means greedy (argmax)
    top_k: int = 0  # 0: no top-k
    top_p: float = 1.0  # 1: no nucleus truncation
    min_p: float = 0.0  # keep tokens with p >= min_p * p(most likely token)
    repetition_penalty: float = 1.0  # CTRL's penalty on tokens already in prompt or output
    stop_ids: tuple[int, ...] = ()  # the stop token ends the sequence and is not returned
    stop_strings: tuple[str, ...] = ()  # checked on the decoded output; needs a tokenizer
    seed: int | None = None  # a fixed seed gives the same samples for the same prompts

    def __post_init__(self) -> None:
        checks = {
            "max_new_tokens": self.max_new_tokens >= 0,
            "temperature": self.temperature >= 0,
            "top_k": self.top_k >= 0,
            "top_p": 0 < self.top_p <= 1,
            "min_p": 0 <= self.min_p < 1,
            "repetition_penalty": self.repetition_penalty > 0,
        }
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"sampling: {name}={getattr(self, name)!r} is out of range")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def apply_repetition_penalty(
    logits: torch.Tensor, seen: torch.Tensor, penalty: float
) -> torch.Tensor:
    """`seen` (batch, vocab) bool: positive logits of seen tokens divided by `penalty`, negative
    ones multiplied (Keskar et al. 2019, as transformers does)."""
    if penalty == 1.0:
        return logits
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def filter_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature-scaled logits (batch, vocab) with truncated tokens set to -inf."""
    logits = logits.float() / max(params.temperature, 1e-8)
    if params.top_k and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # Drop a token when the mass before it already reaches top_p; the first always stays.
        drop_sorted = probs.cumsum(dim=-1) - probs >= params.top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    if params.min_p > 0:
        probs = logits.softmax(dim=-1)
        floor = params.min_p * probs.max(dim=-1, keepdim=True).values
        logits = logits.masked_fill(probs < floor, float("-inf"))
    return logits


def sample_next(
    logits: torch.Tensor,
    params: SamplingParams,
    generator: torch.Generator | None = None,
    seen: torch.Tensor | None = None,
) -> torch.Tensor:
    """One token id per row of `logits` (batch, vocab)."""
    if seen is not None:
        logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
    if params.greedy:
        return logits.argmax(dim=-1)
    probs = filter_logits(logits, params).softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
