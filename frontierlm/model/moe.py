"""Mixture of experts in the DeepSeek-V3 style: many small routed SwiGLU experts, top-k per token,
plus shared experts every token passes through.

Routing: softmax or sigmoid scores (`moe_score`); the top-k by score (plus the selection bias,
when balancing by bias) are chosen, optionally only within each token's best groups of experts
(`moe_groups`, DeepSeek-V3); their unbiased scores, renormalised to sum to 1 unless
`moe_norm_topk` is off and times `moe_routed_scale`, weight the experts' outputs.

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

Independently of these, `moe_seq_aux_weight` adds DeepSeek-V3's sequence-wise balance loss (the
same product of selection share and mean probability, computed per sequence and averaged), a
small guard against one sequence flooding an expert even while the batch as a whole is balanced.

The experts run as two grouped matmuls over the (token, slot) pairs sorted by expert
(`torch.nn.functional.grouped_mm`, one kernel for all experts on GPU), with no host sync: the
group offsets stay on the device.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from frontierlm.config import ModelConfig
from frontierlm.model.mlp import SwiGLU

# Public in torch 2.13; torch 2.11 has the same operator under its private name.
_grouped_mm = getattr(F, "grouped_mm", None) or torch._grouped_mm


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype autocast would run a matmul on `x` in (grouped_mm is not on autocast's lists)."""
    device = x.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return x.dtype


def grouped_swiglu(
    rows: torch.Tensor,
    offsets: torch.Tensor,
    row_weights: torch.Tensor,
    gate_up: torch.Tensor,
    down: torch.Tensor,
) -> torch.Tensor:
    """SwiGLU experts over `rows` sorted by expert (expert e owns rows offsets[e-1]:offsets[e]),
    each output row scaled by its weight. gate_up: (experts, 2 * hidden, d), down: (experts, d,
    hidden), as nn.Linear stores them."""
    dtype = rows.dtype
    gate, up = _grouped_mm(rows, gate_up.to(dtype).transpose(-2, -1), offs=offsets).chunk(2, -1)
    # The weight scales the hidden rows rather than the outputs: the same by linearity of the
    # down projection, on a narrower tensor.
    hidden = F.silu(gate) * up * row_weights[:, None].to(dtype)
    return _grouped_mm(hidden, down.to(dtype).transpose(-2, -1), offs=offsets)


