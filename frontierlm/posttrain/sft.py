"""The sft stage: fine-tune the pretrained model on chats, with loss on assistant tokens only.

The synth_sft stage is the same fine-tuning from the SFT model on the synth stage's verified
replies (rejection-sampling fine-tuning, one STaR iteration), with greedy exact match on held-out
problems before and after, compared item by item."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from frontierlm.config import ChatSource, SFTConfig
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
    metrics, _ = fine_tune(ctx, ctx.cfg.sft, ctx.path("pretrain") / "model", "sft")
    return metrics


def fine_tune(
    ctx: StageContext, cfg: SFTConfig, init: Path, name: str
) -> tuple[dict[str, Any], nn.Module]:
    """Train the model in `init` on `cfg.sources` into the stage directory; return the metrics
    (with the starting model's held-out chat bpb) and the trained model."""
    tok = load_tokenizer(ctx.path("tokenizer"))
    renderer = ChatRenderer(tok)
    pad_id = tok.token_to_id(PAD)
    train_set, val_set = sft_examples(cfg, renderer)
    if not train_set:
        raise ValueError(f"{name}: no training chats in {[s.path for s in cfg.sources]}")
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
    model = load_model_dir(init, ctx.device)
    task = TrainTask(
        name=name,
        batch=lambda i: make_batch(sampler(i)),
        loss=functools.partial(masked_lm_loss, chunked=cfg.chunked_ce),
        evaluate=chat_bpb_fn(val_set, pad_id, cfg.batch_size, byte_lengths, ctx.device),
    )
    model.eval()
    with torch.no_grad():
        before = task.evaluate(model) if val_set else {"bpb": float("nan")}
    metrics = train(model, cfg, task, ctx.work_dir, ctx.device, ctx.cfg.run)
    start = "pretrained" if name == "sft" else "initial"
    return {
        **metrics,
        f"{start}_val_bpb": before["bpb"],
        "train_chats": len(train_set),
        "val_chats": len(val_set),
        "train_rows": len(rows),
    }, model


def run_synth_sft_stage(ctx: StageContext) -> dict[str, Any]:
    from frontierlm.eval.exact_match import paired_comparison
    from frontierlm.eval.harness import run_task
    from frontierlm.eval.tasks import load_spec
    from frontierlm.train.parallel import autocast

    cfg = ctx.cfg.synth_sft
    synth_file = ctx.path("synth") / "synth.jsonl"
    kept = sum(1 for line in synth_file.open() if line.strip())
    if kept == 0:
        raise ValueError(
            f"synth_sft: {synth_file} holds no verified replies, nothing to train on; sample "
            "more (synth.samples, synth.max_items) or train the SFT model longer"
        )
    synth = ChatSource(name="synth", path=str(synth_file), format="qa")
    train_cfg = cfg.model_copy(update={"sources": [synth, *cfg.sources]})
    spec = load_spec(cfg.heldout_task)
    tok = load_tokenizer(ctx.path("tokenizer"))

    def heldout(model: nn.Module) -> dict[str, Any]:
        model.eval()
        with torch.no_grad(), autocast(ctx.device, cfg.precision):
            return run_task(spec, model, tok, cfg.heldout_limit, seed=ctx.cfg.run.seed)

    console.print(f"  held-out {spec.name}: the SFT model (before)")
    before = heldout(load_model_dir(ctx.path("sft") / "model", ctx.device))
    metrics, _ = fine_tune(ctx, train_cfg, ctx.path("sft") / "model", "synth_sft")
    model = load_model_dir(ctx.work_dir / "model", ctx.device)  # the model the stage hands on
    console.print(f"  held-out {spec.name}: after fine-tuning on {kept:,} verified replies")
    after = heldout(model)
    paired = paired_comparison(
        [r["strict"] for r in before["items"]], [r["strict"] for r in after["items"]]
    )
    record = {
        "task": spec.name,
        "synth_chats": kept,
        **paired,
        "seconds": {"before": before["seconds"], "after": after["seconds"]},
        "items": [
            {"reference": b["reference"], "before": b["completion"], "after": a["completion"],
             "before_ok": b["strict"], "after_ok": a["strict"]}
            for b, a in zip(before["items"], after["items"], strict=True)
        ],
    }  # fmt: skip
    (ctx.work_dir / "heldout.json").write_text(json.dumps(record, indent=1))
    console.print(
        f"  held-out exact match ({paired['n']:,} items): {paired['before']:.3f} "
        f"[{paired['before_ci'][0]:.3f}, {paired['before_ci'][1]:.3f}] -> {paired['after']:.3f} "
        f"[{paired['after_ci'][0]:.3f}, {paired['after_ci'][1]:.3f}]; right only after "
        f"{paired['only_after']}, only before {paired['only_before']} "
        f"(McNemar p={paired['mcnemar_p']:.2g})"
    )
    return {
        **metrics,
        "synth_chats": kept,
        "heldout_task": spec.name,
        "heldout_n": paired["n"],
        "heldout_exact_match_before": paired["before"],
        "heldout_exact_match_after": paired["after"],
        "heldout_only_after": paired["only_after"],
        "heldout_only_before": paired["only_before"],
        "heldout_mcnemar_p": paired["mcnemar_p"],
    }
