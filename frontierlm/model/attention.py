"""Causal self-attention with grouped-query heads (MHA when n_kv_heads == n_heads, MQA at 1).

Optional, each by config: document masking (in a packed sequence a token attends only to earlier
tokens of its own document, so packing changes no prediction), a sliding window on the layers a
pattern marks local, tanh softcapping of the attention logits (Gemma 2), a scale of the
logits other than 1/sqrt(head_dim) (Gemma 2's query_pre_attn_scalar), and an elementwise
sigmoid gate on the attention output (Qwen3-Next).

Kernels: plain causal attention goes to SDPA's fused kernels (cuDNN's first on Hopper and
newer). Masked attention is FlexAttention with a BlockMask on GPU and SDPA with a dense boolean
mask on CPU (FlexAttention has no CPU backward); softcapped attention is FlexAttention's
score_mod on GPU and an explicit softmax on CPU, since SDPA cannot cap scores.
"""

from __future__ import annotations

import contextlib
import functools

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

from frontierlm.config import ModelConfig
from frontierlm.model.kv_cache import LayerCache
from frontierlm.model.norm import RMSNorm
from frontierlm.model.rope import apply_rope

# None: plain causal. A BlockMask: FlexAttention. A bool tensor (batch or 1, 1, seq, seq): SDPA.
AttentionMask = BlockMask | torch.Tensor | None


@functools.cache
def _flex_attention(compiled: bool):
    # FlexAttention is fast only compiled (a fused kernel generated for the mask); eager is a
    # reference implementation.
    return torch.compile(flex_attention, dynamic=False) if compiled else flex_attention


def attention_mask(
    seq: int,
    doc_ids: torch.Tensor | None,
    window: int | None,
    flex: bool,
    device: torch.device,
) -> AttentionMask:
    """Causal attention, restricted to each token's document (`doc_ids`, (batch, seq)) and to
    the last `window` positions, when given. None when neither applies and `flex` is off.

    `flex` builds a BlockMask, which lets FlexAttention skip whole blocks (the GPU path);
    otherwise a dense boolean mask for SDPA."""
    if doc_ids is None and window is None and not flex:
        return None
    if flex:

        def allowed(b, h, q_idx, kv_idx):
            keep = q_idx >= kv_idx
            if doc_ids is not None:
                keep = keep & (doc_ids[b, q_idx] == doc_ids[b, kv_idx])
            if window is not None:
                keep = keep & (q_idx - kv_idx < window)
            return keep

        batch = None if doc_ids is None else doc_ids.shape[0]
        # Compiled, building the mask takes a fraction of a millisecond instead of several
        # (measured on an H100, benchmarks/RESULTS.md); CPU has no compiled path for it.
        compiled = torch.device(device).type == "cuda"
        return create_block_mask(allowed, batch, None, seq, seq, device=device, _compile=compiled)
    pos = torch.arange(seq, device=device)
    keep = pos[:, None] >= pos[None, :]
    if window is not None:
        keep = keep & (pos[:, None] - pos[None, :] < window)
    keep = keep[None]
    if doc_ids is not None:
        keep = keep & (doc_ids[:, :, None] == doc_ids[:, None, :])
    return keep[:, None]


def softcapped_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cap: float,
    mask: torch.Tensor | None,
    scale: float | None = None,
) -> torch.Tensor:
    """softmax(cap * tanh(scale * q k^T / cap)) v, the causal mask (or `mask`) applied; `scale`
    None is 1/sqrt(head_dim)."""
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = (q @ k.transpose(-1, -2)) * (q.shape[-1] ** -0.5 if scale is None else scale)
    scores = cap * torch.tanh(scores / cap)
    if mask is None:
        seq = q.shape[-2]
        mask = torch.ones(seq, seq, dtype=torch.bool, device=q.device).tril()
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores.float(), dim=-1).to(v.dtype) @ v


# On Hopper, cuDNN's fused attention ran causal fwd+bwd 1.5-1.7x faster than the
# FlashAttention-2 kernel SDPA picks by default (benchmarks/sdpa_backends.py, RESULTS.md); SDPA
# falls through the list to the next kernel for inputs one cannot take.
_GPU_CAUSAL_ORDER = [
    SDPBackend.CUDNN_ATTENTION,
    SDPBackend.FLASH_ATTENTION,
    SDPBackend.EFFICIENT_ATTENTION,
    SDPBackend.MATH,
]


