"""The one training loop behind pretraining, SFT and preference optimisation.

A stage supplies a `TrainTask`: how to build the batch for a micro-step index, how to compute
the loss, and how to evaluate. Batches are pure functions of the index and the seed, so a run
killed at any point resumes from its latest checkpoint and ends exactly where an uninterrupted
run ends (same data order, same optimizer state, same schedule).

Under torchrun every process runs this loop on its rows of each global batch (`rank_rows`), with
the model made data parallel by `parallelize` (run.parallel). The losses and gradient norm are
averaged over the processes before anything is judged, so every process takes the same spike,
skip and rollback decisions; rank 0 alone writes metrics, events and the console, and all
processes evaluate the whole held-out set (the same numbers everywhere). Checkpoints are then
sharded (see checkpoint.py) and resume on any number of processes.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from frontierlm.config import LoopConfig, RunConfig
from frontierlm.console import console, progress_bar
from frontierlm.model import Transformer
from frontierlm.train.checkpoint import (
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
    save_model_dir,
)
from frontierlm.train.fp8 import convert_to_float8
from frontierlm.train.metrics import MetricsLog, peak_flops
from frontierlm.train.offload import CheckpointStore, Offloader, pull_latest
from frontierlm.train.optim import build_optimizer
from frontierlm.train.parallel import (
    all_mean,
    all_sum_,
    apply_activation_checkpointing,
    apply_compile,
    autocast,
    barrier,
    check_batch_split,
    clip_grad_norm,
    grad_sync,
    parallelize,
    rank_rows,
    world,
)
from frontierlm.train.prefetch import Prefetcher
from frontierlm.train.qk_clip import QKClip
from frontierlm.train.schedule import lr_at, peak_lr
from frontierlm.train.stability import LayerStats, SpikeGuard

Batch = dict[str, torch.Tensor]


@dataclass
class TrainTask:
    name: str
    batch: Callable[[int], Batch]  # micro-step index -> CPU tensors
    # -> (loss, parts): parts are logged beside the loss, as floats or 0-d tensors (tensors
    # are read once per step, so a loss function need not stall the GPU to report them).
    loss: Callable[[nn.Module, Batch], tuple[torch.Tensor, dict[str, float | torch.Tensor]]]
    evaluate: Callable[[nn.Module], dict[str, float]]
    tokens_key: str = "input_ids"  # tensor whose numel counts as processed tokens


class OuterSync(Protocol):
    """An outer loop around the inner steps (DiLoCo islands, frontierlm/distributed/): `start`
    adopts the shared starting point and returns the step to start from (an island that joins
    late starts at the data position it owns); `after_step` runs after every optimizer step,
    before that step's evaluation, and returns numbers for its metrics record. The loop
    checkpoints `checkpoint_offset` steps past each multiple of checkpoint_every: the steps at
    which the outer loop's own state is whole (no exchange in flight)."""

    checkpoint_offset: int

    def start(self, model: nn.Module, step: int) -> int: ...

    def after_step(self, step: int, model: nn.Module) -> dict[str, float]: ...


def _accepted(records: list[dict[str, Any]]) -> list[dict[str, float]]:
    return [r for r in records if "loss" in r]


