"""Multi-head latent attention: the formula in float64, masks and kernels, KV-cache size, counts,
config errors. (Parity with transformers' DeepseekV3Attention: tests/reference/.)"""

import pytest
import torch

from frontierlm.config import ModelConfig
from frontierlm.model import Transformer

B, T = 2, 40
MLA = {
    "vocab_size": 200,
    "d_model": 64,
    "n_layers": 2,
    "n_heads": 4,
    "max_seq_len": 64,
    "attention": "mla",
    "mla_kv_lora_rank": 16,
    "mla_qk_nope_head_dim": 12,
    "mla_qk_rope_head_dim": 8,
    "mla_v_head_dim": 10,
}


def rope(t, cos, sin):
    half = t.shape[-1] // 2
    return t * cos + torch.cat([-t[..., half:], t[..., :half]], -1) * sin


def rms(x, weight, eps):
    return weight * x / (x.pow(2).mean(-1, keepdim=True) + eps).sqrt()


def reference(model, ids, doc_ids=None):
    """The decoder written out in float64: MLA with explicit scores, per layer window."""
    cfg = model.cfg
    m = model.double()
    nope, r, vd, h = cfg.mla_qk_nope_head_dim, cfg.mla_qk_rope_head_dim, cfg.mla_v_head_dim, 4
    x = m.embed_tokens(ids)
    cos, sin = m.rope_cos[:T].double(), m.rope_sin[:T].double()
    pos = torch.arange(T)
    for i, layer in enumerate(m.layers):
        att = layer.self_attn
        hid = layer.input_layernorm(x)
        if cfg.mla_q_lora_rank is None:
            q = hid @ att.q_proj.weight.T
        else:
            q = rms(hid @ att.q_a_proj.weight.T, att.q_a_layernorm.weight, 1e-6)
            q = q @ att.q_b_proj.weight.T
        q = q.view(B, T, h, nope + r).transpose(1, 2)
        down = hid @ att.kv_a_proj_with_mqa.weight.T
        latent = rms(down[..., : cfg.mla_kv_lora_rank], att.kv_a_layernorm.weight, 1e-6)
        k_rope = down[..., cfg.mla_kv_lora_rank :][:, None]  # one key slice for every head
        kv = (latent @ att.kv_b_proj.weight.T).view(B, T, h, nope + vd).transpose(1, 2)
        k_nope, v = kv[..., :nope], kv[..., nope:]
        q_nope, q_rope = q[..., :nope], q[..., nope:]
        if cfg.layer_uses_rope(i):
            q_rope, k_rope = rope(q_rope, cos, sin), rope(k_rope, cos, sin)
        s = (q_nope @ k_nope.transpose(-1, -2) + q_rope @ k_rope.transpose(-1, -2)) / (
            nope + r
        ) ** 0.5
        keep = (pos[:, None] >= pos[None, :])[None]
        if cfg.layer_window(i):
            keep = keep & (pos[:, None] - pos[None, :] < cfg.layer_window(i))
        if doc_ids is not None:
            keep = keep & (doc_ids[:, :, None] == doc_ids[:, None, :])
        s = s.masked_fill(~keep[:, None], float("-inf"))
        o = (torch.softmax(s, -1) @ v).transpose(1, 2).reshape(B, T, h * vd)
        x = x + att.o_proj(o)
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    logits = m.lm_head(m.norm(x))
    model.float()
    return logits


@pytest.mark.parametrize(
    "fields",
    [
        {},
        {"mla_q_lora_rank": 24},
        {"mla_q_lora_rank": 24, "sliding_window": 6, "layer_pattern": "LG"},
        {"rope_pattern": "RN", "mla_v_head_dim": 20},
        {"yarn_factor": 4.0, "yarn_original_max_len": 16},
    ],
)
def test_mla_matches_float64_formula(make_random_model, fields):
    model = make_random_model(**{**MLA, **fields})
    with torch.no_grad():  # larger weights, so that attention is far from uniform
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(3)
    ids = torch.randint(0, 200, (B, T))
    doc_ids = (torch.rand(B, T) < 0.1).cumsum(1)
    with torch.no_grad():
        for docs in (None, doc_ids):
            ours = model(ids, docs)
            ref = reference(model, ids, docs).float()
            assert (ours - ref).abs().max() < 1e-4 * ref.abs().max()


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_mla_flex_path_matches_dense_path(make_random_model, flex_path_logits):
    """The GPU path's BlockMask (document and window masks), run forward-only on the CPU, with
    values narrower than queries and keys."""
    model = make_random_model(**MLA, sliding_window=5, layer_pattern="LG", mla_q_lora_rank=24)
    ids = torch.randint(0, 200, (B, T))
    doc_ids = (torch.rand(B, T) < 0.1).cumsum(1)
    with torch.no_grad():
        dense = model(ids, doc_ids)
    flex = flex_path_logits(model, ids, doc_ids)
    assert (dense - flex).abs().max() < 1e-4


