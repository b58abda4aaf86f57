"""Checkpoints and model artifacts, written atomically: a temp directory, then a rename.

A model artifact is `model.safetensors` + `config.json` (the ModelConfig and vocab size).
A training checkpoint adds `train_state.pt` (optimizer state, step, RNG) beside it.
A kill at any moment leaves either the previous complete directory or the new complete one.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_model, save_model

from frontierlm.atomic import atomic_dir, commit_dir
from frontierlm.config import ModelConfig
from frontierlm.model import Transformer
from frontierlm.train.optim import Optimizers

STEP_PREFIX = "step_"


def _write_model(directory: Path, model: Transformer) -> None:
    save_model(model, str(directory / "model.safetensors"))
    config = {"model": model.cfg.model_dump(), "vocab_size": model.vocab_size}
    (directory / "config.json").write_text(json.dumps(config, indent=2))


def save_model_dir(final: Path, model: Transformer) -> None:
    tmp = atomic_dir(final)
    _write_model(tmp, model)
    commit_dir(tmp, final)


def load_model_dir(directory: Path, device: torch.device | str = "cpu") -> Transformer:
    config_file = directory / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"no model at {directory} (missing config.json)")
    config = json.loads(config_file.read_text())
    model = Transformer(ModelConfig.model_validate(config["model"]), config["vocab_size"])
    load_model(model, str(directory / "model.safetensors"), device=str(device))
    return model.to(device)


def save_checkpoint(
    ckpt_root: Path,
    step: int,
    model: Transformer,
    optimizer: torch.optim.Optimizer | Optimizers,
    extra: dict[str, Any],
    keep: int,
) -> Path:
    final = ckpt_root / f"{STEP_PREFIX}{step:07d}"
    tmp = atomic_dir(final)
    _write_model(tmp, model)
    state = {
        "step": step,
        "optimizer": optimizer.state_dict(),
        "torch_rng": torch.get_rng_state(),
        "extra": extra,
    }
    torch.save(state, tmp / "train_state.pt")
    commit_dir(tmp, final)
    for stale in list_checkpoints(ckpt_root)[:-keep]:
        shutil.rmtree(stale)
    return final


def list_checkpoints(ckpt_root: Path) -> list[Path]:
    if not ckpt_root.is_dir():
        return []
    return sorted(p for p in ckpt_root.iterdir() if p.name.startswith(STEP_PREFIX) and p.is_dir())


def load_checkpoint(
    path: Path, model: Transformer, optimizer: torch.optim.Optimizer | Optimizers
) -> dict[str, Any]:
    load_model(model, str(path / "model.safetensors"), device=str(next(model.parameters()).device))
    state = torch.load(path / "train_state.pt", map_location="cpu", weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["torch_rng"])
    return state