def train(
    model: Transformer,
    cfg: LoopConfig,
    task: TrainTask,
    work_dir: Path,
    device: torch.device,
    run: RunConfig | None = None,
    export: bool = True,
    outer: OuterSync | None = None,
) -> dict[str, float]:
    """Train `model` for `cfg.steps` optimizer steps; write checkpoints, metrics and (with
    `export`) the final model under `work_dir`; return the last train and eval metrics. `run`
    gives how a torchrun job spreads the model (run.parallel, see train/parallel.py) and the
    accelerator's peak for MFU.

    A spike (see SpikeGuard) throws its batch away and runs the step again on the next one;
    `cfg.spike_max_skips` skips in a row roll the run back to the latest checkpoint and move the
    data past the window that caused them (the data offset travels in the checkpoints). Every
    event goes to `events.jsonl`. `outer` wraps the steps in an outer loop (see OuterSync)."""
    run = run or RunConfig()
    # Fails on every process alike, before any collective call could leave one waiting.
    check_batch_split(cfg.batch_size, f"{task.name}.batch_size")
    main = world().main
    work_dir.mkdir(parents=True, exist_ok=True)
    ckpt_root = work_dir / "checkpoints"
    log = MetricsLog(work_dir / "metrics.jsonl", writer=main)
    events = MetricsLog(work_dir / "events.jsonl", writer=main)
    model.to(device)
    if cfg.precision == "fp8":
        kept = convert_to_float8(model, cfg.fp8_scaling, cfg.fp8_backward)
        console.print(f"{task.name}: fp8 linear layers; left in bf16: {', '.join(kept) or 'none'}")
    apply_activation_checkpointing(model, cfg.activation_checkpointing)
    apply_compile(model, device, cfg.compile)
    # `trained` runs forward and backward (a DDP wrapper, or `model` itself); `model` answers
    # the model's own questions (MoE losses and loads) and is what checkpoints hold.
    trained = parallelize(model, run.parallel, device, cfg.precision)
    optimizer = build_optimizer(model, cfg)
    qk_clip = QKClip(model, cfg.qk_clip) if cfg.qk_clip is not None else None
    step, data_offset = 0, 0
    offloader = None
    if run.offload.bucket is not None:
        store = CheckpointStore(run.offload, run.name, task.name)
        if main:  # an empty local disk resumes from the newest complete stored checkpoint
            pull_latest(store, ckpt_root)
            offloader = Offloader(store, ckpt_root, cfg.keep_checkpoints)
        barrier()
    if checkpoints := list_checkpoints(ckpt_root):
        state = load_checkpoint(checkpoints[-1], model, optimizer)
        step, data_offset = int(state["step"]), int(state["extra"].get("data_offset", 0))
        console.print(f"[yellow]{task.name}: resuming from {checkpoints[-1]} (step {step})")
    if outer is not None:
        step = outer.start(model, step)

    def history_up_to(step: int) -> list[dict[str, float]]:
        """The accepted records up to `step`, read by every process once rank 0 has cut the
        log there: the spike guard's history, the same on all of them."""
        log.truncate_after(step)
        barrier()
        return _accepted(log.read())

    guard = SpikeGuard(cfg, history_up_to(step))
    skips_in_a_row = rollbacks = 0
    # MFU counts the model's own FLOPs (attention included, see Transformer.flops_per_token)
    # against the accelerator's dense bf16 peak, for fp8 runs too (the usual convention).
    flops_per_token = model.flops_per_token(cfg.seq_len)
    peak = peak_flops(device, run.peak_tflops)
    stats_every = cfg.layer_stats_every or cfg.eval_every
    layer_stats = LayerStats(model)
    on_gpu = device.type == "cuda"
    batches = Prefetcher(
        lambda index: rank_rows(task.batch(index), task.name), cfg.prefetch, pin_memory=on_gpu
    )

    # A crash still lets the checkpoints already written reach the store.
    with batches, progress_bar() as bar, offloader or contextlib.nullcontext():
        job = bar.add_task(task.name, total=cfg.steps, completed=step, info="")
        while step < cfg.steps:
            t0 = time.perf_counter()
            if on_gpu:
                torch.cuda.reset_peak_memory_stats(device)
            trained.train()
            lr = lr_at(step, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            totals: dict[str, float | torch.Tensor] = {}
            tokens = 0
            data_step = step + data_offset
            if qk_clip is not None:
                qk_clip.begin_step()
            for micro in range(cfg.grad_accum):
                rows = batches(data_step * cfg.grad_accum + micro)
                batch = {k: v.to(device, non_blocking=True) for k, v in rows.items()}
                tokens += batch[task.tokens_key].numel() * world().size
                with grad_sync(trained, micro == cfg.grad_accum - 1):
                    with autocast(device, cfg.precision):
                        loss, parts = task.loss(trained, batch)
                        if (aux := model.aux_loss()) is not None:  # MoE balance, when asked
                            loss = loss + aux
                            parts = {**parts, "moe_aux_loss": aux}
                    (loss / cfg.grad_accum).backward()
                for key, value in {"loss": loss, **parts}.items():
                    value = value.detach().float() if isinstance(value, torch.Tensor) else value
                    totals[key] = totals.get(key, 0.0) + value / cfg.grad_accum
            watch_layers = (step + 1) % stats_every == 0
            if watch_layers:  # before clipping, like the global norm
                layer_stats.before_step()
            # The norm before clipping (max_norm=inf only measures): the spike guard needs it.
            max_norm = cfg.grad_clip if cfg.grad_clip > 0 else math.inf
            grad_norm = clip_grad_norm(model.parameters(), max_norm)
            # One read of the step's numbers from the device, then every process judges the
            # step on the same ones (a no-op in one process).
            grad_norm, *means = all_mean(_as_floats([grad_norm, *totals.values()]))
            totals = dict(zip(totals, means, strict=True))
            spike = guard.reason(totals["loss"], grad_norm)
            if spike is not None:
                # The batch is thrown away, not the update: the same step runs again on the
                # next batch, so the schedule and the update count stay those of a clean run.
                optimizer.zero_grad(set_to_none=True)
                model.discard_step_stats()
                data_offset += 1
                skips_in_a_row += 1
                events.write(
                    {"step": step + 1, "event": "skipped", "reason": spike, "data_step": data_step}
                )
                console.print(f"[yellow]{task.name}: step {step + 1} skipped: {spike}")
                no_rollback = (
                    "no checkpoint yet"
                    if not list_checkpoints(ckpt_root)
                    # An island rolled back alone would leave the others' outer steps.
                    else "an outer loop does not roll back"
                    if outer is not None
                    else None
                )
                if skips_in_a_row >= cfg.spike_max_skips and no_rollback:
                    # Nothing to roll back to: what looks like a spike is the run's new normal
                    # (early training moves fast). Judge from here on against it.
                    guard = SpikeGuard(cfg, [])
                    skips_in_a_row = 0
                    events.write({"step": step + 1, "event": "guard_reset", "reason": no_rollback})
                    continue
                if skips_in_a_row >= cfg.spike_max_skips:
                    ckpts = list_checkpoints(ckpt_root)
                    rollbacks += 1
                    if rollbacks > cfg.spike_max_rollbacks:
                        raise RuntimeError(
                            f"{task.name}: {rollbacks} rollbacks in this run and the spikes go "
                            f"on (last: {spike}); the instability is not in the data: lower "
                            f"the learning rate or raise warmup, see {events.path}"
                        )
                    state = load_checkpoint(ckpts[-1], model, optimizer)
                    back = int(state["step"])
                    first_bad = back + int(state["extra"].get("data_offset", 0))
                    data_offset = data_step + 1 - back  # resume past the offending window
                    events.write(
                        {
                            "step": step + 1,
                            "event": "rollback",
                            "to_step": back,
                            "skipped_data_steps": [first_bad, data_step],
                        }
                    )
                    console.print(
                        f"[red]{task.name}: {skips_in_a_row} spikes in a row: rolled back to step "
                        f"{back}; data steps {first_bad}-{data_step} are not trained on"
                    )
                    step, skips_in_a_row = back, 0
                    guard = SpikeGuard(cfg, history_up_to(step))
                    bar.update(job, completed=step)
                continue
            done = step + 1
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            clip_stats = qk_clip.after_step() if qk_clip is not None else {}
            guard.accept(totals["loss"], grad_norm)
            skips_in_a_row = 0
            # The expert loads of the whole global batch, as one process would have counted
            # them: the selection biases then move alike on every process.
            all_sum_(moe.load for moe in model.moe_layers())
            expert_stats = model.after_optimizer_step(lr_scale=lr / peak_lr(cfg))
            if outer is not None:
                expert_stats = {**expert_stats, **outer.after_step(done, model)}
            elapsed = time.perf_counter() - t0
            record = {
                "step": done,
                "lr": lr,
                "grad_norm": grad_norm,
                "step_s": elapsed,
                "tokens_per_s": tokens / elapsed,
                **totals,
                **expert_stats,
                **clip_stats,
            }
            if peak is not None:
                record["mfu"] = tokens * flops_per_token / elapsed / peak
            if on_gpu:
                record["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
            if watch_layers:
                record.update(layer_stats.after_step())
            if done % cfg.eval_every == 0 or done == cfg.steps:
                model.eval()
                with torch.no_grad(), autocast(device, cfg.precision):
                    evals = task.evaluate(model)
                record.update({f"val_{k}": v for k, v in evals.items()})
            log.write(record)
            speed = f"{tokens / elapsed:,.0f} tok/s"
            if "mfu" in record:
                speed += f" MFU {record['mfu']:.1%}"
            bar.update(job, completed=done, info=f"loss {totals['loss']:.4f} {speed}")
            every = cfg.checkpoint_every
            offset = outer.checkpoint_offset if outer is not None else 0
            if every and ((done > offset and (done - offset) % every == 0) or done == cfg.steps):
                extra = {"task": task.name, "data_offset": data_offset}
                # With offload, local pruning waits for each upload (the offloader prunes).
                keep = cfg.keep_checkpoints if offloader is None else 1 << 30
                saved = save_checkpoint(ckpt_root, done, model, optimizer, extra, keep)
                if offloader is not None:
                    offloader.submit(saved)
            step = done
    if qk_clip is not None:
        qk_clip.remove()
    if offloader is not None:
        offloader.close()  # every checkpoint stored (or the reason why not) before the end
    if export:
        save_model_dir(work_dir / "model", model)
    barrier()  # rank 0's last record is on disk for every process to read
    # The last record always holds the final evaluation, also when a resume found the run done.
    final = log.read()[-1]
    return {
        (k if k.startswith("val_") else f"train_{k}"): v
        for k, v in final.items()
        if k not in _PER_STEP and "." not in k
    }


# Step bookkeeping and speed, left out of the metrics a stage reports at the end.
_PER_STEP = {
    "step",
    "lr",
    "grad_norm",
    "step_s",
    "tokens_per_s",
    "mfu",
    "peak_memory_gib",
    "qk_clipped_heads",
    "qk_clip_margin",
}


def _as_floats(values: list[float | torch.Tensor]) -> list[float]:
    """Python floats, reading every device tensor among `values` in a single transfer."""
    tensors = [v for v in values if isinstance(v, torch.Tensor)]
    if not tensors:
        return [float(v) for v in values]
    read = iter(torch.stack(tensors).tolist())
    return [next(read) if isinstance(v, torch.Tensor) else float(v) for v in values]
