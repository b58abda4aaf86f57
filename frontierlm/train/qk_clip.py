"""QK-clip, the "Clip" of Kimi K2's MuonClip: keep attention logits from running away.

At a high learning rate (Muon's especially) a few heads' query and key weights can grow until
their pre-softmax logits reach the hundreds or thousands, after which the loss spikes. QK-clip
watches, per attention head, the largest logit q·k * scale the step's forward passes produced
(S_h, over the causally visible pairs) and, right after the optimizer step, shrinks the heads
over the threshold τ by η_h = τ / S_h, by rescaling their weights:

  MHA   W_q and W_k rows of head h both by sqrt(η_h).
  GQA   a key head is shared by a group of query heads, so it cannot take each head's factor:
        the key rows go by sqrt(η_min) (the group's smallest η) and each query head by
        η_h / sqrt(η_min). Every head's logits then shrink by exactly η_h, and heads under τ
        keep theirs (their queries grow as much as the shared key shrinks).
  MLA   only the head-specific parts (Kimi K2): the query's no-position part and the key's
        no-position part (from kv_b_proj) by sqrt(η_h), the query's rotated part by η_h; the
        rotated key, shared by all heads, is left alone.

RoPE is a rotation, so scaling a projection scales its rotated output alike; the optimizer
state is not touched (as in Kimi K2). It works with any optimizer. QK-norm makes it pointless
(the norm undoes any scale on the projections), so the config refuses the pair.

The logits come from the model's own q and k through `logit_observer`, a hook the attention
modules call when it is set and this module alone sets: the model knows nothing of training.
Reading the maximum costs one more q·k^T per layer (no softmax, no backward, computed in query
blocks so it never holds a whole seq x seq x heads score tensor). Document masks and sliding
windows are not applied to it: the maximum then covers all causally visible pairs, which can
only clip a little early. Under torchrun the maxima are reduced (max) over the processes, so
every replica or shard rescales alike.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn

from frontierlm.model.attention import Attention
from frontierlm.model.mla import MultiHeadLatentAttention
from frontierlm.train.parallel import world

# Scores per block of queries: bounds the observer's extra memory to ~256 MiB in fp32.
_BLOCK_ELEMENTS = 1 << 26


@torch.no_grad()
def max_logits(q: torch.Tensor, k: torch.Tensor, scale: float | None) -> torch.Tensor:
    """Per query head, the largest q·k * scale over causally visible pairs. q: (batch, heads,
    seq, dim), k: (batch, kv_heads, seq, dim) with kv_heads dividing heads."""
    batch, heads, seq, dim = q.shape
    scale = dim**-0.5 if scale is None else scale
    groups = heads // k.shape[1]
    if groups > 1:
        k = k.repeat_interleave(groups, dim=1)
    q, k = q.float(), k.float()
    rows = max(1, min(seq, _BLOCK_ELEMENTS // max(1, batch * heads * seq)))
    best = torch.full((heads,), -math.inf, device=q.device)
    keys = torch.arange(seq, device=q.device)
    for start in range(0, seq, rows):
        stop = min(seq, start + rows)
        scores = q[:, :, start:stop] @ k.transpose(-1, -2)  # (batch, heads, rows, seq)
        visible = keys[None, :] <= torch.arange(start, stop, device=q.device)[:, None]
        scores = scores.masked_fill(~visible, -math.inf)
        best = torch.maximum(best, scores.amax(dim=(0, 2, 3)) * scale)
    return best


def _scale_rows_(weight: torch.Tensor, row_scale: torch.Tensor) -> None:
    """weight[i, :] *= row_scale[i], also for an FSDP2 parameter (a DTensor sharded by rows:
    each process scales its own rows)."""
    from torch.distributed.tensor import DTensor  # see parallel.apply_fsdp

    if isinstance(weight, DTensor):
        local = weight.to_local()
        mesh = weight.device_mesh
        # FSDP2 cuts dim 0 as torch.chunk does (the last shards may be short or empty).
        chunks = row_scale.chunk(mesh.size())
        mine = chunks[mesh.get_local_rank()] if mesh.get_local_rank() < len(chunks) else None
        if mine is not None and local.shape[0]:
            local.mul_(mine[: local.shape[0], None].to(local.dtype))
        return
    weight.mul_(row_scale[:, None].to(weight.dtype))


class QKClip:
    """Install on a model before training; call `begin_step` before a step's forward passes and
    `after_step` after the optimizer step. Logs `qk_max_logit.<layer>` (the step's largest
    logit in the layer, before clipping) and `qk_clipped_heads`."""

    def __init__(self, model: nn.Module, tau: float) -> None:
        self.tau = tau
        self.layers: list[nn.Module] = [
            m for m in model.modules() if isinstance(m, (Attention, MultiHeadLatentAttention))
        ]
        if not self.layers:
            raise ValueError("qk_clip: the model has no attention layers to clip")
        for module in self.layers:
            if getattr(module, "qk_norm", False):
                raise ValueError(
                    "qk_clip with model.qk_norm = true: the norm undoes any rescaling of W_q/W_k "
                    "(and already bounds the logits); turn one of them off"
                )
        self.maxima: list[torch.Tensor | None] = [None] * len(self.layers)
        for index, module in enumerate(self.layers):
            module.logit_observer = self._observer(index)

    def _observer(self, index: int):
        def observe(q: torch.Tensor, k: torch.Tensor, scale: float | None) -> None:
            # Training forwards only (recomputed ones included); evaluation runs without grad.
            if not torch.is_grad_enabled():
                return
            seen = max_logits(q.detach(), k.detach(), scale)
            old = self.maxima[index]
            self.maxima[index] = seen if old is None else torch.maximum(old, seen)

        return observe

    def remove(self) -> None:
        for module in self.layers:
            module.logit_observer = None

    def begin_step(self) -> None:
        self.maxima = [None] * len(self.layers)

    @torch.no_grad()
    def after_step(self) -> dict[str, float]:
        """Rescale the heads whose logits exceeded τ in this step; the step's maxima as metrics."""
        if any(m is None for m in self.maxima):
            return {}
        stacked = torch.stack(self.maxima)  # (layers, heads)
        if world().size > 1:
            dist.all_reduce(stacked, op=dist.ReduceOp.MAX)
        record: dict[str, float] = {}
        clipped = 0
        per_layer = stacked.amax(dim=1).tolist()
        for index, (module, head_max) in enumerate(zip(self.layers, stacked, strict=True)):
            record[f"qk_max_logit.{index}"] = per_layer[index]
            eta = (self.tau / head_max.clamp(min=1e-30)).clamp(max=1.0)
            if bool((eta < 1).any()):
                clipped += int((eta < 1).sum())
                if isinstance(module, MultiHeadLatentAttention):
                    _clip_mla(module, eta)
                else:
                    _clip_gqa(module, eta)
        record["qk_max_logit"] = max(per_layer)
        record["qk_clipped_heads"] = float(clipped)
        return record


