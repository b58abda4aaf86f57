"""Optimizer construction: AdamW with weight decay on matrices only."""

from __future__ import annotations

import torch
from torch import nn

from frontierlm.config import LoopConfig


def build_adamw(model: nn.Module, cfg: LoopConfig) -> torch.optim.AdamW:
    # Norm gains are scale parameters; decaying them toward 0 fights the normalisation.
    matrices = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    vectors = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [
        {"params": matrices, "weight_decay": cfg.weight_decay},
        {"params": vectors, "weight_decay": 0.0},
    ]
    # One fused kernel per step on GPU; on CPU the multi-tensor path avoids a Python loop of
    # small elementwise ops per parameter.
    on_cuda = next(model.parameters()).is_cuda
    return torch.optim.AdamW(
        groups,
        lr=cfg.lr,
        betas=(cfg.beta1, cfg.beta2),
        fused=True if on_cuda else None,
        foreach=None if on_cuda else True,
    )