LOAD_WINDOW = 20  # steps over which the windowed expert-load metric is taken


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        d, hidden, n = cfg.d_model, cfg.expert_hidden, cfg.moe_experts
        self.n_experts, self.top_k = n, cfg.moe_top_k
        self.score, self.balance = cfg.moe_score, cfg.moe_balance
        self.norm_topk, self.routed_scale = cfg.moe_norm_topk, cfg.moe_routed_scale
        self.groups, self.topk_groups = cfg.moe_groups, cfg.moe_topk_groups
        self.router = nn.Linear(d, n, bias=False)
        # Experts as stacked (out, in) weights, gate and up fused: one grouped matmul each way.
        # The layout is transformers 5's in memory (Qwen3-MoE, DeepSeek-V3); checkpoints on disk
        # hold one matrix per expert, which hf.py splits and fuses.
        self.gate_up_proj = nn.Parameter(torch.empty(n, 2 * hidden, d))
        self.down_proj = nn.Parameter(torch.empty(n, d, hidden))
        self.shared = SwiGLU(d, hidden * cfg.moe_shared_experts) if cfg.moe_shared_experts else None
        # Buffers, not parameters: the optimizer never touches them.
        self.register_buffer("selection_bias", torch.zeros(n))
        self.register_buffer("load", torch.zeros(n))  # routed slots per expert since last step
        # The same count for evaluation forwards: balance on held-out data, as DeepSeek-V3
        # reports it, without the noise of one training batch's mix of domains.
        self.register_buffer("eval_load", torch.zeros(n), persistent=False)
        # The loads of the last LOAD_WINDOW steps: balance over a window of batches, which one
        # small batch (a few documents, often of one domain) says little about.
        self.register_buffer("recent_load", torch.zeros(LOAD_WINDOW, n), persistent=False)
        self.steps = 0
        self.register_buffer("bias_velocity", torch.zeros(n))
        self.momentum = cfg.moe_bias_momentum
        self.aux_weight = cfg.moe_aux_weight
        self.seq_aux_weight = cfg.moe_seq_aux_weight
        self.aux_loss: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        tokens = x.reshape(-1, shape[-1])
        # The router in float32 even under autocast: near-tied bf16 scores flip expert choices,
        # and the matmul is tiny (d_model x n_experts). Called as a module, so a wrapper that
        # manages its weight (FSDP2 keeps it fp32 apart from bf16 blocks) sees the call.
        with torch.autocast(x.device.type, enabled=False):
            logits = self.router(tokens.float())
        scores = logits.softmax(-1) if self.score == "softmax" else logits.sigmoid()
        biased = self.balance in ("bias", "smebu")
        choice_scores = scores + self.selection_bias if biased else scores
        if self.groups > 1:
            choice_scores = self._within_best_groups(choice_scores)
        chosen = choice_scores.topk(self.top_k, dim=-1).indices  # (tokens, k)
        weights = scores.gather(-1, chosen)
        if self.norm_topk:  # mix only the chosen experts, as if the others did not exist
            weights = weights / weights.sum(-1, keepdim=True)
        if self.routed_scale != 1.0:
            weights = weights * self.routed_scale

        # Static shapes throughout (no bincount, no one_hot): compiles without graph breaks.
        counts = torch.zeros(self.n_experts, dtype=torch.long, device=x.device)
        counts.index_add_(0, chosen.flatten(), torch.ones_like(chosen.flatten()))
        if self.training:
            self.load += counts.to(self.load.dtype)
        else:
            self.eval_load += counts.to(self.eval_load.dtype)
        self.aux_loss = self._balance_loss(scores, chosen, counts, shape) if self.training else None

        # Sort the (token, slot) pairs by expert, run every expert in one grouped matmul, put
        # the outputs back in (token, slot) order and sum each token's slots: a gather and a
        # reduction, no atomics, and the sum accumulates in float32 even on bf16 outputs.
        order = chosen.flatten().argsort(stable=True)
        rows = tokens.to(_compute_dtype(tokens))[order // self.top_k]
        offsets = counts.cumsum(0).to(torch.int32)
        outputs = grouped_swiglu(
            rows, offsets, weights.flatten()[order], self.gate_up_proj, self.down_proj
        )
        unsort = torch.empty_like(order).scatter_(
            0, order, torch.arange(order.numel(), device=order.device)
        )
        mixed = outputs[unsort].view(-1, self.top_k, shape[-1]).sum(1)
        out = mixed.view(shape)
        return out + self.shared(x) if self.shared is not None else out

    def _within_best_groups(self, choice_scores: torch.Tensor) -> torch.Tensor:
        """DeepSeek-V3's group-limited routing: each group of experts scores the sum of its two
        best choice scores; outside a token's `topk_groups` best groups, scores become -inf.
        (Experts grouped by device keep a token's traffic to few devices.)"""
        tokens = choice_scores.shape[0]
        grouped = choice_scores.view(tokens, self.groups, -1)
        group_scores = grouped.topk(2, dim=-1).values.sum(-1)  # (tokens, groups)
        best = group_scores.topk(self.topk_groups, dim=-1).indices
        keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, best, True)
        return grouped.masked_fill(~keep[..., None], float("-inf")).view(tokens, -1)

    def _balance_loss(
        self,
        scores: torch.Tensor,
        chosen: torch.Tensor,
        counts: torch.Tensor,
        shape: torch.Size,
    ) -> torch.Tensor | None:
        """The weighted sum of the balance losses this layer was asked for, or None.

        Both are n_experts * sum_i f_i * P_i (f_i: share of the routed slots that chose i, P_i:
        mean normalised score of i), 1 when balanced and n_experts / top_k at full collapse;
        the batch-wise one over all tokens, the sequence-wise one per sequence, then averaged."""
        probs = scores / scores.sum(-1, keepdim=True)
        loss = None
        if self.balance == "aux_loss" and self.aux_weight > 0:
            share = counts.float() / chosen.numel()
            loss = self.aux_weight * self.n_experts * (share * probs.mean(0)).sum()
        if self.seq_aux_weight > 0 and len(shape) == 3:
            batch, seq = shape[0], shape[1]
            picked = torch.zeros_like(scores).scatter_(1, chosen, 1.0).view(batch, seq, -1)
            share = picked.mean(1) / self.top_k  # (batch, experts)
            seq_loss = self.n_experts * (share * probs.view(batch, seq, -1).mean(1)).sum(-1)
            seq_loss = self.seq_aux_weight * seq_loss.mean()
            loss = seq_loss if loss is None else loss + seq_loss
        return loss

    @torch.no_grad()
    def balance_step(self, rate: float) -> dict[str, float]:
        """After an optimizer step: report the max/mean load of the last step and of the last
        LOAD_WINDOW steps together, move the selection biases when balancing by bias, and reset
        the count."""
        load = self.load.clone()
        self.recent_load[self.steps % LOAD_WINDOW] = load
        self.steps += 1
        window = self.recent_load.sum(0)
        mean = load.mean().clamp_min(1e-9)
        if self.balance == "bias" and load.sum() > 0:
            self.selection_bias += rate * torch.sign(mean - load)
        elif self.balance == "smebu" and load.sum() > 0:
            step = rate * torch.tanh((mean - load) / mean)
            self.bias_velocity.mul_(self.momentum).add_((1 - self.momentum) * step)
            self.selection_bias += self.bias_velocity
        self.load.zero_()
        window_ratio = window.max() / window.mean().clamp_min(1e-9)
        return {
            "max_over_mean_load": (load.max() / mean).item(),
            f"max_over_mean_load_{LOAD_WINDOW}steps": window_ratio.item(),
        }