def _fastest_causal_kernel(q: torch.Tensor) -> contextlib.AbstractContextManager:
    if q.is_cuda and torch.cuda.get_device_capability(q.device)[0] >= 9:
        return sdpa_kernel(_GPU_CAUSAL_ORDER, set_priority=True)
    return contextlib.nullcontext()


# FlexAttention's GPU kernel takes no head dim below 16 (torch 2.11, H100); MLA's can be smaller.
_FLEX_MIN_DIM = 16


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: AttentionMask,
    scale: float | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """softmax(q k^T * scale, capped when asked, masked) v, by the kernel the mask calls for.
    q: (batch, heads, seq, dim), k and v with as many or fewer heads (grouped-query); v may be
    narrower than q and k. `scale` None: 1/sqrt(dim), each kernel's own default."""
    gqa = q.shape[1] != k.shape[1]
    if isinstance(mask, BlockMask):
        return _flex(q, k, v, mask, scale, softcap, gqa)
    if softcap is not None:
        return softcapped_attention(q, k, v, softcap, mask, scale)
    if mask is None:
        with _fastest_causal_kernel(q):
            return F.scaled_dot_product_attention(
                q, k, v, is_causal=True, scale=scale, enable_gqa=gqa
            )
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)


def _flex(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: BlockMask | None,
    scale: float | None,
    softcap: float | None,
    gqa: bool,
    visible: torch.Tensor | None = None,
) -> torch.Tensor:
    """FlexAttention, head dims zero-padded up to what its kernel takes: zero dims add nothing
    to a score (the scale is fixed first, so it does not follow the padded width) and the
    padded value dims are cut off the output. `visible` (batch, kv_len), if given, masks keys
    per sequence inside the kernel (decode steps, where a BlockMask per step costs more than
    the attention)."""
    v_dim = v.shape[-1]
    if q.shape[-1] < _FLEX_MIN_DIM or v_dim < _FLEX_MIN_DIM:
        scale = q.shape[-1] ** -0.5 if scale is None else scale
        if q.shape[-1] < _FLEX_MIN_DIM:
            q = F.pad(q, (0, _FLEX_MIN_DIM - q.shape[-1]))
            k = F.pad(k, (0, _FLEX_MIN_DIM - k.shape[-1]))
        if v_dim < _FLEX_MIN_DIM:
            v = F.pad(v, (0, _FLEX_MIN_DIM - v_dim))
    score_mod = None
    if softcap is not None or visible is not None:

        def score_mod(score, b, h, q_idx, kv_idx):
            if softcap is not None:
                score = softcap * torch.tanh(score / softcap)
            if visible is not None:
                score = torch.where(visible[b, kv_idx], score, -float("inf"))
            return score

    # Inside a compiled region (the decode step) the plain function is what gets compiled.
    flex = flex_attention if torch.compiler.is_compiling() else _flex_attention(q.is_cuda)
    out = flex(q, k, v, score_mod=score_mod, block_mask=mask, scale=scale, enable_gqa=gqa)
    return out[..., :v_dim]


# The kernel of a compiled GPU decode step: "flex" (FlexAttention's split-KV decode kernel) or
# "sdpa" (SDPA with a boolean mask, what eager and CPU steps run); benchmarks compare the two.
DECODE_KERNEL = "flex"


