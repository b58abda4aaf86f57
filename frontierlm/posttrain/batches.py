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


def pack_chats(chats: Sequence[RenderedChat], capacity: int) -> list[list[RenderedChat]]:
    """Group chats into rows of at most `capacity` tokens, first fit in decreasing length (each
    chat whole; `fit_window` has made every chat fit). Deterministic: the same chats give the
    same rows."""
    order = sorted(range(len(chats)), key=lambda i: (-len(chats[i].ids), i))
    rows: list[list[RenderedChat]] = []
    free: list[int] = []
    for i in order:
        size = len(chats[i].ids)
        if size > capacity:
            raise ValueError(f"a chat of {size} tokens does not fit a row of {capacity}")
        for r, room in enumerate(free):
            if size <= room:
                rows[r].append(chats[i])
                free[r] -= size
                break
        else:
            rows.append([chats[i]])
            free.append(capacity - size)
    return rows


def packed_batch(rows: Sequence[Sequence[RenderedChat]], pad_id: int) -> dict[str, torch.Tensor]:
    """`pad_batch` for packed rows, plus `doc_ids`: each chat of a row attends only within
    itself (document masking), the padding is a document of its own. A chat's first target is
    never learned (its BOS/prompt has mask 0), so no loss crosses from one chat to the next."""
    joined = [
        RenderedChat([t for c in row for t in c.ids], [m for c in row for m in c.mask])
        for row in rows
    ]
    batch = pad_batch(joined, pad_id)
    width = batch["input_ids"].shape[1] + 1
    doc_ids = torch.full((len(rows), width), len(max(rows, key=len)), dtype=torch.long)
    for r, row in enumerate(rows):
        position = 0
        for d, chat in enumerate(row):
            doc_ids[r, position : position + len(chat.ids)] = d
            position += len(chat.ids)
    batch["doc_ids"] = doc_ids[:, :-1]
    return batch
