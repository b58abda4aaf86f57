"""Bits per byte: the tokenizer-independent measure of how well a model predicts text.

bpb = (sum of per-token cross-entropy in nats) / ln 2 / (UTF-8 bytes of the predicted tokens).
Special tokens carry no bytes and are not scored, so models with different vocabularies and the
unigram baseline are compared on exactly the same text.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np
import torch
from torch import nn

from frontierlm.tokenizer.shards import window_batch
from frontierlm.train.losses import token_cross_entropy


def sequential_windows(
    tokens: np.ndarray, seq_len: int, batch_size: int, max_batches: int, bos_id: int | None = None
) -> Iterable[dict[str, torch.Tensor]]:
    """Consecutive non-overlapping windows over a token array: the fixed validation set. With
    `bos_id`, each window carries document ids for document-masked attention."""
    n_windows = min((len(tokens) - 1) // seq_len, batch_size * max_batches)
    for first in range(0, n_windows, batch_size):
        rows = range(first, min(first + batch_size, n_windows))
        chunk = np.stack(
            [np.asarray(tokens[r * seq_len : r * seq_len + seq_len + 1]) for r in rows]
        )
        yield window_batch(torch.from_numpy(chunk.astype(np.int64)), bos_id)


class UnigramLM(nn.Module):
    """A context-free model: the same next-token distribution everywhere. Scored by the same
    `bits_per_byte` as the transformers, on the same windows."""

    def __init__(self, log_probs: np.ndarray) -> None:
        super().__init__()
        self.register_buffer("log_probs", torch.as_tensor(log_probs, dtype=torch.float32))

    def forward(self, input_ids: torch.Tensor, doc_ids: torch.Tensor | None = None) -> torch.Tensor:
        return self.log_probs.expand(*input_ids.shape, -1)


@torch.no_grad()
def bits_per_byte(
    model: nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    byte_lengths: torch.Tensor,
    device: torch.device,
) -> dict[str, float]:
    """Score batches of input_ids/targets (and an optional loss_mask) -> bpb and mean loss."""
    nats = 0.0
    nbytes = 0.0
    ntokens = 0
    byte_lengths = byte_lengths.to(device)
    for batch in batches:
        inputs, targets = batch["input_ids"].to(device), batch["targets"].to(device)
        scored = byte_lengths[targets] > 0
        if "loss_mask" in batch:
            scored &= batch["loss_mask"].to(device).bool()
        doc_ids = batch["doc_ids"].to(device) if "doc_ids" in batch else None
        losses = token_cross_entropy(model(inputs, doc_ids=doc_ids), targets)
        nats += losses[scored].sum().item()
        nbytes += byte_lengths[targets][scored].sum().item()
        ntokens += int(scored.sum().item())
    if ntokens == 0:
        raise ValueError("bits_per_byte: no scored tokens in the evaluation batches")
    return {"bpb": nats / math.log(2) / nbytes, "loss": nats / ntokens, "tokens": float(ntokens)}


def document_windows(
    documents: list[list[int]], seq_len: int, batch_size: int, pad_id: int
) -> Iterable[dict[str, torch.Tensor]]:
    """Each document's tokens cut into windows of `seq_len` predicted tokens (each window starts
    with the token before its first target), padded into batches; padding is not scored."""
    windows = [
        doc[start : start + seq_len + 1]
        for doc in documents
        for start in range(0, len(doc) - 1, seq_len)
    ]
    for first in range(0, len(windows), batch_size):
        chunk = windows[first : first + batch_size]
        width = max(len(w) for w in chunk) - 1
        inputs = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        targets = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros(len(chunk), width, dtype=torch.long)
        for r, w in enumerate(chunk):
            inputs[r, : len(w) - 1] = torch.tensor(w[:-1])
            targets[r, : len(w) - 1] = torch.tensor(w[1:])
            mask[r, : len(w) - 1] = 1
        yield {"input_ids": inputs, "targets": targets, "loss_mask": mask}
