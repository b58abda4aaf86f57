"""Token-level losses, always reduced in float32."""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F


def _token_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    flat = F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none"
    )
    return flat.view(targets.shape)


_compiled: dict[str, bool] = {"losses": False}


def compile_losses(enabled: bool) -> None:
    """Set by the loop's compile setting (train/parallel.py `apply_compile`)."""
    _compiled["losses"] = enabled


@functools.cache
def _compiled_cross_entropy():
    # One fused kernel reads the low-precision logits and upcasts on the fly: eager would
    # write a float32 copy of the (tokens x vocab) logits first, and again in the backward.
    return torch.compile(_token_cross_entropy)


def token_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-token cross-entropy in nats, shape of `targets`, computed in float32."""
    if _compiled["losses"]:
        return _compiled_cross_entropy()(logits, targets)
    return _token_cross_entropy(logits, targets)


# Tokens per chunk of the chunked loss: sized so one float32 chunk of logits is ~512 MiB
# (1024 tokens at a 131,072 vocabulary), big enough for full-speed matmuls.
CHUNK_LOGITS_BYTES = 512 * 2**20
IGNORE_INDEX = -100


def _compute_dtype(hidden: torch.Tensor) -> torch.dtype:
    device = hidden.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return hidden.dtype


def _chunk_logits(
    hidden: torch.Tensor, weight: torch.Tensor, softcap: float | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """float32 logits of one chunk; with a softcap also tanh(raw / cap), for the backward."""
    logits = (hidden @ weight.t()).float()
    if softcap is None:
        return logits, None
    tanh = torch.tanh(logits / softcap)
    return tanh * softcap, tanh


class _ChunkedCrossEntropy(torch.autograd.Function):
    """Cross-entropy from hidden states and the head weight, one chunk of tokens at a time
    (the Cut-Cross-Entropy idea, Wijmans et al. 2024): a chunk's logits live only while its
    target logit and log-sum-exp are read, and the backward recomputes them. Peak memory is
    one chunk of float32 logits instead of several copies of the whole [tokens, vocab] matrix."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, softcap, chunk_tokens):
        dtype = _compute_dtype(hidden)
        h, w = hidden.to(dtype), weight.to(dtype)
        n = h.shape[0]
        losses = torch.empty(n, dtype=torch.float32, device=h.device)
        lse = torch.empty(n, dtype=torch.float32, device=h.device)
        with torch.autocast(h.device.type, enabled=False):
            for start in range(0, n, chunk_tokens):
                end = min(start + chunk_tokens, n)
                logits, _ = _chunk_logits(h[start:end], w, softcap)
                chunk_lse = torch.logsumexp(logits, dim=-1)
                target = targets[start:end]
                picked = logits.gather(1, target.clamp(min=0).unsqueeze(1)).squeeze(1)
                losses[start:end] = torch.where(target != IGNORE_INDEX, chunk_lse - picked, 0.0)
                lse[start:end] = chunk_lse
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.softcap, ctx.chunk_tokens, ctx.dtype = softcap, chunk_tokens, dtype
        return losses

    @staticmethod
    def backward(ctx, grad_losses):
        hidden, weight, targets, lse = ctx.saved_tensors
        h, w = hidden.to(ctx.dtype), weight.to(ctx.dtype)
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(h) if want_h else None
        grad_w = torch.zeros(w.shape, dtype=torch.float32, device=w.device) if want_w else None
        n = h.shape[0]
        with torch.autocast(h.device.type, enabled=False):
            for start in range(0, n, ctx.chunk_tokens):
                end = min(start + ctx.chunk_tokens, n)
                target = targets[start:end]
                valid = target != IGNORE_INDEX
                scale = torch.where(valid, grad_losses[start:end].float(), 0.0)
                logits, tanh = _chunk_logits(h[start:end], w, ctx.softcap)
                # d loss / d logits = softmax - onehot(target), times the incoming gradient;
                # computed in place over the chunk's logits.
                grad = logits.sub_(lse[start:end].unsqueeze(1)).exp_().mul_(scale.unsqueeze(1))
                rows = torch.arange(end - start, device=grad.device)
                grad[rows, target.clamp(min=0)] -= scale
                if tanh is not None:  # through cap * tanh(raw / cap): times 1 - tanh^2
                    grad.mul_(1 - tanh.square_())
                grad = grad.to(ctx.dtype)
                if want_h:
                    grad_h[start:end] = grad @ w
                if want_w:
                    # In-place add upcasts elementwise: no float32 copy of the product.
                    grad_w.add_(grad.t() @ h[start:end])
        return (
            grad_h.to(hidden.dtype) if want_h else None,
            grad_w.to(weight.dtype) if want_w else None,
            None,
            None,
            None,
        )


def chunked_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    softcap: float | None = None,
    chunk_tokens: int | None = None,
) -> torch.Tensor:
    """Per-token cross-entropy (float32, shape of `targets`) of the logits
    softcap * tanh((hidden @ weight.T) / softcap) (no cap when None) without materialising them:
    hidden (..., d), weight (vocab, d). Targets equal to -100 get loss 0 and no gradient.
    Matmuls run in the autocast dtype when autocast is on, reductions in float32."""
    if chunk_tokens is None:
        chunk_tokens = max(1, CHUNK_LOGITS_BYTES // (4 * weight.shape[0]))
    flat = _ChunkedCrossEntropy.apply(
        hidden.reshape(-1, hidden.shape[-1]), weight, targets.reshape(-1), softcap, chunk_tokens
    )
    return flat.view(targets.shape)


def model_token_losses(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], chunked: bool = True
) -> torch.Tensor:
    """Per-token cross-entropy of `batch["targets"]` given `batch["input_ids"]` (and
    `doc_ids` when present), float32. `chunked`: through the model's chunked loss (forward with
    targets, see Transformer.forward), never holding the whole logits; else from full logits."""
    doc_ids = batch.get("doc_ids")
    if chunked:
        return model(batch["input_ids"], doc_ids=doc_ids, targets=batch["targets"])
    return token_cross_entropy(model(batch["input_ids"], doc_ids=doc_ids), batch["targets"])


def z_loss(logits: torch.Tensor) -> torch.Tensor:
    """Mean squared log-partition (PaLM): keeps the softmax normaliser near 1, so output logits
    do not drift to large magnitudes."""
    return logits.float().logsumexp(dim=-1).pow(2).mean()


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp_min(1.0)


def sequence_logprobs(token_losses: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum of log p(target) over masked positions, one value per sequence, from per-token
    cross-entropy."""
    return -(token_losses * mask.to(torch.float32)).sum(dim=-1)


def bits_per_byte(nats: float, num_bytes: float) -> float:
    return nats / math.log(2) / max(num_bytes, 1.0)