def test_kv_cache_bytes_per_token():
    # DeepSeek-V3's attention: 61 layers, 128 heads, latent 512 + shared rope key 64.
    v3 = {"d_model": 7168, "n_layers": 61, "n_heads": 128, "max_seq_len": 4096}
    mla = ModelConfig(
        **v3,
        attention="mla",
        mla_q_lora_rank=1536,
        mla_kv_lora_rank=512,
        mla_qk_nope_head_dim=128,
        mla_qk_rope_head_dim=64,
        mla_v_head_dim=128,
    )
    assert mla.kv_cache_bytes_per_token() == 61 * (512 + 64) * 2 == 70_272
    assert mla.kv_cache_bytes_per_token(dtype_bytes=1) == 35_136  # an fp8 cache
    # The same width as multi-head attention (head_dim 56) and as GQA with 8 KV heads.
    mha = ModelConfig(**v3)
    assert mha.kv_cache_bytes_per_token() == 61 * 2 * 128 * 56 * 2
    gqa = ModelConfig(**v3, n_kv_heads=8)
    assert gqa.kv_cache_bytes_per_token() == 61 * 2 * 8 * 56 * 2
    assert mla.kv_cache_bytes_per_token() < gqa.kv_cache_bytes_per_token()
    small = Transformer(ModelConfig(**{k: v for k, v in MLA.items() if k != "vocab_size"}), 50)
    assert small.kv_cache_bytes_per_token(4) == 2 * (16 + 8) * 4


@pytest.mark.parametrize("q_rank", [None, 24])
def test_mla_parameters_and_flops_by_hand(q_rank):
    fields = {k: v for k, v in MLA.items() if k != "vocab_size"}
    cfg = ModelConfig(**fields, mla_q_lora_rank=q_rank, tie_embeddings=False)
    model = Transformer(cfg, vocab_size=50)
    d, h, nope, r, vd, latent = 64, 4, 12, 8, 10, 16
    q = d * h * (nope + r) if q_rank is None else d * q_rank + q_rank * h * (nope + r)
    attn = q + d * (latent + r) + latent * h * (nope + vd) + h * vd * d
    mlp = 3 * d * cfg.hidden
    matmul = 2 * (attn + mlp) + d * 50  # two layers and the output head
    norms = 2 * (2 * d + latent + (q_rank or 0)) + d
    assert model.num_params() == matmul + 50 * d + norms
    # Scores use the nope + rope widths, the value product the value width.
    assert model.flops_per_token(32) == 6 * matmul + 3 * 2 * 32 * h * ((nope + r) + vd)


def test_mla_config_errors_name_the_field():
    base = {k: v for k, v in MLA.items() if k not in ("vocab_size", "mla_v_head_dim")}
    with pytest.raises(ValueError, match="attention='mla' needs mla_v_head_dim"):
        ModelConfig(**base)
    with pytest.raises(ValueError, match="mla_kv_lora_rank apply only with attention='mla'"):
        ModelConfig(mla_kv_lora_rank=16)
    with pytest.raises(ValueError, match="mla_qk_rope_head_dim=7 must be even"):
        ModelConfig(**{**base, "mla_qk_rope_head_dim": 7, "mla_v_head_dim": 8})
    with pytest.raises(ValueError, match="n_kv_heads=2 has no meaning with attention='mla'"):
        ModelConfig(**base, mla_v_head_dim=8, n_kv_heads=2)
    with pytest.raises(ValueError, match="qk_norm is not implemented for attention='mla'"):
        ModelConfig(**base, mla_v_head_dim=8, qk_norm=True)
    with pytest.raises(ValueError, match="yarn_mscale and yarn_mscale_all_dim apply only with"):
        ModelConfig(**base, mla_v_head_dim=8, yarn_mscale_all_dim=1.0)
