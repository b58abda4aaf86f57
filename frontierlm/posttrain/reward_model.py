"""Scalar heads on a FrontierLM Transformer: PPO's value head and a Bradley-Terry reward model.

A head is a `Linear(d_model, 1)` attached to the Transformer as a submodule, reading the final
normalised hidden states (captured by a forward hook on `model.norm`), so the model keeps its
own forward, its checkpoints and the one training loop. The reward model is trained on
preference pairs with the Bradley-Terry loss -log sigmoid(r(chosen) - r(rejected)), its score
read at the last token of the conversation (InstructGPT, TRL's RewardTrainer).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_model, save_model
from torch import nn

from frontierlm.atomic import atomic_dir, commit_dir
from frontierlm.config import LoopConfig, ModelConfig, RunConfig
from frontierlm.model import Transformer
from frontierlm.posttrain.batches import fixed_batches
from frontierlm.posttrain.chat_data import PreferencePair
from frontierlm.tokenizer.chat import ChatRenderer, Message
from frontierlm.tokenizer.shards import hash_fraction
from frontierlm.train.loop import Batch, TrainTask, train
from frontierlm.train.sampler import EpochSampler

REWARD_HEAD = "score_head"
VALUE_HEAD = "value_head"


def attach_scalar_head(model: Transformer, name: str) -> nn.Linear:
    """Add `model.<name>`, a zero-initialised Linear(d_model, 1) (scores start at 0)."""
    head = nn.Linear(model.cfg.d_model, 1).to(next(model.parameters()).device)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    setattr(model, name, head)
    if not getattr(model, "_captures_hidden", False):

        def keep(module: nn.Module, args: Any, output: torch.Tensor) -> None:
            model.final_hidden = output

        model.norm.register_forward_hook(keep)
        model._captures_hidden = True
    return head


def detach_scalar_head(model: Transformer, name: str) -> None:
    """Remove the head, leaving a plain Transformer for export and generation."""
    delattr(model, name)


def scalar_outputs(model: nn.Module, base: Transformer, name: str) -> torch.Tensor:
    """The head's value at every position of the last forward of `model` (a wrapper of
    `base`, or `base` itself): (batch, seq) float32."""
    head = getattr(base, name)
    return head(base.final_hidden).squeeze(-1).float()


def last_token_scores(model: nn.Module, base: Transformer, ids: torch.Tensor, lengths):
    """The reward head's score at each row's last real token."""
    model(ids)
    scores = scalar_outputs(model, base, REWARD_HEAD)
    return scores[torch.arange(len(ids), device=ids.device), lengths - 1]


# ----------------------------------------------------------------------------- Bradley-Terry


def _padded(rows: Sequence[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
    return ids, torch.tensor([len(r) for r in rows])


def render_pairs(
    pairs: Sequence[PreferencePair], renderer: ChatRenderer, max_len: int
) -> list[tuple[list[int], list[int]]]:
    """(chosen ids, rejected ids) per pair, each cut to its last `max_len` tokens (the final
    reply, where the two differ, is what the score must see)."""
    out = []
    for pair in pairs:
        both = [
            renderer.render([*pair.prompt, Message("assistant", reply)]).ids[-max_len:]
            for reply in (pair.chosen, pair.rejected)
        ]
        out.append((both[0], both[1]))
    return out


def pair_rows(pairs: Sequence[tuple[list[int], list[int]]], pad_id: int) -> Batch:
    """Chosen rows, then rejected rows, padded on the right."""
    ids, lengths = _padded([c for c, _ in pairs] + [r for _, r in pairs], pad_id)
    return {"input_ids": ids, "lengths": lengths}


def bradley_terry_loss(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`scores` (2B,) chosen first: (mean -log sigmoid(r_c - r_r), accuracy)."""
    half = scores.shape[0] // 2
    margin = scores[:half] - scores[half:]
    return -F.logsigmoid(margin).mean(), (margin > 0).float().mean()


