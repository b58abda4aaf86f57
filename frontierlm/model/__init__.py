"""Decoder-only transformer models, built by name from `ModelConfig`."""

from frontierlm.model.transformer import Transformer

__all__ = ["Transformer"]