def _clip_gqa(module: Attention, eta: torch.Tensor) -> None:
    heads, kv_heads, dim = module.n_heads, module.n_kv_heads, module.head_dim
    eta_min = eta.view(kv_heads, heads // kv_heads).amin(dim=1)  # per key head
    key_scale = eta_min.sqrt()
    query_scale = eta / key_scale.repeat_interleave(heads // kv_heads)
    _scale_rows_(module.q_proj.weight, query_scale.repeat_interleave(dim))
    _scale_rows_(module.k_proj.weight, key_scale.repeat_interleave(dim))


def _clip_mla(module: MultiHeadLatentAttention, eta: torch.Tensor) -> None:
    nope, rope, v_dim = module.nope_dim, module.rope_dim, module.v_dim
    root = eta.sqrt()
    # Query rows per head: [nope | rope]; kv_b_proj rows per head: [key nope | value].
    query = torch.cat([root[:, None].expand(-1, nope), eta[:, None].expand(-1, rope)], dim=1)
    q_weight = module.q_proj.weight if module.q_lora_rank is None else module.q_b_proj.weight
    _scale_rows_(q_weight, query.reshape(-1))
    ones = torch.ones_like(eta)
    kv = torch.cat([root[:, None].expand(-1, nope), ones[:, None].expand(-1, v_dim)], dim=1)
    _scale_rows_(module.kv_b_proj.weight, kv.reshape(-1))
