"""Checkpoints and model artifacts, written atomically: a temp directory, then a rename.

A model artifact is `model.safetensors` + `config.json` (the ModelConfig and vocab size): one
file however many processes trained the model (rank 0 gathers the full weights).

A training checkpoint `checkpoints/step_NNNNNNN/` comes in two layouts:
  single process  the model artifact, plus `train_state.pt` (optimizer state, step, RNG, extra);
  under torchrun  sharded with `torch.distributed.checkpoint` (DCP): `.metadata` and one
                  `__<rank>_0.distcp` file per process, holding {"model", "optimizer"} state by
                  parameter name (every optimizer of an `Optimizers` in one state dict), plus
                  `config.json` and `train_state.pt` (step, RNG of rank 0, extra, processes).
Either resumes on any number of processes: DCP reshards a sharded one on load (one process
included), and a single-process one is spread over the processes of a torchrun job.
A kill at any moment leaves either the previous complete directory or the new complete one; a
sharded checkpoint is renamed into place by rank 0 once every process has written its part.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file, load_model, save_model
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
    set_state_dict,
)

from frontierlm.atomic import atomic_dir, commit_dir, temp_path
from frontierlm.config import ModelConfig
from frontierlm.model import Transformer
from frontierlm.train.optim import Optimizers
from frontierlm.train.parallel import barrier, world

STEP_PREFIX = "step_"
TRAIN_STATE = "train_state.pt"


def _write_config(directory: Path, model: Transformer) -> None:
    config = {"model": model.cfg.model_dump(), "vocab_size": model.vocab_size}
    (directory / "config.json").write_text(json.dumps(config, indent=2))


def _write_model(directory: Path, model: Transformer) -> None:
    save_model(model, str(directory / "model.safetensors"))
    _write_config(directory, model)


def _full_copy(model: Transformer) -> Transformer | None:
    """On rank 0, a plain CPU model holding the full weights of `model` (sharded or replicated
    over the processes); None on the other processes. Every process must call it."""
    state = get_model_state_dict(
        model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )
    if not world().main:
        return None
    # A gathered tensor may be a view into a larger buffer, which safetensors refuses to save
    # (it cannot tell a tie from a slice): give those their own storage.
    state = {
        name: t if t.untyped_storage().nbytes() == t.numel() * t.element_size() else t.clone()
        for name, t in state.items()
    }
    with torch.device("meta"):  # no memory and no init work: the weights are assigned below
        plain = Transformer(model.cfg, model.vocab_size)
    plain.load_state_dict(state, assign=True)
    if plain.cfg.tie_embeddings:  # assign=True gave each name its own tensor: tie them again
        plain.lm_head.weight = plain.embed_tokens.weight
    return plain


def save_model_dir(final: Path, model: Transformer) -> None:
    """The model artifact; under torchrun every process must call it (rank 0 writes)."""
    if world().size > 1:
        full = _full_copy(model)
        if full is not None:
            _commit_model(final, full)
        barrier()
    else:
        _commit_model(final, model)


def _commit_model(final: Path, model: Transformer) -> None:
    tmp = atomic_dir(final)
    _write_model(tmp, model)
    commit_dir(tmp, final)


def is_sharded(checkpoint: Path) -> bool:
    return (checkpoint / ".metadata").is_file()


def load_model_dir(directory: Path, device: torch.device | str = "cpu") -> Transformer:
    """A model artifact, or the weights of a training checkpoint of either layout."""
    config_file = directory / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"no model at {directory} (missing config.json)")
    config = json.loads(config_file.read_text())
    model = Transformer(ModelConfig.model_validate(config["model"]), config["vocab_size"])
    if is_sharded(directory):
        # Read every process's shard here: this process wants the whole model.
        state = {"model": model.state_dict()}
        _dcp_load(state, directory, no_dist=True)
        model.load_state_dict(state["model"])
    else:
        load_model(model, str(directory / "model.safetensors"), device=str(device))
    return model.to(device)


def _dcp_load(state: dict[str, Any], path: Path, no_dist: bool) -> None:
    with warnings.catch_warnings():
        # DCP warns on every load by one process alone, which is meant here.
        warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
        dcp.load(state, checkpoint_id=path, no_dist=no_dist)


def optimizer_parts(optimizer: torch.optim.Optimizer | Optimizers) -> list[torch.optim.Optimizer]:
    if isinstance(optimizer, Optimizers):
        return list(optimizer.optimizers.values())
    return [optimizer]


def save_checkpoint(
    ckpt_root: Path,
    step: int,
    model: Transformer,
    optimizer: torch.optim.Optimizer | Optimizers,
    extra: dict[str, Any],
    keep: int,
) -> Path:
    """Write checkpoint `step` and keep the latest `keep`; under torchrun every process must
    call it, with `model` as the loop trains it (sharded in place, or the module DDP wraps)."""
    final = ckpt_root / f"{STEP_PREFIX}{step:07d}"
    state = {"step": step, "torch_rng": torch.get_rng_state(), "extra": extra}
    w = world()
    if w.size == 1:
        tmp = atomic_dir(final)
        _write_model(tmp, model)
        torch.save({**state, "optimizer": optimizer.state_dict()}, tmp / TRAIN_STATE)
        commit_dir(tmp, final)
    else:
        tmp = temp_path(final)
        if w.main:
            atomic_dir(final)
        barrier()
        model_state, optimizer_state = get_state_dict(model, optimizer_parts(optimizer))
        # Returns on rank 0 only after every process has written its shard and rank 0 the
        # metadata: the directory is complete when rank 0 renames it.
        dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=tmp)
        if w.main:
            _write_config(tmp, model)
            torch.save({**state, "processes": w.size}, tmp / TRAIN_STATE)
            commit_dir(tmp, final)
    if w.main:
        for stale in list_checkpoints(ckpt_root)[:-keep]:
            shutil.rmtree(stale)
    barrier()  # nobody looks for checkpoints before the new one is in place
    return final


def list_checkpoints(ckpt_root: Path) -> list[Path]:
    if not ckpt_root.is_dir():
        return []
    return sorted(p for p in ckpt_root.iterdir() if p.name.startswith(STEP_PREFIX) and p.is_dir())


def load_checkpoint(
    path: Path, model: Transformer, optimizer: torch.optim.Optimizer | Optimizers
) -> dict[str, Any]:
    """Restore `model` and `optimizer` (built as the loop builds them, on any number of
    processes) from a checkpoint of either layout; return its train state."""
    state = torch.load(path / TRAIN_STATE, map_location="cpu", weights_only=True)
    parts = optimizer_parts(optimizer)
    if is_sharded(path):
        model_state, optimizer_state = get_state_dict(model, parts)
        loaded = {"model": model_state, "optimizer": optimizer_state}
        _dcp_load(loaded, path, no_dist=world().size == 1)
        set_state_dict(
            model,
            parts,
            model_state_dict=loaded["model"],
            optim_state_dict=loaded["optimizer"],
        )
    elif world().size > 1:
        _spread_single_process_checkpoint(path, model, optimizer, state["optimizer"])
    else:
        load_model(model, str(path / "model.safetensors"), device=str(_device_of(model)))
        optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["torch_rng"])
    return state


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _spread_single_process_checkpoint(
    path: Path,
    model: Transformer,
    optimizer: torch.optim.Optimizer | Optimizers,
    saved: dict[str, Any],
) -> None:
    """Load a single-process checkpoint into a model and optimizer spread over processes: the
    full weights and optimizer state, renamed from positions to parameter names, go through
    DCP's full-state loaders, which cut out each process's shard."""
    weights = load_file(path / "model.safetensors", device=str(_device_of(model)))
    # safetensors stores tied weights under one of their names; the loader wants every name.
    aliases: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(param), []).append(name)
    for names in aliases.values():
        present = [n for n in names if n in weights]
        for name in names:
            if present:
                weights.setdefault(name, weights[present[0]])
    full = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, weights, options=full)

    if isinstance(optimizer, Optimizers):
        optimizer.check_names(saved)
        pairs = [(opt, saved[name]) for name, opt in optimizer.optimizers.items()]
    else:
        pairs = [(optimizer, saved)]
    names = {id(p): n for n, p in model.named_parameters()}
    by_name: dict[str, Any] = {"state": {}, "param_groups": []}
    for opt, opt_state in pairs:
        # torch numbers parameters in the order of the optimizer's groups.
        order = [names[id(p)] for group in opt.param_groups for p in group["params"]]
        by_name["state"] |= {order[i]: s for i, s in opt_state["state"].items()}
        by_name["param_groups"] += [
            {**g, "params": [order[i] for i in g["params"]]} for g in opt_state["param_groups"]
        ]
    set_optimizer_state_dict(model, optimizer_parts(optimizer), by_name, options=full)
