"""The mathematics of RL post-training: advantages, KL estimators, clipped policy losses in
TRL 1.16's four aggregations, DAPO's reward shaping, and PPO's GAE and clipped value loss.

All functions take per-token tensors laid out (rows, tokens) with a 0/1 `mask` marking the
completion tokens a row is trained on; they are pure, so `tests/reference/test_grpo_loss.py`
checks them against TRL's own `_compute_loss` and the unit tests against hand computations.
"""

from __future__ import annotations

import torch

LOSS_TYPES = ("grpo", "dr_grpo", "dapo", "bnpo")


def group_advantages(rewards: torch.Tensor, group_size: int, scale: str = "group") -> torch.Tensor:
    """GRPO's advantages as TRL computes them: reward minus the mean of its group of
    `group_size` completions of the same prompt (rows are grouped consecutively), divided by the
    group's (unbiased) std + 1e-4 (`scale="group"`), the batch's std (`"batch"`) or nothing
    (`"none"`, Dr. GRPO)."""
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not form groups of {group_size}")
    grouped = rewards.view(-1, group_size)
    centred = (grouped - grouped.mean(dim=1, keepdim=True)).reshape(-1)
    if scale == "none":
        return centred
    if scale == "group":
        std = grouped.std(dim=1) if group_size > 1 else torch.zeros(len(grouped))
        return centred / (std.repeat_interleave(group_size) + 1e-4)
    if scale == "batch":
        std = rewards.std() if rewards.numel() > 1 else rewards.new_zeros(())
        return centred / (std + 1e-4)
    raise ValueError(f"scale_rewards must be 'group', 'batch' or 'none', not {scale!r}")


def informative_groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """DAPO's dynamic-sampling filter: True for each group whose rewards are not all equal (an
    all-correct or all-wrong group has zero advantage everywhere and teaches nothing)."""
    grouped = rewards.view(-1, group_size)
    return (grouped.max(dim=1).values - grouped.min(dim=1).values) > 0


