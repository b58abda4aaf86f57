"""Mixture of experts in the DeepSeek-V3 style: many small routed SwiGLU experts, top-k per token,
plus shared experts every token passes through.

Balancing, chosen by `ModelConfig.moe_balance`:
  "aux_loss"  Switch/GShard auxiliary loss E * sum_i f_i * P_i (f_i: share of routed slots that
              went to expert i, P_i: mean router probability of i), added to the training loss.
  "bias"      auxiliary-loss-free (DeepSeek-V3): a per-expert bias added to the scores for the
              choice only (never to the mixing weights), moved after every optimizer step by
              `rate * sign(mean load - load_i)`; no gradient flows through it.
  "smebu"     the bias step soft-clipped and smoothed: velocity = m * velocity + (1 - m) *
              rate * tanh(relative load error), bias += velocity (the SMEBU idea: no sign flip-flop
              around balance, no jump from one outlier step).
  "none"      nothing (experts may collapse: useful as the control of an ablation).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from frontierlm.config import ModelConfig
from frontierlm.model.mlp import SwiGLU


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        d, hidden, n = cfg.d_model, cfg.expert_hidden, cfg.moe_experts
        self.n_experts, self.top_k = n, cfg.moe_top_k
        self.score, self.balance = cfg.moe_score, cfg.moe_balance
        self.router = nn.Linear(d, n, bias=False)
        # Experts as stacked weights, so dispatch is a batched matmul per expert group.
        self.w_gate = nn.Parameter(torch.empty(n, d, hidden))
        self.w_up = nn.Parameter(torch.empty(n, d, hidden))
        self.w_down = nn.Parameter(torch.empty(n, hidden, d))
        self.shared = SwiGLU(d, hidden * cfg.moe_shared_experts) if cfg.moe_shared_experts else None
        # Buffers, not parameters: the optimizer never touches them.
        self.register_buffer("selection_bias", torch.zeros(n))
        self.register_buffer("load", torch.zeros(n))  # routed slots per expert since last step
        self.register_buffer("bias_velocity", torch.zeros(n))
        self.momentum = cfg.moe_bias_momentum
        self.aux_loss: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        tokens = x.reshape(-1, shape[-1])
        logits = self.router(tokens).float()
        scores = logits.softmax(-1) if self.score == "softmax" else logits.sigmoid()
        biased = self.balance in ("bias", "smebu")
        choice_scores = scores + self.selection_bias if biased else scores
        chosen = choice_scores.topk(self.top_k, dim=-1).indices  # (tokens, k)
        weights = scores.gather(-1, chosen)
        weights = weights / weights.sum(-1, keepdim=True)  # mix only the chosen experts

        counts = torch.bincount(chosen.flatten(), minlength=self.n_experts)
        if self.training:
            self.load += counts.to(self.load.dtype)
        if self.balance == "aux_loss" and self.training:
            probs = scores / scores.sum(-1, keepdim=True)
            share = counts.float() / chosen.numel()
            self.aux_loss = self.n_experts * (share * probs.mean(0)).sum()
        else:
            self.aux_loss = None

        # Group the (token, slot) pairs by expert, run each group, scatter back weighted.
        slot_expert = chosen.flatten()
        order = slot_expert.argsort(stable=True)
        slot_token = order // self.top_k
        grouped = tokens[slot_token]
        outputs = torch.empty_like(grouped)
        start = 0
        for expert, count in enumerate(counts.tolist()):
            if count:
                rows = grouped[start : start + count]
                h = F.silu(rows @ self.w_gate[expert]) * (rows @ self.w_up[expert])
                outputs[start : start + count] = h @ self.w_down[expert]
                start += count
        slot_weight = weights.flatten()[order].to(outputs.dtype)
        mixed = torch.zeros_like(tokens).index_add_(0, slot_token, outputs * slot_weight[:, None])
        out = mixed.view(shape)
        return out + self.shared(x) if self.shared is not None else out

    @torch.no_grad()
    def balance_step(self, rate: float) -> dict[str, float]:
        """After an optimizer step: report the load since the last step, move the selection
        biases when balancing by bias, and reset the count."""
        load = self.load.clone()
        mean = load.mean().clamp_min(1e-9)
        if self.balance == "bias" and load.sum() > 0:
            self.selection_bias += rate * torch.sign(mean - load)
        elif self.balance == "smebu" and load.sum() > 0:
            step = rate * torch.tanh((mean - load) / mean)
            self.bias_velocity.mul_(self.momentum).add_((1 - self.momentum) * step)
            self.selection_bias += self.bias_velocity
        self.load.zero_()
        return {"max_over_mean_load": (load.max() / mean).item()}
