"""Run one evaluation task (a `TaskSpec` and its items) on one model: the kinds dispatched."""

from __future__ import annotations

import time
from typing import Any

import torch

from frontierlm.eval.bpb import bits_per_byte, document_windows
from frontierlm.eval.exact_match import evaluate_exact_match
from frontierlm.eval.multiple_choice import evaluate_multiple_choice
from frontierlm.eval.pass_at_k import evaluate_pass_at_k
from frontierlm.eval.tasks import TaskSpec
from frontierlm.tokenizer.train import BOS, PAD, token_byte_lengths


def evaluate_text_bpb(
    model, tok, spec: TaskSpec, items: list[dict[str, Any]], batch_size: int
) -> dict[str, Any]:
    bos = tok.token_to_id(BOS)
    texts = []
    for item in items:
        if not isinstance(item.get(spec.text_field), str):
            raise ValueError(f"task {spec.name}: an item has no text field {spec.text_field!r}")
        texts.append(item[spec.text_field])
    documents = [[bos, *e.ids] for e in tok.encode_batch(texts, add_special_tokens=False)]
    device = next(model.parameters()).device
    batches = document_windows(documents, model.cfg.max_seq_len, batch_size, tok.token_to_id(PAD))
    byte_lengths = torch.tensor(token_byte_lengths(tok))
    result = bits_per_byte(model, batches, byte_lengths, device)
    return {"metrics": {"bpb": result["bpb"], "tokens": int(result["tokens"])}, "items": []}


def run_task(
    spec: TaskSpec,
    model,
    tok,
    limit: int | None = None,
    batch_size: int = 16,
    seed: int = 0,
) -> dict[str, Any]:
    """{"task", "kind", "n", "seconds", "metrics", "items"} of `spec` on `model`."""
    items = spec.items(limit)
    t0 = time.perf_counter()
    with torch.no_grad():
        if spec.kind == "bpb":
            out = evaluate_text_bpb(model, tok, spec, items, batch_size)
        elif spec.kind == "multiple_choice":
            out = evaluate_multiple_choice(
                model, tok, tok.token_to_id(BOS), spec, items, batch_size
            )
        elif spec.kind == "exact_match":
            out = evaluate_exact_match(model, tok, spec, items)
        else:
            out = evaluate_pass_at_k(model, tok, spec, items, seed)
    return {
        "task": spec.name,
        "kind": spec.kind,
        "n": len(items),
        "seconds": round(time.perf_counter() - t0, 3),
        **out,
    }
