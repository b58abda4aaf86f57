"""Packed projections (inference/packing.py): decoding with the q/k/v and gate/up weights stacked
gives the unpacked engine's tokens and logits, follows weight changes between calls (RL), and
leaves the model's parameters, state dict and training forward untouched."""

from __future__ import annotations

import torch

from frontierlm.inference.engine import generate, generate_reference
from frontierlm.inference.packing import PackedProjections
from frontierlm.inference.sampling import SamplingParams

FIELDS = {"d_model": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "max_seq_len": 128}
PROMPTS = [[5, 9, 17, 3], [200, 1], [7] * 20]


def test_packed_decoding_equals_unpacked_and_reference(make_random_model):
    model = make_random_model(vocab_size=300, **FIELDS)
    params = SamplingParams(max_new_tokens=24, temperature=0)
    packed = generate(model, PROMPTS, params, pack_projections=True)
    plain = generate(model, PROMPTS, params, pack_projections=False)
    reference = generate_reference(model, PROMPTS, params)
    assert [c.ids for c in packed] == [c.ids for c in plain] == [c.ids for c in reference]
    # Same log-probabilities to float32 rounding: the packed GEMM adds in the same order.
    for a, b in zip(packed, plain, strict=True):
        assert torch.allclose(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-5)


def test_packed_weights_follow_parameter_updates(make_random_model):
    model = make_random_model(vocab_size=300, **FIELDS)
    params = SamplingParams(max_new_tokens=16, temperature=0)
    before = generate(model, PROMPTS, params)
    with torch.no_grad():  # an RL update between two calls: in place, same addresses
        for layer in model.layers:
            layer.self_attn.k_proj.weight.mul_(-2.0)
            layer.mlp.up_proj.weight.mul_(3.0)
    after = generate(model, PROMPTS, params)
    reference = generate_reference(model, PROMPTS, params)
    assert [c.ids for c in after] == [c.ids for c in reference]
    assert [c.ids for c in after] != [c.ids for c in before]  # the update did change the text


def test_packing_leaves_the_model_as_it_was(make_random_model):
    model = make_random_model(vocab_size=300, **FIELDS)
    keys = list(model.state_dict())
    names = [n for n, _ in model.named_parameters()]
    ids = torch.randint(0, 300, (2, 12))
    logits = model(ids)
    packs = PackedProjections(model)
    assert len(packs) == 2 * FIELDS["n_layers"]  # one attention and one MLP per layer
    generate(model, PROMPTS, SamplingParams(max_new_tokens=4, temperature=0))
    assert list(model.state_dict()) == keys
    assert [n for n, _ in model.named_parameters()] == names
    for layer in model.layers:  # detached after the call: training reads its own weights
        assert layer.self_attn.packed_qkv is None and layer.mlp.packed_gate_up is None
    assert torch.equal(model(ids), logits)
    with packs.attached():  # attached, the forward reads the packed copies
        with torch.no_grad():
            model.layers[0].self_attn.q_proj.weight.zero_()  # stale copy: output unchanged
        assert torch.allclose(model(ids), logits, atol=1e-5)
    assert not torch.allclose(model(ids), logits, atol=1e-3)
