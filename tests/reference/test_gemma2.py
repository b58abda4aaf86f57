"""Gemma 2 export and import, checked against transformers' Gemma2ForCausalLM itself.

Each test prints the max relative logit error it measured (`pytest -s` shows them)."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch

from frontierlm.model import Transformer, load
from frontierlm.model.hf import export_hf, load_hf

transformers = pytest.importorskip("transformers")

B, T = 2, 40
WINDOW = 8  # well inside T, so the sliding layers see less than the global ones
GEMMA = {
    "d_model": 64,
    "n_layers": 4,
    "n_heads": 4,
    "n_kv_heads": 2,
    "max_seq_len": 64,
    "rope_theta": 10000.0,
    "norm": "sandwich",
    "embed_scale": True,
    "mlp_activation": "gelu_tanh",
    "layer_pattern": "LG",
    "sliding_window": WINDOW,
    "norm_eps": 1e-6,
}


def max_rel_error(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return ((ours - theirs).abs().max() / theirs.abs().max()).item()


def variant(model: Transformer, **changes: Any) -> Transformer:
    """The same weights under a config with `changes`, to show that a switch matters."""
    other = Transformer(model.cfg.model_copy(update=changes), model.vocab_size).eval()
    other.load_state_dict(model.state_dict())
    return other


def assert_bites(model: Transformer, ids: torch.Tensor, **changes: Any) -> None:
    with torch.no_grad():
        assert max_rel_error(variant(model, **changes)(ids), model(ids)) > 1e-2, changes


@pytest.mark.parametrize(
    "fields",
    [
        # Gemma 2's own caps, and caps that bite on a small random model.
        {"attn_softcap": 50.0, "final_softcap": 30.0},
        {"attn_softcap": 5.0, "final_softcap": 3.0, "attn_scale": 24**-0.5},
        # No caps: written as None, not left to Gemma2Config's 50/30 defaults.
        {"tie_embeddings": False, "mlp_activation": "silu"},
        # Heads wider than d_model / n_heads, as in every released Gemma 2.
        {"attn_head_dim": 32, "attn_softcap": 5.0, "final_softcap": 3.0},
        {"n_kv_heads": 1, "layer_pattern": "G", "sliding_window": None, "attn_softcap": 5.0},
        {"layer_pattern": "LLG", "n_layers": 3, "yarn_factor": 2.0, "yarn_original_max_len": 32},
    ],
)
def test_export_loads_as_gemma2_with_same_logits(tmp_path, make_random_model, fields):
    model = make_random_model(**(GEMMA | fields))
    with torch.no_grad():  # larger weights, so scores reach the caps and the window matters
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(4)
    ids = torch.randint(0, 300, (B, T))
    if fields.get("attn_softcap") == 5.0:
        assert_bites(model, ids, attn_softcap=None)
    if fields.get("final_softcap") == 3.0:
        assert_bites(model, ids, final_softcap=None)
    if model.cfg.sliding_window is not None:
        assert_bites(model, ids, layer_pattern="G")

    export_hf(model, tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["attn_logit_softcapping"] == fields.get("attn_softcap")
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "hf", attn_implementation="eager"
    ).eval()
    assert type(hf).__name__ == "Gemma2ForCausalLM"
    local = [model.cfg.layer_window(i) is not None for i in range(model.cfg.n_layers)]
    assert hf.config.layer_types == [
        "sliding_attention" if is_local else "full_attention" for is_local in local
    ]
    with torch.no_grad():
        ours, theirs = model(ids), hf(input_ids=ids).logits
        error = max_rel_error(ours, theirs)
        print(f"gemma2 export {fields}: max rel logit error {error:.2e}")
        assert error < 1e-4
        # And back: our loader reads the exported directory to the same model and logits.
        back = load(tmp_path / "hf")
        # init_std does not travel; the MLP width travels as a number.
        same = {"init_std": back.cfg.init_std, "ffn_hidden": model.cfg.hidden}
        assert back.cfg == model.cfg.model_copy(update=same)
        error_back = max_rel_error(back(ids), ours)
        print(f"gemma2 export->load {fields}: max rel logit error {error_back:.2e}")
        assert error_back < 1e-6


@pytest.mark.parametrize(
    "caps,scalar,tie,heads,head_dim",
    [
        ((50.0, 30.0), 8, True, 6, 8),
        ((5.0, 3.0), 12, True, 6, 8),
        ((None, None), 8, False, 6, 8),
        # 4 heads of 16 in a 48-wide model: heads * head_dim != hidden_size, as in Gemma 2 2B.
        ((5.0, 3.0), 16, True, 4, 16),
    ],
)
def test_import_of_a_transformers_made_gemma2(tmp_path, caps, scalar, tie, heads, head_dim):
    torch.manual_seed(1)
    config = transformers.Gemma2Config(
        vocab_size=256,
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=4,
        num_attention_heads=heads,
        num_key_value_heads=2,
        head_dim=head_dim,
        max_position_embeddings=64,
        rms_norm_eps=1e-6,
        query_pre_attn_scalar=scalar,
        sliding_window=WINDOW,
        attn_logit_softcapping=caps[0],
        final_logit_softcapping=caps[1],
        tie_word_embeddings=tie,
        initializer_range=0.1,  # large enough that the small caps bite
        attn_implementation="eager",
    )
    hf = transformers.Gemma2ForCausalLM(config).eval()
    with torch.no_grad():  # fresh Gemma norms are zeros (scale 1): perturb them
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.uniform_(-0.5, 0.5)
    hf.save_pretrained(tmp_path / "made")
    ours = load_hf(tmp_path / "made")
    cfg = ours.cfg
    assert (cfg.norm, cfg.embed_scale, cfg.mlp_activation) == ("sandwich", True, "gelu_tanh")
    assert (cfg.layer_pattern, cfg.sliding_window, cfg.kv_heads) == ("LG", WINDOW, 2)
    assert (cfg.attn_softcap, cfg.final_softcap, cfg.tie_embeddings) == (*caps, tie)
    assert cfg.head_dim == head_dim
    assert cfg.attn_scale == (None if scalar == head_dim else scalar**-0.5)
    ids = torch.randint(0, 256, (3, T))
    if caps[0] == 5.0:
        assert_bites(ours, ids, attn_softcap=None)
        assert_bites(ours, ids, final_softcap=None)
    if cfg.attn_scale is not None:
        assert_bites(ours, ids, attn_scale=None)
    with torch.no_grad():
        error = max_rel_error(ours(ids), hf(input_ids=ids).logits)
    setting = f"caps={caps} scalar={scalar} tie={tie} heads={heads}x{head_dim}"
    print(f"gemma2 import {setting}: max rel logit error {error:.2e}")
    assert error < 1e-4


def test_embed_scale_is_rounded_to_the_activation_dtype(make_random_model):
    """transformers multiplies by sqrt(d_model) cast to the hidden dtype: 6.9375, not 6.928,
    at d_model 48 in bf16."""
    model = make_random_model(**(GEMMA | {"d_model": 48})).to(torch.bfloat16)
    seen: list[torch.Tensor] = []
    model.layers[0].register_forward_pre_hook(lambda _, args: seen.append(args[0]))
    ids = torch.randint(0, 300, (1, 16))
    with torch.no_grad():
        model(ids)
        embedded = model.embed_tokens(ids)
    scale = torch.tensor(48**0.5).to(torch.bfloat16)
    assert scale.item() != pytest.approx(48**0.5, rel=1e-4)
    assert torch.equal(seen[0], embedded * scale)
