"""The pretrain stage: a dense decoder trained on packed token windows."""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from frontierlm.config import LoopConfig, PretrainConfig
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
        sources: TokenSplit | None = None,
    ) -> None:
        """`sources`: the split `tokens` belong to, to tag each target with its token source
        (`batch["token_sources"]`, see `lm_loss`); None tags nothing."""
        self.tokens, self.seq_len, self.bos_id = tokens, seq_len, bos_id
        self.sources = sources
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
        batch = window_batch(torch.from_numpy(np.stack(rows)), self.bos_id)
        if self.sources is not None:
            ids = self.sources.target_sources(np.asarray(starts), self.seq_len)
            batch["token_sources"] = torch.from_numpy(ids)
        return batch


def tracked_sources(split: TokenSplit, loop: PretrainConfig) -> TokenSplit | None:
    """`split` when the run logs per-source losses (`pretrain.source_losses`) and the shards
    record sources; else None."""
    return split if loop.source_losses and split.doc_sources is not None else None


def source_loss_parts(
    losses: torch.Tensor, token_sources: torch.Tensor, names: Sequence[str]
) -> dict[str, torch.Tensor]:
    """Each token source's part of the mean loss of `losses`: `loss_share.NAME` is the sum of
    NAME's token losses over all tokens of the batch (nats per batch token), `token_share.NAME`
    its tokens over all tokens. The loss shares add up to the batch's mean loss, and, as the
    loop averages parts over micro-steps and processes of equal size, to the step's logged
    loss; a source's own mean loss is loss_share / token_share. Two scatter-adds on the device
    and no sync: the values are read with the step's other numbers."""
    # Summed in float64: a float32 scatter-add of thousands of losses into one slot drifts by
    # ~1e-6 of the total, as much as the parts may differ from the loss.
    flat, ids = losses.detach().reshape(-1).double(), token_sources.reshape(-1)
    n = flat.numel()
    sums = torch.zeros(len(names), dtype=torch.float64, device=flat.device).index_add_(0, ids, flat)
    # Not bincount: on CUDA it reads the largest id back to size its output, a sync per step.
    counts = torch.zeros_like(sums).index_add_(0, ids, torch.ones_like(flat))
    loss_shares, token_shares = (sums / n).unbind(), (counts / n).unbind()  # views, no copies
    parts: dict[str, torch.Tensor] = {}
    for name, loss_share, token_share in zip(names, loss_shares, token_shares, strict=True):
        parts[f"loss_share.{name}"] = loss_share
        parts[f"token_share.{name}"] = token_share
    return parts


def lm_loss(
    model: nn.Module,
    batch: Batch,
    z_weight: float = 0.0,
    chunked: bool = True,
    source_names: Sequence[str] = (),
) -> tuple[torch.Tensor, dict[str, float | torch.Tensor]]:
    """Next-token cross-entropy, plus `z_weight` times the z-loss when asked. `chunked`: the
    chunked loss that never holds the logits (the z-loss needs them: then the plain one).
    A batch carrying `token_sources` also reports each source's part of the cross-entropy
    (`source_loss_parts`, named by `source_names`)."""
    # The data-mixture stage (train/mixture.py) goes into metrics.jsonl with the loss, so a
    # change in the curve can be read against the stage boundary.
    parts: dict[str, float | torch.Tensor] = {}
    if "mixture_stage" in batch:
        parts["mixture_stage"] = float(batch["mixture_stage"][0])
    if not z_weight:
        losses = model_token_losses(model, batch, chunked)
        loss = losses.mean()
    else:
        logits = model(batch["input_ids"], doc_ids=batch.get("doc_ids"))
        losses = token_cross_entropy(logits, batch["targets"])
        ce = losses.mean()
        z = z_loss(logits)
        loss = ce + z_weight * z
        parts |= {"ce": ce.item(), "z_loss": z.item()}
    if "token_sources" in batch:
        parts |= source_loss_parts(losses, batch["token_sources"], source_names)
    return loss, parts


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
    sources = tracked_sources(train_split, loop)
    if loop.mixture:
        windows = MixtureWindows(train_split, loop, cfg.run.seed, bos_id, sources is not None)
    else:
        windows = ShuffledWindows(
            train_split.tokens, loop.seq_len, loop.batch_size, cfg.run.seed, bos_id, sources
        )
    task = TrainTask(
        name="pretrain",
        batch=windows,
        loss=functools.partial(
            lm_loss,
            z_weight=loop.z_loss,
            chunked=loop.chunked_ce,
            source_names=train_split.source_names,
        ),
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
