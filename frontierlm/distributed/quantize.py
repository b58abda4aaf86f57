"""Outer gradients on the wire: fp32, bf16, or int8 / 4-bit with one scale per block.

A codec turns a flat fp32 vector into a self-contained uint8 payload and back. The quantised
codecs are symmetric absmax per block of `block` values (scale = absmax / qmax, stored as fp32),
rounded to nearest, so every value comes back within half a quantisation step of its block:
|x - decode(encode(x))| <= scale / 2. bf16 rounds to nearest: relative error <= 2^-9.

Payload layout: [scales: fp32 x n_blocks][values]; 4-bit packs two values per byte (low nibble
first) as q + 8 with q in [-7, 7]. `payload_bytes(n)` is exact: the byte count of what is sent.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

CODECS = ("fp32", "bf16", "int8", "int4")


@dataclass(frozen=True)
class Codec:
    name: str = "fp32"
    block: int = 128  # values per scale (int8, int4)

    def __post_init__(self) -> None:
        if self.name not in CODECS:
            raise ValueError(f"unknown codec {self.name!r}; choose one of {', '.join(CODECS)}")
        if self.block < 2 or self.block % 2:
            raise ValueError(f"quantisation block must be an even number >= 2, got {self.block}")

    @property
    def qmax(self) -> int:
        return {"int8": 127, "int4": 7}.get(self.name, 0)

    @property
    def align(self) -> int:
        """Vectors handed to encode must have a length that divides by this."""
        return self.block if self.qmax else 1

    def payload_bytes(self, n: int) -> int:
        if n % self.align:
            raise ValueError(f"{self.name}: length {n} is not a multiple of {self.align}")
        if self.name == "fp32":
            return 4 * n
        if self.name == "bf16":
            return 2 * n
        scales = 4 * (n // self.block)
        return scales + (n if self.name == "int8" else n // 2)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        x = x.detach().float().contiguous().view(-1)
        n = x.numel()
        if self.name == "fp32":
            return x.view(torch.uint8).clone()
        if self.name == "bf16":
            return x.to(torch.bfloat16).view(torch.uint8).clone()
        self.payload_bytes(n)  # checks the length
        blocks = x.view(-1, self.block)
        scales = blocks.abs().amax(dim=1) / self.qmax
        safe = torch.where(scales > 0, scales, torch.ones_like(scales))
        q = torch.round(blocks / safe[:, None]).clamp_(-self.qmax, self.qmax).to(torch.int8)
        if self.name == "int8":
            values = q.view(-1).view(torch.uint8)
        else:
            nibbles = (q.view(-1, 2).to(torch.int16) + 8).to(torch.uint8)
            values = nibbles[:, 0] | (nibbles[:, 1] << 4)
        return torch.cat([scales.view(torch.uint8), values])

    def decode(self, payload: torch.Tensor, n: int) -> torch.Tensor:
        if payload.numel() != self.payload_bytes(n):
            raise ValueError(
                f"{self.name}: payload of {payload.numel()} bytes, expected "
                f"{self.payload_bytes(n)} for {n} values"
            )
        payload = payload.contiguous()
        if self.name == "fp32":
            return payload.view(torch.float32).clone()
        if self.name == "bf16":
            return payload.view(torch.bfloat16).float()
        n_blocks = n // self.block
        scales = payload[: 4 * n_blocks].view(torch.float32)
        values = payload[4 * n_blocks :]
        if self.name == "int8":
            q = values.view(torch.int8).float()
        else:
            low = (values & 0x0F).to(torch.int16) - 8
            high = (values >> 4).to(torch.int16) - 8
            q = torch.stack([low, high], dim=1).view(-1).float()
        return (q.view(-1, self.block) * scales[:, None]).view(-1)

    def error_bound(self, x: torch.Tensor) -> torch.Tensor:
        """Per-value bound on |x - decode(encode(x))| (what the tests hold the codecs to)."""
        x = x.detach().float().view(-1)
        if self.name == "fp32":
            return torch.zeros_like(x)
        if self.name == "bf16":
            return x.abs() * 2.0**-8
        scales = x.view(-1, self.block).abs().amax(dim=1) / self.qmax
        # Half a step, plus float rounding of the division and multiplication.
        return (scales[:, None] * (0.5 + 1e-5)).expand(-1, self.block).reshape(-1)


def padded_length(n: int, multiple: int) -> int:
    return math.ceil(n / multiple) * multiple
