"""The GPU-only code paths give the CPU paths' results: compiled FlexAttention (document masks,
sliding windows, softcapping, attention scale) against masked SDPA / explicit softmax on CPU,
and grouped-matmul MoE experts in bf16 against the float32 CPU computation.

These need a CUDA GPU; CI has none. Run them on the device machine:
`python -m pytest tests/gpu -m gpu`."""

from __future__ import annotations

import pytest
import torch

from frontierlm.train.losses import token_cross_entropy

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (device machine)"),
]

BOS = 0


def rel_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float().cpu() - want.float()).abs().max() / want.abs().max()).item()


def packed_batch(vocab: int, seq: int, batch: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(3)
    ids = torch.randint(1, vocab, (batch, seq))
    ids[:, torch.tensor([0, 37, 90, 200])] = BOS  # four documents per row
    return ids, (ids == BOS).cumsum(dim=1)


@pytest.mark.parametrize(
    "fields",
    [
        {},
        {"n_kv_heads": 2, "qk_norm": True},
        {"layer_pattern": "LG", "sliding_window": 64},
        {"attn_softcap": 5.0, "final_softcap": 3.0, "attn_scale": 0.1},
        {"norm": "sandwich", "embed_scale": True, "mlp_activation": "gelu_tanh"},
        # MLA: head dims below FlexAttention's GPU minimum of 16 and a v width unlike q/k's.
        {
            "attention": "mla",
            "mla_q_lora_rank": 48,
            "mla_kv_lora_rank": 32,
            "mla_qk_nope_head_dim": 16,
            "mla_qk_rope_head_dim": 8,
            "mla_v_head_dim": 12,
            "layer_pattern": "LG",
            "sliding_window": 64,
        },
    ],
)
@pytest.mark.parametrize("document_mask", [False, True])
def test_flex_on_gpu_equals_cpu_path(make_random_model, fields, document_mask):
    model = make_random_model(
        vocab_size=300, d_model=128, n_layers=2, n_heads=4, max_seq_len=256, **fields
    )
    ids, doc_ids = packed_batch(300, 256)
    doc_ids = doc_ids if document_mask else None
    with torch.no_grad():
        want = model(ids, doc_ids)
        cuda = model.to("cuda")
        got = cuda(ids.cuda(), None if doc_ids is None else doc_ids.cuda())
    assert rel_error(got, want) < 2e-3


def test_document_masked_training_step_on_gpu_matches_cpu(make_random_model):
    """Forward and backward through FlexAttention's compiled kernel: same loss and gradients."""
    model = make_random_model(vocab_size=300, d_model=128, n_layers=2, n_heads=4, max_seq_len=256)
    ids, doc_ids = packed_batch(300, 257)
    grads = {}
    for device in ("cpu", "cuda"):
        model.to(device).zero_grad()
        logits = model(ids[:, :-1].to(device), doc_ids[:, :-1].to(device))
        loss = token_cross_entropy(logits, ids[:, 1:].to(device)).mean()
        loss.backward()
        grads[device] = (
            loss.item(),
            {n: p.grad.detach().to("cpu", copy=True) for n, p in model.named_parameters()},
        )
    assert grads["cuda"][0] == pytest.approx(grads["cpu"][0], rel=1e-4)
    for name, want in grads["cpu"][1].items():
        assert rel_error(grads["cuda"][1][name], want) < 5e-3, name


@pytest.mark.parametrize("shared", [0, 1])
def test_grouped_mm_moe_in_bf16_matches_float32(shared):
    from frontierlm.config import ModelConfig
    from frontierlm.model.moe import MoE

    torch.manual_seed(0)
    cfg = ModelConfig(
        d_model=256,
        n_heads=2,
        moe_experts=16,
        moe_top_k=4,
        moe_expert_hidden=128,
        moe_shared_experts=shared,
        moe_score="sigmoid",
        moe_balance="bias",
    )
    moe = MoE(cfg)
    for p in (moe.gate_up_proj, moe.down_proj):
        torch.nn.init.normal_(p, 0.0, 0.05)
    x = torch.randn(4, 128, 256)
    upstream = torch.randn(4, 128, 256)
    moe(x).mul(upstream).sum().backward()
    want = {n: p.grad.clone() for n, p in moe.named_parameters()}
    want_out = moe(x).detach()
    moe.zero_grad()
    moe.cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = moe(x.cuda())
    out.float().mul(upstream.cuda()).sum().backward()
    # bf16 expert matmuls; the per-token sum of the slots comes out in float32 (autocast).
    assert rel_error(out, want_out) < 2e-2  # bf16 inputs: ~3 significant digits
    for name, grad in want.items():
        assert rel_error(moe.get_parameter(name).grad, grad) < 3e-2, name


@pytest.mark.parametrize("scaling", ["tensorwise", "rowwise"])
@pytest.mark.parametrize("backward", ["e5m2", "e4m3"])
def test_fp8_linear_on_gpu_matches_float32(scaling, backward):
    from torch import nn

    from frontierlm.train.fp8 import convert_to_float8

    torch.manual_seed(0)
    layer = nn.Linear(256, 512, bias=False).cuda()
    reference = nn.Linear(256, 512, bias=False).cuda()
    reference.load_state_dict(layer.state_dict())
    convert_to_float8(nn.ModuleList([layer]), scaling, backward)
    x = torch.randn(1024, 256, device="cuda", requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    upstream = torch.randn(1024, 512, device="cuda")
    (layer(x).float() * upstream).sum().backward()
    (reference(x_ref) * upstream).sum().backward()
    assert rel_error(x.grad, x_ref.grad.cpu()) < 0.1
    assert rel_error(layer.weight.grad, reference.weight.grad.cpu()) < 0.1


def test_plain_causal_attention_runs_cudnn_on_hopper(make_random_model):
    """The causal path asks SDPA for cuDNN's kernel first on Hopper: check it ran, and that it
    gives the float32 CPU result."""
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("cuDNN attention is preferred on Hopper and newer only")
    model = make_random_model(vocab_size=300, d_model=256, n_layers=2, n_heads=2, max_seq_len=256)
    ids = torch.randint(0, 300, (2, 256))
    with torch.no_grad():
        want = model(ids)
    model.cuda()
    cpu_ops = [torch.profiler.ProfilerActivity.CPU]
    with (
        torch.profiler.profile(activities=cpu_ops) as prof,
        torch.no_grad(),
        torch.autocast("cuda", dtype=torch.bfloat16),
    ):
        got = model(ids.cuda())
    ops = {event.key for event in prof.key_averages()}
    assert "aten::_scaled_dot_product_cudnn_attention" in ops
    assert rel_error(got, want) < 3e-2  # bf16 autocast against float32


def test_compiled_checkpointed_training_step_on_gpu_matches_cpu(make_random_model):
    """Regional compile, selective activation checkpointing, cuDNN attention and the compiled
    loss, in bf16 on the GPU: the loss and gradients of the float32 eager CPU step."""
    from frontierlm.train.parallel import apply_activation_checkpointing, apply_compile

    model = make_random_model(vocab_size=300, d_model=256, n_layers=2, n_heads=2, max_seq_len=256)
    ids = torch.randint(0, 300, (4, 257))
    loss = token_cross_entropy(model(ids[:, :-1]), ids[:, 1:]).mean()
    loss.backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.cuda()
    apply_activation_checkpointing(model, "selective")
    apply_compile(model, torch.device("cuda"), "blocks")
    try:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            got = token_cross_entropy(model(ids[:, :-1].cuda()), ids[:, 1:].cuda()).mean()
        got.backward()
    finally:
        apply_compile(model, torch.device("cpu"), "none")
    assert got.item() == pytest.approx(loss.item(), rel=1e-2)
    for name, grad in want.items():
        assert rel_error(model.get_parameter(name).grad, grad) < 5e-2, name