def k3_kl(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """Schulman's k3 estimator of KL(policy || reference) per token, for tokens sampled from the
    policy: exp(r) - r - 1 with r = log ref - log policy; unbiased and never negative."""
    delta = ref_logps - logps
    return torch.exp(delta) - delta - 1


def overlong_penalty(lengths: torch.Tensor, max_length: int, buffer: int) -> torch.Tensor:
    """DAPO's soft overlong punishment: 0 up to `max_length - buffer` tokens, then falling
    linearly to -1 at `max_length` (and -1 beyond)."""
    if buffer <= 0:
        return torch.zeros_like(lengths, dtype=torch.float32)
    start = max_length - buffer
    penalty = (start - lengths.float()) / buffer
    return penalty.clamp(min=-1.0, max=0.0)


def clipped_policy_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    loss_type: str = "dapo",
    epsilon_low: float = 0.2,
    epsilon_high: float | None = None,
    beta: float = 0.0,
    ref_logps: torch.Tensor | None = None,
    max_completion_length: int | None = None,
    num_items: torch.Tensor | float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO's clipped surrogate with GRPO's aggregations, TRL 1.16 `_compute_loss` token-level:

    ratio = exp(logps - old_logps) (old_logps None: the rollout policy is this one, ratio 1 with
    the gradient of logps, as TRL does with one optimisation pass); per-token loss
    -min(ratio * A, clip(ratio, 1 - eps_low, 1 + eps_high) * A) + beta * k3 KL; aggregated by
      grpo:    mean over each sequence's tokens, then mean over sequences;
      bnpo:    mean over all tokens of the batch;
      dr_grpo: sum over tokens / (sequences * max_completion_length), a constant;
      dapo:    sum over tokens / `num_items` (the tokens of the whole rollout batch; default:
               this batch's), i.e. token-level over the generation batch.
    `advantages` is (rows,) for one per sequence (GRPO) or (rows, tokens) (PPO's GAE).
    Returns the loss and detached statistics (KL, clip fractions)."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"rl.loss_type must be one of {LOSS_TYPES}, not {loss_type!r}")
    epsilon_high = epsilon_low if epsilon_high is None else epsilon_high
    mask = mask.to(logps.dtype)
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(1)
    old = logps.detach() if old_logps is None else old_logps
    ratio = torch.exp(logps - old)
    clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
    per_token = -torch.min(ratio * advantages, clipped * advantages)
    stats: dict[str, torch.Tensor] = {}
    if beta != 0.0:
        if ref_logps is None:
            raise ValueError("beta > 0 needs the reference model's log-probs")
        kl = k3_kl(logps, ref_logps)
        per_token = per_token + beta * kl
        stats["kl"] = _masked_mean(kl, mask).detach()
    if loss_type == "grpo":
        loss = ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    elif loss_type == "bnpo":
        loss = (per_token * mask).sum() / mask.sum().clamp(min=1.0)
    elif loss_type == "dr_grpo":
        if max_completion_length is None:
            raise ValueError("dr_grpo divides by the max completion length: pass it")
        loss = (per_token * mask).sum() / (per_token.size(0) * max_completion_length)
    else:
        total = mask.sum() if num_items is None else torch.as_tensor(num_items, dtype=mask.dtype)
        loss = (per_token * mask).sum() / total.clamp(min=1.0)
    low = ((ratio < 1 - epsilon_low) & (advantages < 0)).to(mask.dtype)
    high = ((ratio > 1 + epsilon_high) & (advantages > 0)).to(mask.dtype)
    stats["clip_low"] = _masked_mean(low, mask).detach()
    stats["clip_high"] = _masked_mean(high, mask).detach()
    stats["clip_fraction"] = stats["clip_low"] + stats["clip_high"]
    return loss, stats


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (values * mask).sum() / mask.sum().clamp(min=1.0)


def token_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy in nats of each position's next-token distribution."""
    logp = logits.float().log_softmax(-1)
    return -(logp.exp() * logp).sum(-1)


# ----------------------------------------------------------------------------- PPO


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016) over each row's masked tokens:
    delta_t = r_t + gamma V_{t+1} - V_t, A_t = delta_t + gamma lam A_{t+1}, the value after the
    last token 0 (the episode ends). Tokens outside `mask` are skipped: the next token of t is
    the next masked one. Returns (advantages, returns = advantages + values), 0 off the mask."""
    rows, length = rewards.shape
    mask = mask.to(rewards.dtype)
    advantages = torch.zeros_like(rewards)
    next_value = torch.zeros(rows, dtype=rewards.dtype)
    next_advantage = torch.zeros(rows, dtype=rewards.dtype)
    for t in reversed(range(length)):
        m = mask[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        a = delta + gamma * lam * next_advantage
        advantages[:, t] = a * m
        # Off the mask, carry the successor's value and advantage through unchanged.
        next_value = torch.where(m > 0, values[:, t], next_value)
        next_advantage = torch.where(m > 0, a, next_advantage)
    return advantages, (advantages + values) * mask


def whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """Normalise to unit variance (and zero mean) over the masked entries, as TRL's PPO does."""
    mask = mask.to(values.dtype)
    mean = _masked_mean(values, mask)
    var = _masked_mean((values - mean) ** 2, mask)
    out = (values - mean) * torch.rsqrt(var + 1e-8)
    return (out if shift_mean else out + mean) * mask


def clipped_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's value loss: 0.5 * max((V - R)^2, (clip(V, V_old - c, V_old + c) - R)^2), masked
    mean; returns (loss, fraction of tokens where the clipped term won)."""
    mask = mask.to(values.dtype)
    clipped = old_values + (values - old_values).clamp(-clip, clip)
    unclipped_loss = (values - returns) ** 2
    clipped_loss = (clipped - returns) ** 2
    loss = 0.5 * _masked_mean(torch.max(unclipped_loss, clipped_loss), mask)
    fraction = _masked_mean((clipped_loss > unclipped_loss).to(mask.dtype), mask)
    return loss, fraction.detach()
