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


def z_loss(logits: torch.Tensor) -> torch.Tensor:
    """Mean squared log-partition (PaLM): keeps the softmax normaliser near 1, so output logits
    do not drift to large magnitudes."""
    return logits.float().logsumexp(dim=-1).pow(2).mean()


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp_min(1.0)


def sequence_logprobs(
    logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """Sum of log p(target) over masked positions, one value per sequence."""
    return -(token_cross_entropy(logits, targets) * mask.to(torch.float32)).sum(dim=-1)


def bits_per_byte(nats: float, num_bytes: float) -> float:
    return nats / math.log(2) / max(num_bytes, 1.0)
