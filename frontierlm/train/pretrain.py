"""The pretrain stage: a dense decoder trained on packed token windows."""

from __future__ import annotations

import functools

import numpy as np
import torch
from torch import nn

from frontierlm.config import LoopConfig
from frontierlm.eval.bpb import UnigramLM, bits_per_byte, sequential_windows
from frontierlm.model import Transformer
from frontierlm.stages import StageContext
from frontierlm.tokenizer.shards import TokenSplit, window_batch
from frontierlm.tokenizer.train import BOS, load_tokenizer, token_byte_lengths
from frontierlm.train.loop import Batch, TrainTask, train
from frontierlm.train.losses import model_token_losses, token_cross_entropy, z_loss
from frontierlm.train.mixture import MixtureWindows
from frontierlm.train.sampler import EpochSampler


class ShuffledWindows:
    """Batches of (seq_len + 1)-token windows cut at fixed strides, in a seeded epoch order:
    every token is seen once per epoch."""

    def __init__(
        self,
        tokens: np.ndarray,
        seq_len: int,
        batch_size: int,
        seed: int,
        bos_id: int | None = None,
    ) -> None:
        self.tokens, self.seq_len, self.bos_id = tokens, seq_len, bos_id
        n_windows = (len(tokens) - 1) // seq_len
        if n_windows < batch_size:
            raise ValueError(
                f"only {n_windows} windows of {seq_len} tokens in the training split, fewer than "
                f"batch_size={batch_size}: lower seq_len/batch_size or add data"
            )
        self.sampler = EpochSampler(n_windows, batch_size, seed)

    def __call__(self, index: int) -> Batch:
        starts = [w * self.seq_len for w in self.sampler(index)]
        rows = [np.asarray(self.tokens[s : s + self.seq_len + 1], dtype=np.int64) for s in starts]
        return window_batch(torch.from_numpy(np.stack(rows)), self.bos_id)


def lm_loss(
    model: nn.Module, batch: Batch, z_weight: float = 0.0, chunked: bool = True
) -> tuple[torch.Tensor, dict[str, float]]:
    """Next-token cross-entropy, plus `z_weight` times the z-loss when asked. `chunked`: the
    chunked loss that never holds the logits (the z-loss needs them: then the plain one)."""
    # The data-mixture stage (train/mixture.py) goes into metrics.jsonl with the loss, so a
    # change in the curve can be read against the stage boundary.
    parts = {"mixture_stage": float(batch["mixture_stage"][0])} if "mixture_stage" in batch else {}
    if not z_weight:
        return model_token_losses(model, batch, chunked).mean(), parts
    logits = model(batch["input_ids"], doc_ids=batch.get("doc_ids"))
    loss = token_cross_entropy(logits, batch["targets"]).mean()
    z = z_loss(logits)
    return loss + z_weight * z, {**parts, "ce": loss.item(), "z_loss": z.item()}


def val_bpb_fn(
    ctx: StageContext,
    loop: LoopConfig,
    batches: int,
    device: torch.device,
    bos_id: int | None = None,
):
    """Validation bpb on the held-out documents of the tokenize stage (the same windows at
    every evaluation, so the curve compares like with like)."""
    val = TokenSplit.open(ctx.path("tokenize"), "val").tokens
    byte_lengths = torch.tensor(token_byte_lengths(load_tokenizer(ctx.path("tokenizer"))))

    def evaluate(model: nn.Module) -> dict[str, float]:
        windows = sequential_windows(val, loop.seq_len, loop.batch_size, batches, bos_id)
        if isinstance(model, Transformer):
            model.eval_expert_load()  # start the count afresh
        metrics = bits_per_byte(model, windows, byte_lengths, device)
        if isinstance(model, Transformer):  # MoE: expert balance on the held-out windows
            metrics |= model.eval_expert_load()
        return metrics

    return evaluate


def run_pretrain_stage(ctx: StageContext) -> dict[str, float]:
    if ctx.cfg.pretrain.mode == "diloco":
        from frontierlm.distributed.launch import run_diloco_stage

        return run_diloco_stage(ctx)
    cfg, device = ctx.cfg, ctx.device
    torch.manual_seed(cfg.run.seed)
    tok = load_tokenizer(ctx.path("tokenizer"))
    model = Transformer(cfg.model, tok.get_vocab_size())
    train_split = TokenSplit.open(ctx.path("tokenize"), "train")
    loop = cfg.pretrain
    bos_id = tok.token_to_id(BOS) if loop.document_mask else None
    if loop.mixture:
        windows = MixtureWindows(train_split, loop, cfg.run.seed, bos_id)
    else:
        windows = ShuffledWindows(
            train_split.tokens, loop.seq_len, loop.batch_size, cfg.run.seed, bos_id
        )
    task = TrainTask(
        name="pretrain",
        batch=windows,
        loss=functools.partial(lm_loss, z_weight=loop.z_loss, chunked=loop.chunked_ce),
        evaluate=val_bpb_fn(ctx, loop, loop.eval_batches, device, bos_id),
    )
    metrics = train(model, loop, task, ctx.work_dir, device, cfg.run)
    # The baseline, scored on exactly the windows the model was scored on.
    unigram = UnigramLM(np.load(ctx.path("tokenize") / "unigram.npy"))
    metrics["unigram_bpb"] = task.evaluate(unigram.to(device))["bpb"]
    metrics["bpb_reduction_vs_unigram"] = 1.0 - metrics["val_bpb"] / metrics["unigram_bpb"]
    metrics["params"] = float(model.num_params())
    metrics["active_params"] = float(model.active_params())
    metrics["tokens_seen"] = float(loop.steps * loop.grad_accum * loop.batch_size * loop.seq_len)
    metrics["flops_per_token"] = model.flops_per_token(loop.seq_len)
    metrics["train_flops"] = metrics["flops_per_token"] * metrics["tokens_seen"]
    return metrics
