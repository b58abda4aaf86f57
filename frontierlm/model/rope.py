"""Rotary position embedding, in the half-split layout of Llama (and transformers), with YaRN
scaling for context extension (Peng et al. 2023)."""

from __future__ import annotations

import math

import torch

from frontierlm.config import ModelConfig


def yarn_frequencies(
    head_dim: int,
    theta: float,
    factor: float,
    original_max_len: int,
    beta_fast: float = 32.0,
    beta_slow: float = 1.0,
    mscale: float | None = None,
    mscale_all_dim: float | None = None,
) -> tuple[torch.Tensor, float]:
    """YaRN's "NTK-by-parts" inverse frequencies and attention factor.

    Dimensions that turn more than `beta_fast` times over the original context keep their
    frequency (extrapolation), those turning fewer than `beta_slow` times are divided by
    `factor` (interpolation), with a linear ramp between; cos and sin are then scaled by
    0.1 ln(factor) + 1 to restore the attention entropy, or, given both `mscale` and
    `mscale_all_dim` (DeepSeek's spelling), by yarn_mscale(factor, mscale) /
    yarn_mscale(factor, mscale_all_dim), as transformers does."""
    base = theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    extrapolated, interpolated = 1.0 / base, 1.0 / (factor * base)

    def dim_turning(rotations: float) -> float:  # the dimension index that turns that often
        return (head_dim * math.log(original_max_len / (rotations * 2 * math.pi))) / (
            2 * math.log(theta)
        )

    low = max(math.floor(dim_turning(beta_fast)), 0)
    high = min(math.ceil(dim_turning(beta_slow)), head_dim - 1)
    span = (high - low) or 0.001  # equal bounds: a step, not a division by zero
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float32) - low) / span).clamp(0, 1)
    keep = 1.0 - ramp  # 1: extrapolate (fast dimensions), 0: interpolate (slow ones)
    inv_freq = interpolated * (1.0 - keep) + extrapolated * keep
    if mscale and mscale_all_dim:
        attention_factor = yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim)
    else:
        attention_factor = yarn_mscale(factor)
    return inv_freq, attention_factor


def yarn_mscale(factor: float, coefficient: float = 1.0) -> float:
    """YaRN's entropy correction 0.1 * coefficient * ln(factor) + 1 (1 without extension)."""
    return 0.1 * coefficient * math.log(factor) + 1.0 if factor > 1 else 1.0


def rope_tables(cfg: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of shape (max_seq_len, rope_dim), in float32 whatever the model dtype."""
    if cfg.yarn_factor is None:
        steps = torch.arange(0, cfg.rope_dim, 2, dtype=torch.float32) / cfg.rope_dim
        inv_freq, scale = 1.0 / cfg.rope_theta**steps, 1.0
    else:
        inv_freq, scale = yarn_frequencies(
            cfg.rope_dim,
            cfg.rope_theta,
            cfg.yarn_factor,
            cfg.yarn_original_max_len,
            cfg.yarn_beta_fast,
            cfg.yarn_beta_slow,
            cfg.yarn_mscale,
            cfg.yarn_mscale_all_dim,
        )
    angles = torch.outer(torch.arange(cfg.max_seq_len, dtype=torch.float32), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos() * scale, angles.sin() * scale


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (batch, heads, seq, head_dim); cos/sin: (seq, head_dim)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)
