"""A Llama-style decoder: pre-norm RMSNorm blocks of GQA attention and SwiGLU, RoPE positions.

Parameter names follow transformers' `LlamaForCausalLM` (without its `model.` prefix), so
export is a rename. The module knows nothing of devices, precision or parallelism.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from frontierlm.config import ModelConfig
from frontierlm.model.attention import Attention, AttentionMask, attention_mask
from frontierlm.model.kv_cache import KVCache, LayerCache
from frontierlm.model.mla import MultiHeadLatentAttention
from frontierlm.model.mlp import SwiGLU
from frontierlm.model.moe import MoE
from frontierlm.model.norm import RMSNorm
from frontierlm.model.rope import rope_tables


class Block(nn.Module):
    """Pre-norm residual block; with `norm = "sandwich"` each branch's output is normalised too
    before it joins the residual stream (Gemma 2/3, Arcee Trinity)."""

    def __init__(self, cfg: ModelConfig, layer: int = 0) -> None:
        super().__init__()
        # Llama's names: `post_attention_layernorm` is the norm in front of the MLP.
        self.input_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.self_attn = MultiHeadLatentAttention(cfg) if cfg.attention == "mla" else Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = (
            MoE(cfg)
            if cfg.layer_is_moe(layer)
            else SwiGLU(cfg.d_model, cfg.hidden, cfg.mlp_activation)
        )
        self.sandwich = cfg.norm == "sandwich"
        if self.sandwich:
            self.attn_out_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
            self.mlp_out_norm = RMSNorm(cfg.d_model, cfg.norm_eps)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor | None,
        sin: torch.Tensor | None,
        mask: AttentionMask,
        cache: LayerCache | None = None,
    ) -> torch.Tensor:
        attn = self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        x = x + (self.attn_out_norm(attn) if self.sandwich else attn)
        mlp = self.mlp(self.post_attention_layernorm(x))
        return x + (self.mlp_out_norm(mlp) if self.sandwich else mlp)


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig, vocab_size: int) -> None:
        super().__init__()
        self.cfg, self.vocab_size = cfg, vocab_size
        self.embed_tokens = nn.Embedding(vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        # Per-layer attention settings, fixed by the config.
        self.layer_windows = [cfg.layer_window(i) for i in range(cfg.n_layers)]
        self.layer_rope = [cfg.layer_uses_rope(i) for i in range(cfg.n_layers)]
        cos, sin = rope_tables(cfg)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        std = self.cfg.init_std
        # Residual-branch outputs are scaled down with depth (GPT-2) so the stream's variance
        # stays flat at initialisation.
        out_std = std / math.sqrt(2 * self.cfg.n_layers)
        for name, param in self.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight", "mlp.down_proj")):
                nn.init.normal_(param, 0.0, out_std)
            elif param.dim() >= 2:
                nn.init.normal_(param, 0.0, std)
            else:
                nn.init.ones_(param)

    def forward(self, input_ids: torch.Tensor, doc_ids: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids: (batch, seq) -> logits (batch, seq, vocab). With `doc_ids` (batch, seq),
        tokens attend only within their document."""
        seq = input_ids.shape[1]
        if seq > self.cfg.max_seq_len:
            raise ValueError(
                f"sequence of {seq} tokens exceeds model.max_seq_len={self.cfg.max_seq_len}"
            )
        cos, sin = self.rope_cos[:seq], self.rope_sin[:seq]
        cfg = self.cfg
        special = doc_ids is not None or any(self.layer_windows) or cfg.attn_softcap is not None
        flex = input_ids.is_cuda and special
        masks = {
            w: attention_mask(seq, doc_ids, w, flex, input_ids.device)
            for w in set(self.layer_windows)
        }
        x = self.embed_tokens(input_ids)
        if cfg.embed_scale:
            # sqrt(d_model) rounded to the activations' dtype first, as transformers' Gemma does
            # (55.5 rather than 55.43 in bf16 at d_model 3072), so bf16 runs match the reference.
            x = x * x.new_full((), cfg.d_model**0.5)
        for layer, window, rope in zip(
            self.layers, self.layer_windows, self.layer_rope, strict=True
        ):
            # A NoPE layer gets no rotary tables: its attention sees content only.
            x = layer(x, cos if rope else None, sin if rope else None, masks[window])
        logits = self.lm_head(self.norm(x))
        if cfg.final_softcap is not None:
            logits = cfg.final_softcap * torch.tanh(logits / cfg.final_softcap)
        return logits

    # Inference with a KV cache (frontierlm/inference/engine.py drives these two).

    def prefill(
        self,
        input_ids: torch.Tensor,
        cache: KVCache,
        slots: torch.Tensor,
        last: torch.Tensor,
    ) -> torch.Tensor:
        """Run prompts (rows of `input_ids`, right-padded) from position 0 into cache `slots`;
        return the logits (rows, vocab) at each row's last prompt token (`last`: its index).
        Padding after a prompt is never attended to by the prompt (causal) and is overwritten
        by the decode steps that follow."""
        seq = input_ids.shape[1]
        cos, sin = self.rope_cos[:seq], self.rope_sin[:seq]
        special = any(self.layer_windows) or self.cfg.attn_softcap is not None
        flex = input_ids.is_cuda and special
        masks = {
            w: attention_mask(seq, None, w, flex, input_ids.device) for w in set(self.layer_windows)
        }
        x = self._embed(input_ids)
        for i, (layer, window, rope) in enumerate(
            zip(self.layers, self.layer_windows, self.layer_rope, strict=True)
        ):
            cached = cache.for_prompts(i, slots)
            x = layer(x, cos if rope else None, sin if rope else None, masks[window], cached)
        return self._logits(x[torch.arange(x.shape[0], device=x.device), last])

    def decode(
        self,
        tokens: torch.Tensor,
        cache: KVCache,
        positions: torch.Tensor,
        key_index: torch.Tensor,
    ) -> torch.Tensor:
        """One decode step for every cache slot: `tokens` (slots,) at `positions` (slots,);
        attention spans cache positions `key_index` (arange(kv_len), every position < kv_len
        that a sequence has reached). Returns next-token logits (slots, vocab). Shapes depend
        only on the slot count and kv_len, so the step can be replayed as a CUDA graph."""
        cos = self.rope_cos[positions][:, None, None]  # (slots, 1, 1, rope_dim)
        sin = self.rope_sin[positions][:, None, None]
        seen = key_index[None] <= positions[:, None]  # (slots, kv_len)
        masks = {}
        for window in set(self.layer_windows):
            keep = seen if window is None else seen & (positions[:, None] - key_index < window)
            masks[window] = keep[:, None, None]
        x = self._embed(tokens[:, None])
        for i, (layer, window, rope) in enumerate(
            zip(self.layers, self.layer_windows, self.layer_rope, strict=True)
        ):
            cached = cache.for_tokens(i, positions)
            x = layer(x, cos if rope else None, sin if rope else None, masks[window], cached)
        return self._logits(x[:, 0])

    def _embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        return x * x.new_full((), self.cfg.d_model**0.5) if self.cfg.embed_scale else x

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(self.norm(hidden))
        cap = self.cfg.final_softcap
        return cap * torch.tanh(logits / cap) if cap is not None else logits

    def moe_layers(self) -> list[MoE]:
        return [layer.mlp for layer in self.layers if isinstance(layer.mlp, MoE)]

    def aux_loss(self) -> torch.Tensor | None:
        """Sum of the MoE layers' weighted balance losses from the last training forward, if
        any (the weights, `moe_aux_weight` and `moe_seq_aux_weight`, are applied already)."""
        losses = [m.aux_loss for m in self.moe_layers() if m.aux_loss is not None]
        return torch.stack(losses).sum() if losses else None

    def after_optimizer_step(self, lr_scale: float = 1.0) -> dict[str, float]:
        """Expert-load metrics per MoE layer; moves the selection biases when balancing by bias.
        `lr_scale`: the learning rate over its peak, which scales the bias step when
        `moe_bias_schedule = "lr"`."""
        rate = self.cfg.moe_bias_rate
        if self.cfg.moe_bias_schedule == "lr":
            rate *= lr_scale
        stats = {}
        for i, layer in enumerate(self.layers):
            if isinstance(layer.mlp, MoE):
                for key, value in layer.mlp.balance_step(rate).items():
                    stats[f"moe{i}_{key}"] = value
        return stats

    def discard_step_stats(self) -> None:
        """Forget the expert loads of a step that was skipped (no optimizer step followed)."""
        for moe in self.moe_layers():
            moe.load.zero_()

    def eval_expert_load(self) -> dict[str, float]:
        """Max/mean expert load per MoE layer over the evaluation forwards since the last call
        (then reset): `moe{i}_max_over_mean_load`."""
        stats = {}
        for i, layer in enumerate(self.layers):
            if isinstance(layer.mlp, MoE):
                load = layer.mlp.eval_load
                if load.sum() > 0:
                    stats[f"moe{i}_max_over_mean_load"] = (load.max() / load.mean()).item()
                load.zero_()
        return stats

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs (forward + backward) per token: 6 per weight of every matmul, the
        output head included and the embedding lookup not, plus causal attention's score and
        value products, 3 * n_layers * seq_len * n_heads * (qk_head_dim + v_head_dim) (PaLM's
        12*L*T*H*D halved for the causal mask, with the score and value widths apart since MLA
        has them differ). For MoE layers only the top-k routed experts count."""
        matmul_params = sum(
            p.numel() for name, p in self.named_parameters() if p.dim() == 2 and "embed" not in name
        )
        matmul_params += sum(self._active_expert_params(m) for m in self.moe_layers())
        if self.cfg.tie_embeddings:  # the head shares the embedding's weight but is a matmul
            matmul_params += self.lm_head.weight.numel()
        cfg = self.cfg
        attention = 3 * cfg.n_layers * seq_len * cfg.n_heads * (cfg.qk_head_dim + cfg.v_head_dim)
        return 6.0 * matmul_params + attention

    def kv_cache_bytes_per_token(self, dtype_bytes: int = 2) -> int:
        """See `ModelConfig.kv_cache_bytes_per_token`."""
        return self.cfg.kv_cache_bytes_per_token(dtype_bytes)

    def _active_expert_params(self, moe: MoE) -> int:
        per_expert = (moe.gate_up_proj.numel() + moe.down_proj.numel()) // moe.n_experts
        return moe.top_k * per_expert

    def active_params(self) -> int:
        """Parameters one token uses: all but the routed experts it was not sent to."""
        inactive = sum(
            m.gate_up_proj.numel() + m.down_proj.numel() - self._active_expert_params(m)
            for m in self.moe_layers()
        )
        return self.num_params() - inactive

    def num_params(self, exclude_embeddings: bool = False) -> int:
        total = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            total -= self.embed_tokens.weight.numel()
        return total
