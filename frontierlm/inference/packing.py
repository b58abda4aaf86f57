"""Packed projection weights for decoding: each attention layer's q, k and v weights stacked into
one matrix, each MLP's gate and up weights into another.

A decode step multiplies a few rows (one token per sequence) by every weight matrix, so its time
is the time to read the weights. Small GEMMs read them well below memory speed (launch and tail
costs dominate a 2-8 MB matrix), so two or three of them stacked into one run faster
(benchmarks/decode.py). The model's own parameters are left alone, so training, optimizers and
checkpoints never see the packed copies: the engine keeps them, refreshes them from the
parameters at the start of each `generate` call (RL changes the weights between calls), and
attaches them to the modules only while it generates.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from frontierlm.model.attention import Attention
from frontierlm.model.mlp import SwiGLU


def _plain(*linears: nn.Module) -> bool:
    # Anything else (fp8 layers, adapters, biases) keeps its own forward.
    return all(type(m) is nn.Linear and m.bias is None for m in linears)


class PackedProjections:
    """The packed copies of one model's projection weights; costs a second copy of those
    weights (about three quarters of a dense model's), so `generate(pack_projections=False)`
    turns it off where memory is tight."""

    def __init__(self, model: nn.Module) -> None:
        self._slots: list[tuple[nn.Module, str, list[nn.Parameter], torch.Tensor]] = []
        for module in model.modules():
            if isinstance(module, Attention):
                parts = [module.q_proj, module.k_proj, module.v_proj]
                name = "packed_qkv"
            elif isinstance(module, SwiGLU):
                parts = [module.gate_proj, module.up_proj]
                name = "packed_gate_up"
            else:
                continue
            if _plain(*parts):
                weights = [m.weight for m in parts]
                packed = torch.cat([w.detach() for w in weights])
                self._slots.append((module, name, weights, packed))

    def __len__(self) -> int:
        return len(self._slots)

    @torch.no_grad()
    def refresh(self) -> None:
        """Copy the current parameters into the packed tensors, in place: captured CUDA graphs
        read the packed tensors by address."""
        for _, _, weights, packed in self._slots:
            torch.cat([w.detach() for w in weights], out=packed)

    @contextlib.contextmanager
    def attached(self) -> Iterator[None]:
        """The modules use the packed weights inside this block, their own outside it."""
        for module, name, _, packed in self._slots:
            setattr(module, name, packed)
        try:
            yield
        finally:
            for module, name, _, _ in self._slots:
                setattr(module, name, None)
