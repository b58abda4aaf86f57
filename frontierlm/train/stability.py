"""Training stability: the spike guard that judges each step, and per-layer gradient and update
norms, the first place to look when a run goes wrong (a layer whose updates grow against its
weights diverges first)."""

from __future__ import annotations

import math
import statistics

import torch
from torch import nn

from frontierlm.config import LoopConfig


class SpikeGuard:
    """Flags a step whose loss or gradient norm is a spike: non-finite, or above `factor` times
    the median of the last accepted steps (once enough of them exist)."""

    def __init__(self, cfg: LoopConfig, history: list[dict[str, float]]) -> None:
        self.cfg = cfg
        self.losses = [r["loss"] for r in history][-cfg.spike_window :]
        self.grad_norms = [r["grad_norm"] for r in history][-cfg.spike_window :]

    def reason(self, loss: float, grad_norm: float) -> str | None:
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            return f"non-finite loss ({loss}) or gradient norm ({grad_norm})"
        if len(self.losses) < self.cfg.spike_min_history:
            return None
        checks = [
            ("loss", loss, self.losses, self.cfg.spike_loss_factor),
            ("gradient norm", grad_norm, self.grad_norms, self.cfg.spike_grad_factor),
        ]
        for name, value, history, factor in checks:
            median = statistics.median(history)
            if factor > 0 and value > factor * median:
                return f"{name} {value:.4g} > {factor} x rolling median {median:.4g}"
        return None

    def accept(self, loss: float, grad_norm: float) -> None:
        self.losses = [*self.losses, loss][-self.cfg.spike_window :]
        self.grad_norms = [*self.grad_norms, grad_norm][-self.cfg.spike_window :]


def _norm(tensors: list[torch.Tensor]) -> float:
    """The 2-norm of a list of tensors, full even when they are FSDP shards (DTensors)."""
    if not tensors:
        return 0.0
    norm = torch.nn.utils.get_total_norm(tensors)
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)


def layer_groups(model: nn.Module) -> dict[str, list[nn.Parameter]]:
    """The model's parameters by layer: embed, layer0 ... layerN-1, head (the final norm and the
    output head, when not tied to the embedding)."""
    groups = {"embed": [model.embed_tokens.weight]}
    for i, block in enumerate(model.layers):
        groups[f"layer{i}"] = list(block.parameters())
    head = [*model.norm.parameters()]
    if model.lm_head.weight is not model.embed_tokens.weight:
        head.append(model.lm_head.weight)
    groups["head"] = head
    return groups


class LayerStats:
    """Per-layer gradient norms (before clipping) and relative update norms |dW| / |W| of one
    optimizer step: `before_step` after the backward pass (it keeps a copy of the weights),
    `after_step` once the optimizer has stepped."""

    def __init__(self, model: nn.Module) -> None:
        self.groups = layer_groups(model)
        self.stats: dict[str, float] = {}
        self.weights: dict[str, list[torch.Tensor]] = {}

    def before_step(self) -> None:
        self.stats = {
            f"grad_norm.{name}": _norm([p.grad for p in params if p.grad is not None])
            for name, params in self.groups.items()
        }
        self.weights = {
            name: [p.detach().clone() for p in params] for name, params in self.groups.items()
        }

    def after_step(self) -> dict[str, float]:
        for name, params in self.groups.items():
            old = self.weights[name]
            delta = _norm([p.detach() - w for p, w in zip(params, old, strict=True)])
            self.stats[f"update_norm.{name}"] = delta / max(_norm(old), 1e-12)
        self.weights = {}
        return self.stats
