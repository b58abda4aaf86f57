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

    # gate and up weights stacked, set only while the inference engine generates
    # (inference/packing.py): one GEMM instead of two in a decode step.
    packed_gate_up: torch.Tensor | None = None

    def __init__(self, d_model: int, hidden: int, activation: str = "silu") -> None:
        super().__init__()
        self.gate_proj = nn.Linear(d_model, hidden, bias=False)
        self.up_proj = nn.Linear(d_model, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, d_model, bias=False)
        self.act = ACTIVATIONS[activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed_gate_up is None:
            gate, up = self.gate_proj(x), self.up_proj(x)
        else:
            gate, up = F.linear(x, self.packed_gate_up).chunk(2, dim=-1)
        return self.down_proj(self.act(gate) * up)