def attend_cached(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    scale: float | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """One decode step's attention: q (batch, heads, 1, dim) for each sequence's new token
    against its cached keys and values (batch, kv_heads, kv_len, dim); mask (batch, 1, 1,
    kv_len) marks the positions each sequence may see. The query heads of a KV group become the
    rows of one attention, so every cached key and value is read once, not once per head."""
    batch, heads, _, dim = q.shape
    kv_heads = keys.shape[1]
    if DECODE_KERNEL == "flex" and q.is_cuda and torch.compiler.is_compiling():
        # Compiled on GPU, FlexAttention's decode kernel splits the keys over the SMs and
        # packs a KV group's query heads into one tile: the cache is read once, at close to
        # HBM speed (benchmarks/decode_attention.py), where SDPA's masked kernel wastes a
        # 64-row tile on 1-4 query rows.
        return _flex(q.to(keys.dtype), keys, values, None, scale, softcap, True, mask[:, 0, 0])
    q = q.reshape(batch, kv_heads, heads // kv_heads, dim).to(keys.dtype)
    if softcap is None:
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=scale)
    else:
        scores = (q @ keys.transpose(-1, -2)) * (dim**-0.5 if scale is None else scale)
        scores = (softcap * torch.tanh(scores.float() / softcap)).masked_fill(~mask, float("-inf"))
        out = torch.softmax(scores, dim=-1).to(values.dtype) @ values
    return out.reshape(batch, heads, 1, values.shape[-1])


class Attention(nn.Module):
    # Called as logit_observer(q, k, x, cos, sin) on the rotated queries and keys and the inputs
    # they came from, when set: training hooks (train/qk_clip.py) read the attention logits
    # there; the model never does.
    logit_observer = None
    # q, k and v weights stacked into one matrix, set only while the inference engine generates
    # (inference/packing.py): a decode step then reads them in one GEMM, which at a few rows
    # runs closer to memory speed than three small ones.
    packed_qkv: torch.Tensor | None = None

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.d_model, cfg.n_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.d_model, cfg.kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.d_model, cfg.kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.d_model, bias=False)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)
        self.qk_norm = cfg.qk_norm
        self.softcap = cfg.attn_softcap
        # None leaves each kernel its own 1/sqrt(head_dim), so default models stay bit-identical.
        self.scale = cfg.attn_scale
        if cfg.attn_gate:
            self.g_proj = nn.Linear(cfg.d_model, cfg.n_heads * cfg.head_dim, bias=False)
        self.gated = cfg.attn_gate

    def queries_and_keys(
        self, x: torch.Tensor, cos: torch.Tensor | None, sin: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The rotated queries (batch, heads, seq, dim) and keys (batch, kv_heads, seq, dim)."""
        return self._rotated_heads(self.q_proj(x), self.k_proj(x), cos, sin)

    def _rotated_heads(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        cos: torch.Tensor | None,
        sin: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Projected q (batch, seq, heads * dim) and k split into heads, normed when asked,
        rotated."""
        batch, seq, _ = q.shape
        q = q.view(batch, seq, self.n_heads, self.head_dim)
        k = k.view(batch, seq, self.n_kv_heads, self.head_dim)
        if self.qk_norm:  # bounds attention logits, so higher learning rates stay stable
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        if cos is not None:
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        return q, k

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor | None,
        sin: torch.Tensor | None,
        mask: AttentionMask = None,
        cache: LayerCache | None = None,
    ) -> torch.Tensor:
        """cos/sin None: a NoPE layer (no rotary positions). With `cache`, the keys and values
        are stored in it; in a decode step (one token per sequence) attention reads them back
        from it, under `mask` (batch, 1, 1, kv_len)."""
        batch, seq, _ = x.shape
        if self.packed_qkv is None:
            q, k = self.queries_and_keys(x, cos, sin)
            v = self.v_proj(x)
        else:
            kv_width = self.n_kv_heads * self.head_dim
            q, k, v = F.linear(x, self.packed_qkv).split(
                [self.n_heads * self.head_dim, kv_width, kv_width], dim=-1
            )
            q, k = self._rotated_heads(q, k, cos, sin)
        if self.logit_observer is not None:
            self.logit_observer(q, k, x, cos, sin)
        v = v.view(batch, seq, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if cache is None:
            out = attend(q, k, v, mask, self.scale, self.softcap)
        elif cache.decoding:
            keys, values = cache.append(k, v, mask.shape[-1])
            out = attend_cached(q, keys, values, mask, self.scale, self.softcap)
        else:  # a prompt from position 0: its own causal attention, keys and values kept
            cache.fill(k, v)
            out = attend(q, k, v, mask, self.scale, self.softcap)
        out = out.transpose(1, 2).reshape(batch, seq, -1)
        if self.gated:  # lets a head output nothing, which curbs attention sinks
            out = out * torch.sigmoid(self.g_proj(x))
        return self.o_proj(out)
