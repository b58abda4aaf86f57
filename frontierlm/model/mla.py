"""Multi-head latent attention, MLA (DeepSeek-V2, DeepSeek-V3).

Each token is projected down to one small latent (`mla_kv_lora_rank` values), normalised, and
expanded per head into the position-free part of the keys and into the values. Positions enter
through a separate slice of `mla_qk_rope_head_dim` dimensions: every head has its own rotated
query slice, but the rotated key slice is a single one per token that all heads share (RoPE
cannot live in the latent, since a rotation per position would not commute with the expansion).
An inference cache therefore holds only the latent and the shared rotated key per token and
layer. Queries may go through a low-rank bottleneck of their own (`mla_q_lora_rank`).

The layout mirrors transformers' `DeepseekV3Attention` (parameter names included, so export is a
rename): the query heads are [nope | rope], the down-projection `kv_a_proj_with_mqa` yields
[latent | rope key], `kv_b_proj` yields per head [key nope | value]. RoPE is the half-split
convention of rope.py; checkpoints written for interleaved RoPE (transformers' `rope_interleave`)
are permuted into it by hf.py. Scores are scaled by 1/sqrt(qk_nope + qk_rope); under YaRN, cos and
sin carry its attention factor as in the other attention, and `yarn_mscale_all_dim` multiplies
the score scale by its squared entropy correction (DeepSeek-V3's YaRN).

Kernels as in attention.py: SDPA for plain causal and dense boolean masks, FlexAttention for a
BlockMask. Values may be narrower or wider than queries and keys; both kernels take that.
"""

from __future__ import annotations

import torch
from torch import nn

from frontierlm.config import ModelConfig
from frontierlm.model.attention import AttentionMask, attend, attend_cached
from frontierlm.model.kv_cache import LayerCache
from frontierlm.model.norm import RMSNorm
from frontierlm.model.rope import apply_rope, yarn_mscale

# DeepSeek (its reference code and transformers) builds the two latent norms with RMSNorm's
# default epsilon, whatever the model's rms_norm_eps.
LATENT_NORM_EPS = 1e-6


