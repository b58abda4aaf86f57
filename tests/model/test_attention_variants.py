"""Softcapping, sliding windows, NoPE layers, sandwich norm, gated attention, the attention
scale, embedding scale and GeGLU against a direct float64 implementation of the formulas."""

import math

import pytest
import torch
import torch.nn.functional as F

B, T = 2, 40
TINY = {"vocab_size": 200, "d_model": 64, "n_layers": 2, "n_heads": 4, "max_seq_len": 64}


def rope(t, cos, sin):
    half = t.shape[-1] // 2
    return t * cos + torch.cat([-t[..., half:], t[..., :half]], -1) * sin


def reference(model, ids, softcap=None, windows=None, final_cap=None):
    """The decoder written out in float64 with explicit scores, per layer window."""
    cfg = model.cfg
    m = model.double()
    x = m.embed_tokens(ids)
    if cfg.embed_scale:
        x = x * math.sqrt(cfg.d_model)
    cos, sin = m.rope_cos[:T].double(), m.rope_sin[:T].double()
    pos = torch.arange(T)
    for i, layer in enumerate(m.layers):
        att = layer.self_attn
        h = layer.input_layernorm(x)
        q = att.q_proj(h).view(B, T, cfg.n_heads, cfg.head_dim).transpose(1, 2)
        k = att.k_proj(h).view(B, T, cfg.kv_heads, cfg.head_dim).transpose(1, 2)
        v = att.v_proj(h).view(B, T, cfg.kv_heads, cfg.head_dim).transpose(1, 2)
        if cfg.layer_uses_rope(i):
            q, k = rope(q, cos, sin), rope(k, cos, sin)
        g = cfg.n_heads // cfg.kv_heads
        k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
        s = q @ k.transpose(-1, -2) * (cfg.attn_scale or 1 / math.sqrt(cfg.head_dim))
        if softcap:
            s = softcap * torch.tanh(s / softcap)
        keep = pos[:, None] >= pos[None, :]
        if windows and windows[i]:
            keep &= pos[:, None] - pos[None, :] < windows[i]
        s = s.masked_fill(~keep, float("-inf"))
        o = (torch.softmax(s, -1) @ v).transpose(1, 2).reshape(B, T, -1)
        if cfg.attn_gate:
            o = o * torch.sigmoid(att.g_proj(h))
        sandwich = cfg.norm == "sandwich"
        a = att.o_proj(o)
        x = x + (layer.attn_out_norm(a) if sandwich else a)
        h = layer.post_attention_layernorm(x)
        mlp = layer.mlp
        gate = mlp.gate_proj(h)
        if cfg.mlp_activation == "gelu_tanh":
            c = math.sqrt(2 / math.pi)
            gate = 0.5 * gate * (1 + torch.tanh(c * (gate + 0.044715 * gate**3)))
        else:
            gate = F.silu(gate)
        f = mlp.down_proj(gate * mlp.up_proj(h))
        x = x + (layer.mlp_out_norm(f) if sandwich else f)
    logits = m.lm_head(m.norm(x))
    if final_cap:
        logits = final_cap * torch.tanh(logits / final_cap)
    model.float()
    return logits


@pytest.mark.parametrize(
    "fields",
    [
        {"attn_softcap": 5.0},
        {"final_softcap": 2.0},
        {"sliding_window": 6, "layer_pattern": "LG"},
        {"sliding_window": 4, "layer_pattern": "L", "attn_softcap": 3.0, "n_kv_heads": 2},
        {"rope_pattern": "N"},
        {"rope_pattern": "RN"},
        {"norm": "sandwich"},
        {"attn_gate": True, "n_kv_heads": 1},
        {"attn_scale": 0.5, "n_kv_heads": 2},
        {"attn_scale": 0.05, "attn_softcap": 3.0, "sliding_window": 6, "layer_pattern": "LG"},
        {"embed_scale": True},
        {"mlp_activation": "gelu_tanh"},
    ],
)
def test_variant_matches_float64_formula(make_random_model, fields):
    model = make_random_model(**TINY, **fields)
    # Larger weights, so the caps and windows bite.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(4)
    ids = torch.randint(0, 200, (B, T))
    with torch.no_grad():
        ours = model(ids)
    windows = [model.cfg.layer_window(i) for i in range(2)]
    ref = reference(
        model, ids, fields.get("attn_softcap"), windows, fields.get("final_softcap")
    ).float()
    assert (ours - ref).abs().max() < 1e-4 * ref.abs().max()
    if "final_softcap" in fields:
        assert ours.abs().max() < fields["final_softcap"]
    # The switch matters: the plain model differs (with the same weights where they exist).
    plain = make_random_model(**TINY, n_kv_heads=fields.get("n_kv_heads"))
    with torch.no_grad():
        plain.load_state_dict(model.state_dict(), strict=False)
        assert (plain(ids) - ours).abs().max() > 1e-3


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_path_with_window_and_softcap_matches_cpu_path(make_random_model, flex_path_logits):
    """The GPU path's BlockMask + score_mod, run forward-only on the CPU."""
    model = make_random_model(
        **TINY, sliding_window=5, layer_pattern="LG", attn_softcap=4.0, attn_scale=0.3
    )
    ids = torch.randint(0, 200, (B, T))
    doc_ids = (torch.rand(B, T) < 0.1).cumsum(1)
    with torch.no_grad():
        dense = model(ids, doc_ids)
    flex = flex_path_logits(model, ids, doc_ids)
    assert (dense - flex).abs().max() < 1e-4


def test_local_layers_need_a_window():
    from frontierlm.config import ModelConfig

    with pytest.raises(ValueError, match="set sliding_window"):
        ModelConfig(layer_pattern="LG")
    with pytest.raises(ValueError, match="String should match pattern"):
        ModelConfig(layer_pattern="LX", sliding_window=4)


def test_moe_experts_stay_silu():
    from frontierlm.config import ModelConfig

    with pytest.raises(ValueError, match="MoE experts"):
        ModelConfig(moe_experts=4, mlp_activation="gelu_tanh")
