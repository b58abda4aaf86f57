"""A scripted language model: a torch module whose greedy (or any-temperature) continuation of
a known prompt is a fixed token sequence, so generation-based evaluation can be checked exactly
through the real `generate`."""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import nn


class ScriptedLM(nn.Module):
    def __init__(self, vocab_size: int, scripts: dict[tuple[int, ...], list[int]], end_id: int):
        super().__init__()
        self.vocab_size = vocab_size
        self.cfg = SimpleNamespace(max_seq_len=100_000)
        self.scripts = scripts
        self.end_id = end_id
        self.seen_prompts: list[tuple[int, ...]] = []
        self._anchor = nn.Parameter(torch.zeros(1))  # gives the module a device

    def next_token(self, row: list[int]) -> int:
        for prompt, reply in self.scripts.items():
            if tuple(row[: len(prompt)]) == prompt:
                done = len(row) - len(prompt)
                if done == 0:
                    self.seen_prompts.append(prompt)
                return reply[done] if done < len(reply) else self.end_id
        raise AssertionError(f"unscripted prompt {row[:20]}...")

    def forward(self, input_ids: torch.Tensor, doc_ids=None) -> torch.Tensor:
        batch, seq = input_ids.shape
        logits = torch.full((batch, seq, self.vocab_size), -30.0)
        for r in range(batch):
            logits[r, -1, self.next_token(input_ids[r].tolist())] = 30.0
        return logits


GENERATING_MODULES = (
    "frontierlm.inference.engine",
    "frontierlm.eval.exact_match",
    "frontierlm.eval.pass_at_k",
    "frontierlm.eval.lm_eval_adapter",
)


def drive_with_reference_generate(monkeypatch) -> None:
    """The KV-cache engine needs a real Transformer (prefill into its cache); a scripted model
    is driven by the full-recompute reference, which the engine equals token for token
    (tests/inference/test_engine.py), through the same `generate` name the code calls."""
    import importlib

    from frontierlm.inference.engine import generate_reference

    for name in GENERATING_MODULES:
        module = importlib.import_module(name)
        monkeypatch.setattr(module, "generate", generate_reference)