def reward_model_accuracy(
    model: Transformer, pairs: Sequence[tuple[list[int], list[int]]], pad_id: int, batch_size: int
) -> dict[str, float]:
    device = next(model.parameters()).device
    losses, hits = 0.0, 0.0
    for chunk in fixed_batches(list(pairs), batch_size):
        batch = {k: v.to(device) for k, v in pair_rows(chunk, pad_id).items()}
        with torch.no_grad():
            loss, acc = bradley_terry_loss(
                last_token_scores(model, model, batch["input_ids"], batch["lengths"])
            )
        losses += loss.item() * len(chunk)
        hits += acc.item() * len(chunk)
    return {"loss": losses / len(pairs), "accuracy": hits / len(pairs)}


def split_pairs(pairs: Sequence[PreferencePair], val_fraction: float):
    train_set, val_set = [], []
    for pair in pairs:
        key = pair.prompt[0].content + pair.chosen
        (val_set if hash_fraction(key, salt="rm-val") < val_fraction else train_set).append(pair)
    return train_set, val_set


def train_reward_model(
    model: Transformer,
    cfg: LoopConfig,
    train_pairs: Sequence[tuple[list[int], list[int]]],
    val_pairs: Sequence[tuple[list[int], list[int]]],
    pad_id: int,
    work_dir: Path,
    device: torch.device,
    run: RunConfig | None = None,
    seed: int = 0,
) -> dict[str, float]:
    """Train `model` (a Transformer, e.g. the SFT model) with a reward head on rendered pairs,
    on the one training loop; write the reward model to `work_dir/model`; return the metrics.
    `cfg.batch_size` counts pairs (each step reads 2 * batch_size sequences)."""
    if REWARD_HEAD not in dict(model.named_children()):
        attach_scalar_head(model, REWARD_HEAD)
    sampler = EpochSampler(len(train_pairs), cfg.batch_size, seed)

    def loss(trained: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, Any]]:
        scores = last_token_scores(trained, model, batch["input_ids"], batch["lengths"])
        value, accuracy = bradley_terry_loss(scores)
        return value, {"accuracy": accuracy.detach()}

    task = TrainTask(
        name="reward_model",
        batch=lambda i: pair_rows([train_pairs[j] for j in sampler(i)], pad_id),
        loss=loss,
        evaluate=lambda m: reward_model_accuracy(model, val_pairs, pad_id, cfg.batch_size),
    )
    metrics = train(model, cfg, task, work_dir, device, run, export=False)
    save_reward_model(work_dir / "model", model)
    return metrics


def save_reward_model(final: Path, model: Transformer) -> None:
    tmp = atomic_dir(final)
    save_model(model, str(tmp / "model.safetensors"))
    config = {"model": model.cfg.model_dump(), "vocab_size": model.vocab_size}
    config["scalar_head"] = REWARD_HEAD
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    commit_dir(tmp, final)


def load_reward_model(directory: Path, device: torch.device | str = "cpu") -> Transformer:
    config_file = directory / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"no reward model at {directory} (missing config.json)")
    config = json.loads(config_file.read_text())
    if config.get("scalar_head") != REWARD_HEAD:
        raise ValueError(f"{directory} holds a language model, not a reward model (no score head)")
    model = Transformer(ModelConfig.model_validate(config["model"]), config["vocab_size"])
    attach_scalar_head(model, REWARD_HEAD)
    load_model(model, str(directory / "model.safetensors"), device=str(device))
    return model.to(device).eval()


class RewardModelScorer:
    """A reward function (rewards.RewardFn signature) scoring (prompt, completion) chats."""

    def __init__(self, model: Transformer, renderer: ChatRenderer, pad_id: int, batch_size=16):
        self.model, self.renderer, self.pad_id, self.batch_size = (
            model,
            renderer,
            pad_id,
            batch_size,
        )

    @torch.no_grad()
    def __call__(self, prompts, completions, references) -> list[float]:
        max_len = self.model.cfg.max_seq_len
        rows = [
            self.renderer.render([Message("user", p), Message("assistant", c)]).ids[-max_len:]
            for p, c in zip(prompts, completions, strict=True)
        ]
        device = next(self.model.parameters()).device
        scores: list[float] = []
        for chunk in fixed_batches(rows, self.batch_size):
            ids, lengths = _padded(chunk, self.pad_id)
            scores += last_token_scores(
                self.model, self.model, ids.to(device), lengths.to(device)
            ).tolist()
        return scores
