"""FLOP, parameter and KV-cache counts from a config, against the built model and against the
published sizes of the Llama 3 family."""

import pytest

from frontierlm.config import ModelConfig
from frontierlm.model import Transformer
from frontierlm.plan.flops import config_for_params, count_model, dense_config

CONFIGS = {
    "dense-tied-gqa": dict(d_model=64, n_layers=3, n_heads=4, n_kv_heads=2),
    "dense-untied-switches": dict(
        d_model=64,
        n_layers=2,
        n_heads=4,
        tie_embeddings=False,
        qk_norm=True,
        attn_gate=True,
        norm="sandwich",
        attn_head_dim=24,
        ffn_hidden=100,
    ),
    "moe-shared-first-dense": dict(
        d_model=64,
        n_layers=4,
        n_heads=4,
        moe_experts=8,
        moe_top_k=2,
        moe_shared_experts=1,
        moe_first_dense=1,
        moe_expert_hidden=48,
    ),
    "mla-moe": dict(
        d_model=64,
        n_layers=2,
        n_heads=4,
        attention="mla",
        mla_kv_lora_rank=32,
        mla_qk_nope_head_dim=16,
        mla_qk_rope_head_dim=8,
        mla_v_head_dim=12,
        mla_q_lora_rank=24,
        moe_experts=4,
        moe_top_k=1,
        tie_embeddings=False,
    ),
}


@pytest.mark.parametrize("name", CONFIGS)
def test_counts_equal_the_built_model(name):
    cfg = ModelConfig(**CONFIGS[name])
    model = Transformer(cfg, vocab_size=300)
    count = count_model(cfg, 300)
    assert count.params == model.num_params()
    assert count.active_params == model.active_params()
    for seq in (1, 64, 256):
        assert count.train_flops_per_token(seq) == model.flops_per_token(seq)
    assert count.kv_cache_bytes_per_token == model.kv_cache_bytes_per_token()
    if cfg.moe_experts:
        assert count.active_params < count.params


def test_inference_flops_by_hand():
    cfg = ModelConfig(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, tie_embeddings=True)
    count = count_model(cfg, 300)
    hd, hidden = 16, cfg.hidden
    per_layer = 64 * 4 * hd + 2 * 64 * 2 * hd + 4 * hd * 64 + 3 * 64 * hidden
    matmul = 2 * per_layer + 64 * 300
    assert count.matmul_params == matmul
    # 2 FLOPs per weight, plus q.k and p.v against 1000 cached tokens in 4 heads of 16, 2 layers
    assert count.inference_flops_per_token(1000) == 2 * matmul + 2 * 2 * 4 * (16 + 16) * 1000
    # K and V of 2 KV heads x 16 dims x 2 layers, bf16
    assert count.kv_cache_bytes_per_token == 2 * 2 * 16 * 2 * 2


def test_llama3_sizes():
    """Published parameter counts of Llama 3 (the transformers configs' shapes)."""
    assert count_model(dense_config(4096, 32), 128256).params == 8_030_261_248
    assert count_model(dense_config(8192, 80), 128256).params == 70_553_706_496
    cfg = ModelConfig(
        d_model=16384,
        n_layers=126,
        n_heads=128,
        n_kv_heads=8,
        ffn_hidden=53248,
        tie_embeddings=False,
        max_seq_len=8192,
    )
    count = count_model(cfg, 128256)
    assert count.params == 405_853_388_800
    # 6N is within 4% of the exact training FLOPs at 8k context: attention adds the rest.
    assert 1.0 < count.train_flops_per_token(8192) / (6 * count.params) < 1.04
    # Llama 3 405B's KV cache: 126 layers x 8 heads x 128 dims x K,V x 2 bytes = 504 KiB/token
    assert count.kv_cache_bytes_per_token == 126 * 8 * 128 * 2 * 2


@pytest.mark.parametrize("target", [3e6, 1.2e9, 8.03e9, 70e9, 405e9])
def test_config_for_params_lands_near_target(target):
    shape = config_for_params(target, 128256 if target > 1e8 else 4096, seq_len=4096)
    assert shape.count.params == pytest.approx(target, rel=0.05 if target > 1e8 else 0.2)
    cfg = shape.cfg
    assert cfg.d_model % cfg.n_heads == 0 and cfg.n_heads % cfg.kv_heads == 0
    if target > 1e9:
        assert 64 <= cfg.d_model / cfg.n_layers <= 205
    if target == 8.03e9:  # the search finds Llama 3 8B's own shape
        assert (cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.kv_heads) == (4096, 32, 32, 8)
