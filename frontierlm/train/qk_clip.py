"""QK-clip, the "Clip" of Kimi K2's MuonClip: keep attention logits from running away.

At a high learning rate (Muon's especially) a few heads' query and key weights can grow until
their pre-softmax logits reach the hundreds or thousands, after which the loss spikes. QK-clip
brings, right after each optimizer step, every head whose largest logit q·k * scale (S_h, over
the causally visible pairs of the step's batch) exceeds the threshold down by η_h = τ / S_h,
by rescaling its weights:

  MHA   W_q and W_k rows of head h both by sqrt(η_h).
  GQA   a key head is shared by a group of query heads, so it cannot take each head's factor:
        the key rows go by sqrt(η_min) (the group's smallest η) and each query head by
        η_h / sqrt(η_min). Every head's logits then shrink by exactly η_h, and heads under τ
        keep theirs (their queries grow as much as the shared key shrinks).
  MLA   only the head-specific parts (Kimi K2): the query's no-position part and the key's
        no-position part (from kv_b_proj) by sqrt(η_h), the query's rotated part by η_h; the
        rotated key, shared by all heads, is left alone.

Two refinements keep the logits the model produces in its training forwards within a few
percent of τ, where Kimi K2's clip (factors from the logits the forward saw, before the update)
lets each update through unclipped once (+10% per step at a high AdamW learning rate):
  - S_h is recomputed after the optimizer step: the step's attention inputs, kept from the
    forward, go through the updated projections (see `QKClip.after_step`).
  - The next forward sees another batch, whose largest logit differs (an extreme over few
    samples: ±20% between 1k-token batches, a few percent at 4k, less at pretraining sizes).
    The clip aims at τ / margin, the margin learnt from how far new batches rose above what
    the last clip left (see `QKClip._learn_margin`); it stays near 1 at large batches.

RoPE is a rotation, so scaling a projection scales its rotated output alike; the optimizer
state is not touched (as in Kimi K2). It works with any optimizer. QK-norm makes it pointless
(the norm undoes any scale on the projections), so the config refuses the pair.

The logits come from the model's own q and k through `logit_observer`, a hook the attention
modules call when it is set and this module alone sets: the model knows nothing of training.
Reading the maximum costs one more q·k^T per layer in the forward and one after the step (no
softmax, no backward, computed in query blocks so it never holds a whole seq x seq x heads
score tensor). Document masks and sliding windows are not applied to it: the maximum then
covers all causally visible pairs, which can only clip a little early. Under torchrun the maxima
are reduced (max) over the processes, so every replica or shard rescales alike; under FSDP2 the
recomputation gathers each block's weights once more per step.
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
# The margin (see QKClip._learn_margin): its log shrinks by _DECAY a step, the clip aims at
# τ / margin**_HEADROOM, and heads under _COUNTED * τ after the clip teach it nothing.
_DECAY = 0.99
_HEADROOM = 1.5
_COUNTED = 0.1


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
    """Install on a model before training (after any FSDP2 wrapping); call `begin_step` before a
    step's forward passes and `after_step` after the optimizer step. Logs `qk_max_logit.<layer>`
    and `qk_max_logit` (the largest logit the step's training forwards produced, per layer and
    overall) and `qk_clipped_heads`."""

    def __init__(self, model: nn.Module, tau: float) -> None:
        self.tau = tau
        named = [
            (name, m)
            for name, m in model.named_modules()
            if isinstance(m, (Attention, MultiHeadLatentAttention))
        ]
        if not named:
            raise ValueError("qk_clip: the model has no attention layers to clip")
        self.layers: list[nn.Module] = [m for _, m in named]
        for module in self.layers:
            if getattr(module, "qk_norm", False):
                raise ValueError(
                    "qk_clip with model.qk_norm = true: the norm undoes any rescaling of W_q/W_k "
                    "(and already bounds the logits); turn one of them off"
                )
        # Under FSDP2 a layer's weights live sharded in the FSDP unit that holds it (its
        # transformer block); `after_step` gathers them there to recompute the logits.
        self.owners = [_fsdp_owner(model, name) for name, _ in named]
        self.margin: torch.Tensor | None = None  # per layer, see _learn_margin
        self.expected: torch.Tensor | None = None
        self.begin_step()
        for index, module in enumerate(self.layers):
            module.logit_observer = self._observer(index)

    def _observer(self, index: int):
        # Eager even inside a compiled block (one graph break there): it keeps tensors in Python
        # lists, which a compiled graph cannot do without replaying side effects.
        @torch.compiler.disable
        def observe(q: torch.Tensor, k: torch.Tensor, x: torch.Tensor, cos, sin) -> None:
            # Training forwards only: evaluation runs without grad, and the recomputation of an
            # activation-checkpointed block (run inside backward) repeats a forward seen before.
            if not torch.is_grad_enabled() or torch._C._current_graph_task_id() != -1:
                return
            seen = max_logits(q.detach(), k.detach(), self.layers[index].scale)
            old = self.seen[index]
            self.seen[index] = seen if old is None else torch.maximum(old, seen)
            # The attention input is what backward keeps for the q/k projections anyway; held
            # to the step's end it costs one (tokens, d_model) tensor per layer and micro-batch
            # (under activation checkpointing, the memory of its block input again).
            kind = x.device.type
            precision = (kind, torch.is_autocast_enabled(kind), torch.get_autocast_dtype(kind))
            self.inputs[index].append((x.detach(), cos, sin, precision))

        return observe

    def remove(self) -> None:
        for module in self.layers:
            module.logit_observer = None

    def begin_step(self) -> None:
        self.seen: list[torch.Tensor | None] = [None] * len(self.layers)
        self.inputs: list[list[tuple]] = [[] for _ in self.layers]

    @torch.no_grad()
    def after_step(self) -> dict[str, float]:
        """Rescale the heads whose logits on this step's batch, recomputed with the weights the
        optimizer just updated, exceed τ / margin; the logits the step's forwards produced as
        metrics.

        Why recompute: the forward's logits are those of the weights before the update. A clip
        computed from them and applied after the update lets every update through unclipped
        once (at a high learning rate one AdamW step grows the logits ~10%, and the next
        forward overshoots τ by as much; measured: peaks of 1.25-1.33 τ). The attention inputs
        are held fixed: how the update of earlier layers moves them is left to the margin, as
        a full second forward would cost a third of the step. The cost: one more q/k
        projection and q·k^T per layer, and the inputs kept to the step's end."""
        if any(not inputs for inputs in self.inputs):
            self.begin_step()
            return {}
        seen = torch.stack(self.seen)  # (layers, heads)
        updated = torch.stack([self._updated_max(i) for i in range(len(self.layers))])
        both = torch.stack([seen, updated.to(seen.device)])
        if world().size > 1:
            dist.all_reduce(both, op=dist.ReduceOp.MAX)
        seen, updated = both
        self.begin_step()  # the inputs are not needed any more
        self._learn_margin(seen)
        target = self.tau / self.margin[:, None] ** _HEADROOM  # (layers, 1)
        eta = (target / updated.clamp(min=1e-30)).clamp(max=1.0)
        # What the clipped weights give on this step's batch: the next forward's reference.
        self.expected = updated * eta
        clipped = eta < 1
        for index in clipped.any(dim=1).nonzero().flatten().tolist():
            module = self.layers[index]
            if isinstance(module, MultiHeadLatentAttention):
                _clip_mla(module, eta[index])
            else:
                _clip_gqa(module, eta[index])
        per_layer = seen.amax(dim=1).tolist()
        record = {f"qk_max_logit.{index}": value for index, value in enumerate(per_layer)}
        record["qk_max_logit"] = max(per_layer)
        record["qk_clipped_heads"] = float(clipped.sum())
        # How far under τ the clip aimed, for the heads it clipped.
        aims = self.margin[clipped.any(dim=1)]
        record["qk_clip_margin"] = float(aims.max()) if aims.numel() else 1.0
        return record

    def _learn_margin(self, seen: torch.Tensor) -> None:
        """Per layer, how far a new batch's logits rose above those the last clip left on its
        own batch (`expected`), over the layer's heads (pooled: a head first nearing τ learns
        from the others). Two causes: the batches hold different tokens, and a batch's
        largest logit is an extreme of few samples (±20% between 1k-token batches, a few
        percent at pretraining sizes); and the update of the layers below moved the attention
        inputs, which the recomputation held fixed (fast early in training). The margin is the
        largest such ratio seen, its log decaying (halved in ~70 steps) so that one odd batch
        does not hold a head low for the rest of the run; the clip aims at τ / margin^1.5, the
        headroom for a ratio beyond any seen so far (the largest of n samples is exceeded once
        in n + 1 draws). Measured on the copy task of tests/train/test_qk_clip.py (3 seeds,
        1k- and 4k-token batches): aimed at τ / margin, peaks of 1.05-1.12 τ; at τ / margin^1.5,
        0.91-1.015 τ. Heads under 0.1 τ teach it nothing (their ratios are noise, and a head
        starting from ~0 would yield a huge one). It restarts at 1 on resume."""
        if self.expected is None:
            self.margin = torch.ones(len(self.layers), device=seen.device)
            return
        counted = self.expected >= _COUNTED * self.tau
        ratio = (seen / self.expected.clamp(min=1e-30)).masked_fill(~counted, 1.0)
        self.margin = torch.maximum(ratio.amax(dim=1).clamp(min=1.0), self.margin**_DECAY)

    def _updated_max(self, index: int) -> torch.Tensor:
        """Per head, the largest logit of this step's forwards' inputs under the current
        weights, computed as the forward computed them (same code, same autocast)."""
        module, owner = self.layers[index], self.owners[index]
        if owner is not None:
            owner.unshard()  # an all-gather on every process, layer by layer in the same order
        try:
            best = None
            for x, cos, sin, (kind, enabled, dtype) in self.inputs[index]:
                with torch.autocast(kind, dtype=dtype, enabled=enabled):
                    q, k = module.queries_and_keys(x, cos, sin)
                seen = max_logits(q, k, module.scale)
                best = seen if best is None else torch.maximum(best, seen)
        finally:
            if owner is not None:
                owner.reshard()
        return best


def _fsdp_owner(model: nn.Module, name: str) -> nn.Module | None:
    """The innermost FSDP2 unit holding module `name` (None when there is none)."""
    from torch.distributed.fsdp import FSDPModule

    owner = None
    for prefix, module in model.named_modules():  # parents before children: the last is innermost
        inside = not prefix or name == prefix or name.startswith(prefix + ".")
        if inside and isinstance(module, FSDPModule):
            owner = module
    return owner


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