class MultiHeadLatentAttention(nn.Module):
    logit_observer = None  # as Attention's: a training hook on the rotated q and k

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        d, heads = cfg.d_model, cfg.n_heads
        self.n_heads = heads
        self.nope_dim, self.rope_dim = cfg.mla_qk_nope_head_dim, cfg.mla_qk_rope_head_dim
        self.v_dim, self.latent_dim = cfg.mla_v_head_dim, cfg.mla_kv_lora_rank
        self.qk_dim = cfg.qk_head_dim
        self.q_lora_rank = cfg.mla_q_lora_rank
        if self.q_lora_rank is None:
            self.q_proj = nn.Linear(d, heads * self.qk_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(d, self.q_lora_rank, bias=False)
            self.q_a_layernorm = RMSNorm(self.q_lora_rank, LATENT_NORM_EPS)
            self.q_b_proj = nn.Linear(self.q_lora_rank, heads * self.qk_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(d, self.latent_dim + self.rope_dim, bias=False)
        self.kv_a_layernorm = RMSNorm(self.latent_dim, LATENT_NORM_EPS)
        self.kv_b_proj = nn.Linear(
            self.latent_dim, heads * (self.nope_dim + self.v_dim), bias=False
        )
        self.o_proj = nn.Linear(heads * self.v_dim, d, bias=False)
        self.scale = self.qk_dim**-0.5
        if cfg.yarn_factor is not None and cfg.yarn_mscale_all_dim:
            # DeepSeek's YaRN sharpens every score, not only the rotated slices' share.
            self.scale *= yarn_mscale(cfg.yarn_factor, cfg.yarn_mscale_all_dim) ** 2

    def _project(
        self, x: torch.Tensor, cos: torch.Tensor | None, sin: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per head the query's no-position and rotated parts (batch, heads, seq, .); per
        token the normalised latent (batch, seq, latent) and the shared rotated key (batch, 1,
        seq, rope)."""
        batch, seq, _ = x.shape
        if self.q_lora_rank is None:
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.view(batch, seq, self.n_heads, self.qk_dim).transpose(1, 2)
        q_nope, q_rope = q.split([self.nope_dim, self.rope_dim], dim=-1)

        latent, k_rope = self.kv_a_proj_with_mqa(x).split([self.latent_dim, self.rope_dim], dim=-1)
        k_rope = k_rope.unsqueeze(1)  # (batch, 1, seq, rope): one rotated key for all heads
        if cos is not None:
            q_rope, k_rope = apply_rope(q_rope, cos, sin), apply_rope(k_rope, cos, sin)
        return q_nope, q_rope, self.kv_a_layernorm(latent), k_rope

    def _expand(self, latent: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The latent expanded per head into the keys' no-position part and the values."""
        batch, seq, _ = latent.shape
        kv = self.kv_b_proj(latent)
        kv = kv.view(batch, seq, self.n_heads, self.nope_dim + self.v_dim).transpose(1, 2)
        k_nope, v = kv.split([self.nope_dim, self.v_dim], dim=-1)
        return k_nope, v

    def _join(
        self, q_nope: torch.Tensor, q_rope: torch.Tensor, k_nope: torch.Tensor, k_rope: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        q = torch.cat([q_nope, q_rope], dim=-1)
        k = torch.cat([k_nope, k_rope.expand(-1, self.n_heads, -1, -1)], dim=-1)
        return q, k

    def queries_and_keys(
        self, x: torch.Tensor, cos: torch.Tensor | None, sin: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The full queries and keys (batch, heads, seq, nope + rope), as attention uses them."""
        q_nope, q_rope, latent, k_rope = self._project(x, cos, sin)
        return self._join(q_nope, q_rope, self._expand(latent)[0], k_rope)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor | None,
        sin: torch.Tensor | None,
        mask: AttentionMask = None,
        cache: LayerCache | None = None,
    ) -> torch.Tensor:
        """cos/sin None: a NoPE layer (the rope slices stay unrotated). With `cache`, the
        normalised latent and the rotated key are stored in it, and a decode step attends in
        the latent space (see `_decode`)."""
        batch, seq, _ = x.shape
        q_nope, q_rope, latent, k_rope = self._project(x, cos, sin)
        if cache is not None:
            entry = torch.cat([latent.unsqueeze(1).to(k_rope.dtype), k_rope], dim=-1)
            if cache.decoding:
                return self._decode(q_nope, q_rope, cache, entry, mask)
            cache.fill(entry)
        k_nope, v = self._expand(latent)
        q, k = self._join(q_nope, q_rope, k_nope, k_rope)
        if self.logit_observer is not None:
            self.logit_observer(q, k, x, cos, sin)
        out = attend(q, k, v, mask, self.scale)
        return self.o_proj(out.transpose(1, 2).reshape(batch, seq, self.n_heads * self.v_dim))

    def _decode(
        self,
        q_nope: torch.Tensor,
        q_rope: torch.Tensor,
        cache: LayerCache,
        entry: torch.Tensor,
        mask: torch.Tensor,
    ) -> torch.Tensor:
        """One token per sequence, attending over cached latents without expanding them: the
        key expansion is folded into the query (q_nope W_k . latent = q_nope . W_k latent) and
        the value expansion applied once to the attention-weighted latent, so the step reads
        latent + rope values per cached token for all heads together (MQA over the latent)."""
        batch = q_nope.shape[0]
        cached, _ = cache.append(entry, None, mask.shape[-1])  # (batch, 1, kv_len, latent+rope)
        w = self.kv_b_proj.weight.view(self.n_heads, self.nope_dim + self.v_dim, self.latent_dim)
        w_k, w_v = w.split([self.nope_dim, self.v_dim], dim=1)
        q_latent = torch.einsum("bhqn,hnl->bhql", q_nope, w_k.to(q_nope.dtype))
        q = torch.cat([q_latent, q_rope.to(q_latent.dtype)], dim=-1)
        out = attend_cached(q, cached, cached[..., : self.latent_dim], mask, self.scale)
        out = torch.einsum("bhql,hvl->bhqv", out, w_v.to(out.dtype))
        return self.o_proj(out.transpose(1, 2).reshape(batch, 1, self.n_heads * self.v_dim))
