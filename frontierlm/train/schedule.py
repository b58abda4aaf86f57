"""Learning-rate schedules as pure functions of the step, so a resumed run needs no state.

"cosine": linear warmup to the peak, cosine decay to `peak * min_lr_ratio` at the last step.
"wsd":    warmup-stable-decay (Hu et al. 2024, MiniCPM): linear warmup, the peak held, then a
          decay over the last `decay_fraction` of the steps to the floor, linear or "1-sqrt"
          (Hägele et al. 2024), so a run can branch off its stable phase into a short decay.

The peak is `lr`, optionally scaled with the batch size (`lr_batch_scaling`): "sqrt" for Adam-type
optimizers (Malladi et al. 2022), "linear" for SGD-like ones (Goyal et al. 2017), against
`lr_reference_batch_tokens`, the batch the `lr` was tuned at. `batch_size` is the global batch
(torchrun splits it over the processes), so the schedule does not depend on the process count.
"""

from __future__ import annotations

import math

from frontierlm.config import LoopConfig


def batch_tokens(cfg: LoopConfig) -> int:
    """Tokens per optimizer step over all processes."""
    return cfg.batch_size * cfg.grad_accum * cfg.seq_len


def peak_lr(cfg: LoopConfig) -> float:
    if cfg.lr_batch_scaling == "none":
        return cfg.lr
    ratio = batch_tokens(cfg) / cfg.lr_reference_batch_tokens
    return cfg.lr * (math.sqrt(ratio) if cfg.lr_batch_scaling == "sqrt" else ratio)


def lr_at(step: int, cfg: LoopConfig) -> float:
    peak = peak_lr(cfg)
    if step < cfg.warmup_steps:
        return peak * (step + 1) / cfg.warmup_steps
    floor = peak * cfg.min_lr_ratio
    last = cfg.steps - 1
    if cfg.schedule == "cosine":
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, last - cfg.warmup_steps))
        return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    decay_steps = max(1, round(cfg.decay_fraction * cfg.steps))
    decay_start = max(cfg.warmup_steps, cfg.steps - decay_steps)
    if step < decay_start:
        return peak
    progress = min(1.0, (step - decay_start + 1) / max(1, last - decay_start + 1))
    shape = progress if cfg.decay_shape == "linear" else math.sqrt(progress)
    return peak - (peak - floor) * shape
