"""Gated feed-forward block: SwiGLU (Shazeer 2020) as in Llama, or GeGLU with the tanh
approximation of GELU as in Gemma, chosen by `ModelConfig.mlp_activation`."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    # The tanh approximation, not exact GELU: it is what Gemma was trained with
    # (transformers' "gelu_pytorch_tanh").
    return F.gelu(x, approximate="tanh")


ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu,
    "gelu_tanh": gelu_tanh,
}


class SwiGLU(nn.Module):
    """down(act(gate(x)) * up(x)); SwiGLU with SiLU, GeGLU with `activation="gelu_tanh"`."""

    def __init__(self, d_model: int, hidden: int, activation: str = "silu") -> None:
        super().__init__()
        self.gate_proj = nn.Linear(d_model, hidden, bias=False)
        self.up_proj = nn.Linear(d_model, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, d_model, bias=False)
        self.act = ACTIVATIONS[activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))
