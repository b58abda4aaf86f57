"""Causal self-attention with grouped-query heads (MHA when n_kv_heads == n_heads, MQA at 1),
optionally masked to documents: in a packed sequence a token attends only to earlier tokens of
its own document, so packing changes no token's prediction."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

from frontierlm.config import ModelConfig
from frontierlm.model.norm import RMSNorm
from frontierlm.model.rope import apply_rope

# None: plain causal. A BlockMask: FlexAttention. A bool tensor (batch, 1, seq, seq): SDPA.
AttentionMask = BlockMask | torch.Tensor | None


@functools.cache
def _flex_attention(compiled: bool):
    # FlexAttention is fast only compiled (a fused kernel generated for the mask); eager is a
    # reference implementation.
    return torch.compile(flex_attention, dynamic=False) if compiled else flex_attention


def document_mask(doc_ids: torch.Tensor, flex: bool) -> AttentionMask:
    """Causal attention within documents, from per-token document ids (batch, seq).

    `flex` builds a BlockMask for FlexAttention, which skips whole blocks across documents (the
    GPU path); otherwise a dense boolean mask for SDPA (FlexAttention has no CPU backward)."""
    batch, seq = doc_ids.shape
    if flex:

        def same_doc_causal(b, h, q_idx, kv_idx):
            return (q_idx >= kv_idx) & (doc_ids[b, q_idx] == doc_ids[b, kv_idx])

        return create_block_mask(same_doc_causal, batch, None, seq, seq, device=doc_ids.device)
    causal = torch.ones(seq, seq, dtype=torch.bool, device=doc_ids.device).tril()
    same_doc = doc_ids[:, :, None] == doc_ids[:, None, :]
    return (causal & same_doc)[:, None]


class Attention(nn.Module):
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

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: AttentionMask = None
    ) -> torch.Tensor:
        batch, seq, _ = x.shape
        q = self.q_proj(x).view(batch, seq, self.n_heads, self.head_dim)
        k = self.k_proj(x).view(batch, seq, self.n_kv_heads, self.head_dim)
        if self.qk_norm:  # bounds attention logits, so higher learning rates stay stable
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        v = self.v_proj(x).view(batch, seq, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        gqa = self.n_kv_heads != self.n_heads
        if mask is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        elif isinstance(mask, BlockMask):
            out = _flex_attention(q.is_cuda)(q, k, v, block_mask=mask, enable_gqa=gqa)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        return self.o_proj(out.transpose(1, 2).reshape(batch, seq, -1))
