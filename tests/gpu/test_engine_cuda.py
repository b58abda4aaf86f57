"""The engine's GPU paths (CUDA-graph decode steps, FlexAttention prefill of windowed and
softcapped layers, grouped-matmul MoE, the compiled step) give the reference's greedy tokens.

These need a CUDA GPU; CI has none. Run them on the device machine:
`python -m pytest tests/gpu -m gpu`."""

from __future__ import annotations

import pytest
import torch

from frontierlm.inference.engine import generate, generate_reference
from frontierlm.inference.sampling import SamplingParams

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (device machine)"),
]

SMALL = {"d_model": 128, "n_heads": 4, "max_seq_len": 512, "n_layers": 2}
MLA = {
    "attention": "mla",
    "mla_kv_lora_rank": 32,
    "mla_qk_nope_head_dim": 16,
    "mla_qk_rope_head_dim": 16,
    "mla_v_head_dim": 32,
}


@pytest.mark.parametrize(
    "fields",
    [
        {"n_kv_heads": 2, "qk_norm": True},
        {"layer_pattern": "LG", "sliding_window": 16, "attn_softcap": 20.0, "final_softcap": 10.0},
        {"moe_experts": 8, "moe_top_k": 2, "moe_expert_hidden": 64},
        {**MLA, "moe_experts": 8, "moe_score": "sigmoid", "moe_expert_hidden": 64},
    ],
)
def test_cuda_graph_decode_equals_reference(make_random_model, fields):
    model = make_random_model(vocab_size=512, **SMALL, **fields)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.mul_(4)
    model = model.cuda()
    g = torch.Generator().manual_seed(0)
    # Spans cross the 128-token graph buckets; 6 prompts in 4 slots refill slots.
    prompts = [torch.randint(0, 512, (n,), generator=g).tolist() for n in (5, 120, 30, 1, 77, 9)]
    params = SamplingParams(max_new_tokens=150, temperature=0)
    # Grouped-matmul experts run in bf16 on GPU (autocast); the rest in float32.
    moe = "moe_experts" in fields
    with torch.autocast("cuda", torch.bfloat16, enabled=moe):
        graphs = generate(model, prompts, params, max_batch=4)
        eager = generate(model, prompts, params, max_batch=4, cuda_graphs=False)
        ref = generate_reference(model, prompts[:2], params)
        again = generate(model, prompts, params, max_batch=4)  # the kept engine's graphs
    assert [c.ids for c in graphs] == [c.ids for c in eager]
    assert [c.ids for c in again] == [c.ids for c in graphs]
    # bf16 rounding (cache vs recompute) may flip a late near-tie: compare the first tokens.
    keep = 8 if moe else 150
    assert [c.ids[:keep] for c in graphs[:2]] == [c.ids[:keep] for c in ref]


def test_compiled_step_and_bf16_autocast(make_random_model):
    model = make_random_model(vocab_size=512, **SMALL, n_kv_heads=2).cuda()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.mul_(4)
    prompts = [[1, 2, 3], list(range(40))]
    params = SamplingParams(max_new_tokens=40, temperature=0)
    plain = generate(model, prompts, params, cuda_graphs=False)
    compiled = generate(model, prompts, params, compile=True)
    assert [c.ids for c in compiled] == [c.ids for c in plain]
    with torch.autocast("cuda", torch.bfloat16):
        bf16 = generate(model, prompts, params)
        ref = generate_reference(model, prompts, params)
    # bf16 rounding may flip a late near-tie; the first tokens agree.
    assert [c.ids[:8] for c in bf16] == [c.ids[:8] for c in ref]
    sampled = SamplingParams(max_new_tokens=20, temperature=0.8, top_p=0.9, seed=1)
    assert [c.ids for c in generate(model, prompts, sampled)] == [
        c.ids for c in generate(model, prompts, sampled)
    ]


@pytest.mark.parametrize("softcap", [None, 30.0])
def test_flex_decode_attention_equals_sdpa(softcap):
    """The compiled step's FlexAttention decode kernel against the masked path eager steps run,
    with per-sequence lengths (GQA, bf16)."""
    from frontierlm.model.attention import attend_cached

    torch.manual_seed(0)
    batch, heads, kv_heads, dim, kv_len = 16, 32, 8, 64, 384
    q = torch.randn(batch, heads, 1, dim, device="cuda", dtype=torch.bfloat16)
    keys = torch.randn(batch, kv_heads, kv_len, dim, device="cuda", dtype=torch.bfloat16)
    values = torch.randn_like(keys)
    lengths = torch.randint(1, kv_len + 1, (batch,), device="cuda")
    mask = (torch.arange(kv_len, device="cuda") < lengths[:, None])[:, None, None, :]
    eager = attend_cached(q, keys, values, mask, None, softcap)
    compiled = torch.compile(attend_cached)(q, keys, values, mask, None, softcap)
    assert compiled.shape == eager.shape == (batch, heads, 1, dim)
    assert (compiled.float() - eager.float()).abs().max().item() < 2e-2


def test_smaller_batch_reuses_the_engine(make_random_model):
    """A call with fewer prompts runs in the kept engine's slots (idle ones included) and still
    gives each prompt the tokens it gets alone."""
    from frontierlm.inference import engine as engine_module

    model = make_random_model(vocab_size=512, **SMALL, n_kv_heads=2).cuda()
    params = SamplingParams(max_new_tokens=40, temperature=0)
    prompts = [[3, 4, 5], [9] * 20, [100, 7], [1], [42] * 3]
    generate(model, prompts, params, max_batch=4)
    engine = engine_module._ENGINES[model]
    few = generate(model, prompts[:2], params, max_batch=4)
    assert engine_module._ENGINES[model] is engine and engine.slots == 4
    assert [c.ids for c in few] == [c.ids for c in generate_reference(model, prompts[:2], params)]
