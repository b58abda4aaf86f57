"""The sft stage: fine-tune the pretrained model on chats, with loss on assistant tokens only."""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn

from frontierlm.config import SFTConfig
from frontierlm.console import console
from frontierlm.eval.bpb import bits_per_byte
from frontierlm.posttrain.batches import (
    fit_window,
    fixed_batches,
    pack_chats,
    packed_batch,
    pad_batch,
)
from frontierlm.posttrain.chat_data import load_conversations
from frontierlm.stages import StageContext
from frontierlm.tokenizer.chat import ChatRenderer, RenderedChat
from frontierlm.tokenizer.shards import hash_fraction
from frontierlm.tokenizer.train import PAD, load_tokenizer, token_byte_lengths
from frontierlm.train.checkpoint import load_model_dir
from frontierlm.train.loop import Batch, TrainTask, train
from frontierlm.train.losses import masked_mean, model_token_losses
from frontierlm.train.sampler import EpochSampler


def sft_examples(
    cfg: SFTConfig, renderer: ChatRenderer
) -> tuple[list[RenderedChat], list[RenderedChat]]:
    """Rendered (train, val) chats; val is a salted-hash share of each source, stable."""
    train_set: list[RenderedChat] = []
    val_set: list[RenderedChat] = []
    window = cfg.seq_len + 1  # one extra token: inputs and targets are shifted by one
    for source in cfg.sources:
        for chat in load_conversations(source):
            rendered = fit_window(renderer.render(chat), window)
            if 1 not in rendered.mask:
                continue
            is_val = hash_fraction(chat[0].content, salt="sft-val") < cfg.val_fraction
            (val_set if is_val else train_set).append(rendered)
    return train_set, val_set


def chat_bpb_fn(
    val: list[RenderedChat], pad_id: int, batch_size: int, byte_lengths: torch.Tensor, device
):
    """bpb on the assistant tokens of held-out chats."""
    batches = [pad_batch(chunk, pad_id) for chunk in fixed_batches(val, batch_size)]

    def evaluate(model: nn.Module) -> dict[str, float]:
        return bits_per_byte(model, batches, byte_lengths, device)

    return evaluate


def masked_lm_loss(
    model: nn.Module, batch: Batch, chunked: bool = True
) -> tuple[torch.Tensor, dict[str, float]]:
    """Mean cross-entropy over the assistant tokens of the batch (packed or not)."""
    losses = model_token_losses(model, batch, chunked)
    return masked_mean(losses, batch["loss_mask"]), {}


def run_sft_stage(ctx: StageContext) -> dict[str, Any]:
    cfg = ctx.cfg.sft
    tok = load_tokenizer(ctx.path("tokenizer"))
    renderer = ChatRenderer(tok)
    pad_id = tok.token_to_id(PAD)
    train_set, val_set = sft_examples(cfg, renderer)
    console.print(f"  {len(train_set):,} training chats, {len(val_set):,} held out")
    if cfg.packing:
        rows = pack_chats(train_set, cfg.seq_len + 1)
        console.print(f"  packed into {len(rows):,} rows of {cfg.seq_len + 1} tokens")

        def make_batch(chosen: list[int]) -> Batch:
            return packed_batch([rows[j] for j in chosen], pad_id)
    else:
        rows = train_set

        def make_batch(chosen: list[int]) -> Batch:
            return pad_batch([train_set[j] for j in chosen], pad_id)

    sampler = EpochSampler(len(rows), cfg.batch_size, ctx.cfg.run.seed)
    byte_lengths = torch.tensor(token_byte_lengths(tok))
    model = load_model_dir(ctx.path("pretrain") / "model", ctx.device)
    task = TrainTask(
        name="sft",
        batch=lambda i: make_batch(sampler(i)),
        loss=functools.partial(masked_lm_loss, chunked=cfg.chunked_ce),
        evaluate=chat_bpb_fn(val_set, pad_id, cfg.batch_size, byte_lengths, ctx.device),
    )
    model.eval()
    with torch.no_grad():
        before = task.evaluate(model)
    metrics = train(model, cfg, task, ctx.work_dir, ctx.device, ctx.cfg.run)
    return {
        **metrics,
        "pretrained_val_bpb": before["bpb"],
        "train_chats": len(train_set),
        "val_chats": len(val_set),
        "train_rows": len(rows),
    }
