"""The align stage: Direct Preference Optimization (Rafailov et al. 2023) against a frozen
reference, the SFT model.

loss = -log sigmoid(beta * ((log pi(y_w|x) - log ref(y_w|x)) - (log pi(y_l|x) - log ref(y_l|x))))
The bracket times beta is the implicit reward margin; it is 0 before training by construction.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from frontierlm.config import AlignConfig
from frontierlm.console import console
from frontierlm.posttrain.batches import fit_window, fixed_batches, pad_batch
from frontierlm.posttrain.chat_data import PreferencePair, load_pairs
from frontierlm.stages import StageContext
from frontierlm.tokenizer.chat import ChatRenderer, Message, RenderedChat
from frontierlm.tokenizer.shards import hash_fraction
from frontierlm.tokenizer.train import PAD, load_tokenizer
from frontierlm.train.checkpoint import load_model_dir
from frontierlm.train.loop import Batch, TrainTask, train
from frontierlm.train.losses import sequence_logprobs
from frontierlm.train.sampler import EpochSampler

RenderedPair = tuple[RenderedChat, RenderedChat]


def render_pair(pair: PreferencePair, renderer: ChatRenderer, window: int) -> RenderedPair:
    def one(reply: str) -> RenderedChat:
        chat = renderer.render([*pair.prompt, Message("assistant", reply)], last_turn_only=True)
        return fit_window(chat, window)

    return one(pair.chosen), one(pair.rejected)


def pair_batch(pairs: list[RenderedPair], pad_id: int) -> Batch:
    """Chosen rows first, then rejected rows, in one padded batch: one forward pass for both."""
    return pad_batch([c for c, _ in pairs] + [r for _, r in pairs], pad_id)


def dpo_loss(
    policy_logps: torch.Tensor, ref_logps: torch.Tensor, beta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs are (2B,) sequence log-probs, chosen first. Returns (mean loss, margins (B,))."""
    half = policy_logps.shape[0] // 2
    ratios = policy_logps - ref_logps
    margins = beta * (ratios[:half] - ratios[half:])
    return -F.logsigmoid(margins).mean(), margins


def sequence_logps(model: nn.Module, batch: Batch) -> torch.Tensor:
    return sequence_logprobs(model(batch["input_ids"]), batch["targets"], batch["loss_mask"])


def dpo_eval_fn(cfg: AlignConfig, reference: nn.Module, val_pairs: list[RenderedPair], pad_id: int):
    """Held-out DPO loss, mean implicit reward margin and accuracy (share of margins > 0)."""
    batches = [
        pair_batch(list(chunk), pad_id) for chunk in fixed_batches(val_pairs, cfg.batch_size)
    ]

    def evaluate(model: nn.Module) -> dict[str, float]:
        device = next(model.parameters()).device
        all_margins, total_loss = [], 0.0
        for batch in batches:
            batch = {k: v.to(device) for k, v in batch.items()}
            value, margins = dpo_loss(
                sequence_logps(model, batch), sequence_logps(reference, batch), cfg.beta
            )
            all_margins.append(margins)
            total_loss += value.item() * len(margins)
        margins = torch.cat(all_margins)
        return {
            "loss": total_loss / len(margins),
            "margin": margins.mean().item(),
            "accuracy": (margins > 0).float().mean().item(),
        }

    return evaluate


def dpo_task(
    cfg: AlignConfig, reference: nn.Module, train_pairs, val_pairs, pad_id: int, seed: int
) -> TrainTask:
    sampler = EpochSampler(len(train_pairs), cfg.batch_size, seed)

    def loss(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        with torch.no_grad():
            ref = sequence_logps(reference, batch)
        value, margins = dpo_loss(sequence_logps(model, batch), ref, cfg.beta)
        return value, {
            "margin": margins.mean().item(),
            "accuracy": (margins > 0).float().mean().item(),
        }

    return TrainTask(
        name="align",
        batch=lambda i: pair_batch([train_pairs[j] for j in sampler(i)], pad_id),
        loss=loss,
        evaluate=dpo_eval_fn(cfg, reference, val_pairs, pad_id),
    )


def split_pairs(
    cfg: AlignConfig, renderer: ChatRenderer
) -> tuple[list[RenderedPair], list[RenderedPair]]:
    train_pairs: list[RenderedPair] = []
    val_pairs: list[RenderedPair] = []
    for source in cfg.sources:
        for pair in load_pairs(source):
            rendered = render_pair(pair, renderer, cfg.seq_len + 1)
            if 1 not in rendered[0].mask or 1 not in rendered[1].mask:
                continue
            key = pair.prompt[0].content + pair.chosen
            (
                val_pairs
                if hash_fraction(key, salt="align-val") < cfg.val_fraction
                else train_pairs
            ).append(rendered)
    return train_pairs, val_pairs


def run_align_stage(ctx: StageContext) -> dict[str, Any]:
    cfg = ctx.cfg.align
    tok = load_tokenizer(ctx.path("tokenizer"))
    renderer = ChatRenderer(tok)
    train_pairs, val_pairs = split_pairs(cfg, renderer)
    if not val_pairs:
        raise ValueError("align: no held-out pairs; raise align.val_fraction or add pairs")
    console.print(f"  {len(train_pairs):,} training pairs, {len(val_pairs):,} held out")
    policy = load_model_dir(ctx.path("sft") / "model", ctx.device)
    reference = copy.deepcopy(policy).eval().requires_grad_(False)
    task = dpo_task(cfg, reference, train_pairs, val_pairs, tok.token_to_id(PAD), ctx.cfg.run.seed)
    metrics = train(policy, cfg, task, ctx.work_dir, ctx.device, ctx.cfg.run)
    return {**metrics, "train_pairs": len(train_pairs), "val_pairs": len(val_pairs)}
