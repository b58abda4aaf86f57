"""The one training loop behind pretraining, SFT and preference optimisation.

A stage supplies a `TrainTask`: how to build the batch for a micro-step index, how to compute
the loss, and how to evaluate. Batches are pure functions of the index and the seed, so a run
killed at any point resumes from its latest checkpoint and ends exactly where an uninterrupted
run ends (same data order, same optimizer state, same schedule).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from frontierlm.config import LoopConfig
from frontierlm.console import console, progress_bar
from frontierlm.model import Transformer
from frontierlm.train.checkpoint import (
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
    save_model_dir,
)
from frontierlm.train.metrics import MetricsLog
from frontierlm.train.optim import build_optimizer
from frontierlm.train.parallel import autocast
from frontierlm.train.schedule import lr_at

Batch = dict[str, torch.Tensor]


@dataclass
class TrainTask:
    name: str
    batch: Callable[[int], Batch]  # micro-step index -> CPU tensors
    loss: Callable[[nn.Module, Batch], tuple[torch.Tensor, dict[str, float]]]
    evaluate: Callable[[nn.Module], dict[str, float]]
    tokens_key: str = "input_ids"  # tensor whose numel counts as processed tokens


def train(
    model: Transformer, cfg: LoopConfig, task: TrainTask, work_dir: Path, device: torch.device
) -> dict[str, float]:
    """Train `model` for `cfg.steps` optimizer steps; write checkpoints, metrics and the final
    model under `work_dir`; return the last train and eval metrics."""
    work_dir.mkdir(parents=True, exist_ok=True)
    ckpt_root = work_dir / "checkpoints"
    log = MetricsLog(work_dir / "metrics.jsonl")
    model.to(device)
    optimizer = build_optimizer(model, cfg)
    start = 0
    if checkpoints := list_checkpoints(ckpt_root):
        state = load_checkpoint(checkpoints[-1], model, optimizer)
        start = int(state["step"])
        console.print(f"[yellow]{task.name}: resuming from {checkpoints[-1]} (step {start})")
    log.truncate_after(start)

    with progress_bar() as bar:
        job = bar.add_task(task.name, total=cfg.steps, completed=start, info="")
        for step in range(start, cfg.steps):
            t0 = time.perf_counter()
            model.train()
            lr = lr_at(step, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            totals: dict[str, float] = {}
            tokens = 0
            for micro in range(cfg.grad_accum):
                batch = {
                    k: v.to(device, non_blocking=True)
                    for k, v in task.batch(step * cfg.grad_accum + micro).items()
                }
                tokens += batch[task.tokens_key].numel()
                with autocast(device, cfg.precision):
                    loss, parts = task.loss(model, batch)
                    if (aux := model.aux_loss()) is not None:  # MoE balance, when asked
                        loss = loss + aux
                        parts = {**parts, "moe_aux_loss": aux.item()}
                (loss / cfg.grad_accum).backward()
                for key, value in {"loss": loss.item(), **parts}.items():
                    totals[key] = totals.get(key, 0.0) + value / cfg.grad_accum
            grad_norm = (
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip).item()
                if cfg.grad_clip > 0
                else 0.0
            )
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            expert_stats = model.after_optimizer_step(lr_scale=lr / cfg.lr)
            elapsed = time.perf_counter() - t0
            done = step + 1
            record = {
                "step": done,
                "lr": lr,
                "grad_norm": grad_norm,
                "tokens_per_s": tokens / elapsed,
                **totals,
                **expert_stats,
            }
            if done % cfg.eval_every == 0 or done == cfg.steps:
                model.eval()
                with torch.no_grad(), autocast(device, cfg.precision):
                    evals = task.evaluate(model)
                record.update({f"val_{k}": v for k, v in evals.items()})
            log.write(record)
            bar.update(
                job, completed=done, info=f"loss {totals['loss']:.4f} {tokens / elapsed:,.0f} tok/s"
            )
            if done % cfg.checkpoint_every == 0 or done == cfg.steps:
                save_checkpoint(
                    ckpt_root, done, model, optimizer, {"task": task.name}, cfg.keep_checkpoints
                )
    save_model_dir(work_dir / "model", model)
    # The last record always holds the final evaluation, also when a resume found the run done.
    final = log.read()[-1]
    skip = {"step", "lr", "grad_norm", "tokens_per_s"}
    return {
        (k if k.startswith("val_") else f"train_{k}"): v for k, v in final.items() if k not in skip
    }
