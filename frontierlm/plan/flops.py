"""FLOP and memory accounting of a FrontierLM model config, without building the model.

One transformer block of each kind (dense, MoE) is built on the `meta` device, which allocates
no memory, and its parameters are counted; the model is embedding + blocks + norm + head. So the
counts come from the same module code that trains, for any attention (GQA, MLA, gates, QK-norm)
and MLP (dense, routed and shared experts), at any size: a 405B config counts in milliseconds.
`Transformer.flops_per_token` / `active_params` / `num_params` give the same numbers for a built
model (tests/plan/test_flops.py holds them equal).

Conventions (as `Transformer.flops_per_token`): a multiply-add is 2 FLOPs; training is forward +
backward = 3x forward, so 6 FLOPs per matmul weight per token; the embedding lookup is free and
the output head is a matmul; causal attention's score and value products add
3 * n_layers * seq * n_heads * (qk_head_dim + v_head_dim) per token (PaLM's 12*L*T*H*D, halved
for the causal mask). MoE layers count the routed experts a token visits (top-k) and the router.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from functools import lru_cache

import torch

from frontierlm.config import ModelConfig


@dataclass(frozen=True)
class ModelCount:
    """What one model config costs, per token and in parameters."""

    params: int  # every weight, embedding included (Chinchilla's N)
    active_params: int  # those one token uses: all but the routed experts it skips
    embedding_params: int  # the input embedding table (the head counts as a matmul)
    matmul_params: int  # active weights of every matmul, head included: the N of "6N"
    n_layers: int
    n_heads: int
    qk_head_dim: int
    v_head_dim: int
    kv_cache_bytes_per_token: int  # at 2 bytes per value (bf16)

    def train_flops_per_token(self, seq_len: int) -> float:
        """Forward + backward FLOPs per token at a training context of `seq_len` tokens."""
        return 6.0 * self.matmul_params + self.attention_flops(seq_len, training=True)

    def attention_flops(self, seq_len: int, training: bool) -> float:
        """Causal attention's score and value products per token, averaged over a window of
        `seq_len` (a token attends to seq_len / 2 others on average); x3 for training."""
        forward = self.n_layers * seq_len * self.n_heads * (self.qk_head_dim + self.v_head_dim)
        return 3.0 * forward if training else float(forward)

    def inference_flops_per_token(self, context: int) -> float:
        """Forward FLOPs to generate one token that attends to `context` cached tokens:
        2 per matmul weight, plus 2 * n_layers * n_heads * (qk + v) * context for attention."""
        attention = 2.0 * self.n_layers * self.n_heads * (self.qk_head_dim + self.v_head_dim)
        return 2.0 * self.matmul_params + attention * context

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


@lru_cache(maxsize=4096)
def _block_counts(cfg_json: str, layer: int) -> tuple[int, int, int]:
    """(parameters, active parameters, active matmul parameters) of block `layer`."""
    from frontierlm.model.moe import MoE
    from frontierlm.model.transformer import Block

    cfg = ModelConfig.model_validate_json(cfg_json)
    with torch.device("meta"):
        block = Block(cfg, layer)
    params = sum(p.numel() for p in block.parameters())
    matmul = sum(p.numel() for p in block.parameters() if p.dim() == 2)
    inactive = 0
    if isinstance(block.mlp, MoE):
        experts = block.mlp.gate_up_proj.numel() + block.mlp.down_proj.numel()
        active = experts // block.mlp.n_experts * block.mlp.top_k
        matmul += active  # the stacked experts are 3-D: only the visited ones count
        inactive = experts - active
    return params, params - inactive, matmul


def count_model(cfg: ModelConfig, vocab_size: int) -> ModelCount:
    """Parameter, FLOP and KV-cache counts of `cfg` with a `vocab_size` vocabulary."""
    if vocab_size < 1:
        raise ValueError(f"vocab_size must be positive, got {vocab_size}")
    cfg_json = cfg.model_dump_json()
    n_moe = sum(cfg.layer_is_moe(layer) for layer in range(cfg.n_layers))
    params = active = matmul = 0
    # Every dense layer is alike, and so is every MoE layer: two block builds at most.
    for layer, repeat in ((0, cfg.n_layers - n_moe), (cfg.moe_first_dense, n_moe)):
        if repeat:
            p, a, m = _block_counts(cfg_json, layer)
            params, active, matmul = params + repeat * p, active + repeat * a, matmul + repeat * m
    embed = vocab_size * cfg.d_model
    head = vocab_size * cfg.d_model
    norm = cfg.d_model
    untied_head = 0 if cfg.tie_embeddings else head
    return ModelCount(
        params=params + embed + untied_head + norm,
        active_params=active + embed + untied_head + norm,
        embedding_params=embed,
        matmul_params=matmul + head,
        n_layers=cfg.n_layers,
        n_heads=cfg.n_heads,
        qk_head_dim=cfg.qk_head_dim,
        v_head_dim=cfg.v_head_dim,
        kv_cache_bytes_per_token=cfg.kv_cache_bytes_per_token(2),
    )


# ----------------------------------------------------------------------------- a shape for N


@dataclass(frozen=True)
class Shape:
    """A dense Llama-style shape: what `config_for_params` returns."""

    cfg: ModelConfig
    count: ModelCount


def dense_config(
    d_model: int, n_layers: int, kv_heads: int = 8, seq_len: int = 4096
) -> ModelConfig:
    """A Llama-3-like dense config: heads of 128 (64 below d_model 1024), GQA with `kv_heads`
    groups (fewer when there are fewer heads), SwiGLU of ~3.5 d_model rounded to 64 (Llama 3 8B:
    14336 at 4096), untied embeddings, RoPE theta 500k."""
    head_dim = 128 if d_model >= 1024 else 64
    n_heads = max(1, d_model // head_dim)
    return ModelConfig(
        d_model=d_model,
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=math.gcd(n_heads, kv_heads),
        attn_head_dim=head_dim if d_model % head_dim else None,
        ffn_hidden=_dense_ffn(d_model),
        max_seq_len=seq_len,
        rope_theta=500_000.0,
        tie_embeddings=False,
    )


def _width_step(d_model: float) -> int:
    """Width granularity: whole groups of 8 heads of 128 from 8192 up (8 KV heads divide the
    heads), 4 groups from 2048, one head below."""
    if d_model >= 8192:
        return 1024
    if d_model >= 2048:
        return 512
    return 128 if d_model >= 1024 else 64


def _dense_ffn(d_model: int) -> int:
    return 64 * max(1, round(3.5 * d_model / 64))


def _dense_params(d_model: int, n_layers: int, vocab_size: int) -> int:
    """`count_model(dense_config(...)).params` in closed form, to rank candidate shapes."""
    head_dim = 128 if d_model >= 1024 else 64
    n_heads = max(1, d_model // head_dim)
    kv = math.gcd(n_heads, 8)
    attention = 2 * d_model * n_heads * head_dim + 2 * d_model * kv * head_dim
    per_layer = attention + 3 * d_model * _dense_ffn(d_model) + 2 * d_model
    return n_layers * per_layer + 2 * vocab_size * d_model + d_model


def config_for_params(
    target: float, vocab_size: int, seq_len: int = 4096, aspect: float = 128.0
) -> Shape:
    """A dense shape whose parameter count (embeddings included) is within 2% of the nearest
    to `target` and whose d_model / n_layers is nearest `aspect` (Llama 3: 128 at 8B, 102 at
    70B, 130 at 405B), among depths of 1-256 layers with that ratio within a factor 1.6 and
    widths in whole heads (see `_width_step`)."""
    if target <= 0:
        raise ValueError(f"target parameters must be positive, got {target}")
    candidates = []
    for n_layers in range(1, 257):
        low, high = aspect * n_layers / 1.6, aspect * n_layers * 1.6
        if n_layers == 1:
            low = 64  # the smallest shapes have one layer, however narrow
        step = _width_step(high)
        for d_model in range(step * max(1, math.ceil(low / step)), int(high) + 1, step):
            error = abs(math.log(_dense_params(d_model, n_layers, vocab_size) / target))
            skew = abs(math.log(d_model / n_layers / aspect))
            candidates.append((error, skew, d_model, n_layers))
    if not candidates:
        raise ValueError(f"no dense shape comes near {target:.3g} parameters")
    # Within 2% of the nearest count, the most Llama-like aspect ratio wins.
    nearest = min(c[0] for c in candidates)
    _, _, d_model, n_layers = min(
        (c for c in candidates if c[0] <= nearest + 0.02), key=lambda c: (c[1], c[0])
    )
    cfg = dense_config(d_model, n_layers, seq_len=seq_len)
    return Shape(cfg, count_model(cfg, vocab_size))
