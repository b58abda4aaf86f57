"""Greedy decoding without a KV cache: each step re-reads the (cropped) context.

Enough for the few samples a report shows; issue 8 brings the KV-cache engine."""

from __future__ import annotations

import torch

from frontierlm.model import Transformer


@torch.no_grad()
def greedy(
    model: Transformer, prompt: list[int], max_new_tokens: int, stop_ids: set[int]
) -> list[int]:
    device = next(model.parameters()).device
    ids = list(prompt)
    new: list[int] = []
    model.eval()
    for _ in range(max_new_tokens):
        context = torch.tensor([ids[-model.cfg.max_seq_len :]], device=device)
        next_id = int(model(context)[0, -1].argmax())
        if next_id in stop_ids:
            break
        ids.append(next_id)
        new.append(next_id)
    return new
