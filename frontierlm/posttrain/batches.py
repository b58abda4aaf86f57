"""Batches of rendered chats: windows that keep the learned tokens, padding, seeded order."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from frontierlm.tokenizer.chat import RenderedChat


def fit_window(chat: RenderedChat, length: int) -> RenderedChat:
    """Cut a chat to at most `length` tokens, keeping what the loss learns from: when everything
    from the first learned token on fits, the prompt loses its beginning; when the reply itself
    is too long, the window starts half a window before it and the reply loses its end."""
    n = len(chat.ids)
    if n <= length:
        return chat
    first = chat.mask.index(1) if 1 in chat.mask else 0
    start = n - length if n - first <= length else max(0, first - length // 2)
    return RenderedChat(chat.ids[start : start + length], chat.mask[start : start + length])


def pad_batch(chats: Sequence[RenderedChat], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest chat; inputs/targets shift by one, the mask follows targets."""
    width = max(len(c.ids) for c in chats)
    ids = torch.full((len(chats), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(chats), width), dtype=torch.long)
    for row, chat in enumerate(chats):
        ids[row, : len(chat.ids)] = torch.tensor(chat.ids)
        mask[row, : len(chat.mask)] = torch.tensor(chat.mask)
    return {"input_ids": ids[:, :-1], "targets": ids[:, 1:], "loss_mask": mask[:, 1:]}


def fixed_batches(items: Sequence, batch_size: int) -> list[Sequence]:
    return [items[i : i + batch_size] for i in range(0, len(items), batch_size)]
