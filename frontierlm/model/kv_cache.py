"""A preallocated key/value cache for inference: `slots` sequences of up to `length` tokens.

Every layer owns fixed tensors (static shapes, so a decode step can be captured in a CUDA graph):
under GQA the keys and values of its KV heads, (slots, kv_heads, length, head_dim) each; under MLA
one tensor (slots, 1, length, latent + rope) holding the normalised latent and the shared rotated
key per token, from which every head's keys and values follow (values are the latent part of the
same tensor). Local (sliding-window) layers keep the full length too; their mask, not the
storage, limits what they see.

A forward with a cache runs in one of two modes, told by the `LayerCache` view each attention
layer receives: a prompt fill (`slots` given: the rows' tokens are positions 0.. of those slots)
or a token step (`positions` given: one new token per slot, at that position).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from frontierlm.config import ModelConfig


@dataclass
class LayerCache:
    keys: torch.Tensor  # (slots, kv_heads, length, dim): this layer's storage
    values: torch.Tensor | None  # None under MLA: values are the latent part of `keys`
    rows: torch.Tensor  # arange(slots)
    slots: torch.Tensor | None = None  # prompt fill: the slot of each row of the batch
    positions: torch.Tensor | None = None  # token step: the position of each slot's new token

    @property
    def decoding(self) -> bool:
        return self.positions is not None

    def fill(self, keys: torch.Tensor, values: torch.Tensor | None = None) -> None:
        """Store a prompt batch's keys (rows, heads, seq, dim) at positions 0..seq-1 of `slots`."""
        seq = keys.shape[2]
        self.keys[self.slots, :, :seq] = keys.to(self.keys.dtype)
        if values is not None:
            self.values[self.slots, :, :seq] = values.to(self.values.dtype)

    def append(
        self, keys: torch.Tensor, values: torch.Tensor | None, kv_len: int
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Store one token per slot (keys: (slots, heads, 1, dim)) at its position; return the
        first `kv_len` positions of the cache, which the step attends over."""
        self.keys[self.rows, :, self.positions] = keys[:, :, 0].to(self.keys.dtype)
        if values is None:
            return self.keys[:, :, :kv_len], None
        self.values[self.rows, :, self.positions] = values[:, :, 0].to(self.values.dtype)
        return self.keys[:, :, :kv_len], self.values[:, :, :kv_len]


class KVCache:
    def __init__(
        self,
        cfg: ModelConfig,
        slots: int,
        length: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        if length > cfg.max_seq_len:
            raise ValueError(f"cache length {length} exceeds model.max_seq_len={cfg.max_seq_len}")
        self.slots, self.length, self.dtype = slots, length, dtype
        self.rows = torch.arange(slots, device=device)

        def zeros(shape: tuple[int, ...]) -> torch.Tensor:
            return torch.zeros(shape, dtype=dtype, device=device)

        if cfg.attention == "mla":
            shape = (slots, 1, length, cfg.mla_kv_lora_rank + cfg.mla_qk_rope_head_dim)
            self.keys = [zeros(shape) for _ in range(cfg.n_layers)]
            self.values: list[torch.Tensor | None] = [None] * cfg.n_layers
        else:
            shape = (slots, cfg.kv_heads, length, cfg.head_dim)
            self.keys = [zeros(shape) for _ in range(cfg.n_layers)]
            self.values = [zeros(shape) for _ in self.keys]

    def nbytes(self) -> int:
        tensors = self.keys + [v for v in self.values if v is not None]
        return sum(t.numel() * t.element_size() for t in tensors)

    def for_prompts(self, layer: int, slots: torch.Tensor) -> LayerCache:
        return LayerCache(self.keys[layer], self.values[layer], self.rows, slots=slots)

    def for_tokens(self, layer: int, positions: torch.Tensor) -> LayerCache:
        return LayerCache(self.keys[layer], self.values[layer], self.rows, positions=positions)
