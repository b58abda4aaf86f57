"""Our decoder against transformers' LlamaForCausalLM: same weights, same logits."""

import pytest
import torch

from frontierlm.model import Transformer

transformers = pytest.importorskip("transformers")


def to_llama(model: Transformer) -> "transformers.LlamaForCausalLM":
    cfg = model.cfg
    hf_cfg = transformers.LlamaConfig(
        vocab_size=model.vocab_size,
        hidden_size=cfg.d_model,
        intermediate_size=cfg.hidden,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.kv_heads,
        max_position_embeddings=cfg.max_seq_len,
        rms_norm_eps=cfg.norm_eps,
        rope_theta=cfg.rope_theta,
        tie_word_embeddings=cfg.tie_embeddings,
        attention_bias=False,
        mlp_bias=False,
    )
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    state = {}
    for name, tensor in model.state_dict().items():
        state[name if name.startswith("lm_head") else f"model.{name}"] = tensor
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not unexpected, unexpected
    assert set(missing) <= {"lm_head.weight"} and (cfg.tie_embeddings or not missing)
    return hf


@pytest.mark.parametrize(
    "n_heads,n_kv_heads,tie,theta",
    [(4, 4, True, 10000.0), (4, 2, False, 500000.0), (8, 1, True, 10000.0)],
)
def test_logits_match_transformers_llama(make_random_model, n_heads, n_kv_heads, tie, theta):
    model = make_random_model(
        d_model=64,
        n_layers=2,
        n_heads=n_heads,
        n_kv_heads=n_kv_heads,
        tie_embeddings=tie,
        rope_theta=theta,
        max_seq_len=64,
    )
    hf = to_llama(model)
    ids = torch.randint(0, 300, (3, 40))
    with torch.no_grad():
        ours = model(ids)
        theirs = hf(input_ids=ids).logits
    assert ours.shape == theirs.shape == (3, 40, 300)
    err = (ours - theirs).abs().max().item()
    assert err < 1e-4, f"max |logit difference| = {err}"
