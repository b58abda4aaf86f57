"""Decoder-only transformer models, built by name from `ModelConfig`."""

from __future__ import annotations

import json
from pathlib import Path

from frontierlm.model.transformer import Transformer

__all__ = ["Transformer", "load"]


def load(path: str | Path) -> Transformer:
    """A model in eval mode from a FrontierLM model directory (`runs/<name>/<stage>/model`, or
    the stage directory itself) or a Hugging Face directory of a family `hf.load_hf` reads; call
    it on a LongTensor [B, T] for logits [B, T, vocab]."""
    from frontierlm.model.hf import load_hf
    from frontierlm.train.checkpoint import load_model_dir

    path = Path(path)
    if (path / "model" / "config.json").is_file():
        path = path / "model"
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{path} holds no model (no config.json)")
    if "model_type" in json.loads(config_file.read_text()):
        return load_hf(path)
    return load_model_dir(path).eval()
