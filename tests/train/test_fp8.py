"""FP8 linear layers: quantisation, forward and backward against float32, and a short training
run against bf16 (torch._scaled_mm runs on CPU too, emulated)."""

import pytest
import torch
from torch import nn

from frontierlm.config import ModelConfig
from frontierlm.model import Transformer
from frontierlm.train.fp8 import E4M3, E5M2, Float8Linear, convert_to_float8, quantize


def rel_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want).norm() / want.norm()).item()


@pytest.mark.parametrize("rowwise", [False, True])
def test_quantize_uses_the_range_and_round_trips_to_format_precision(rowwise):
    torch.manual_seed(0)
    t = torch.randn(64, 128) * torch.logspace(-4, 2, 64)[:, None]  # rows 6 decades apart
    for dtype, tolerance in ((E4M3, 0.07), (E5M2, 0.13)):
        q, inverse = quantize(t, dtype, rowwise)
        assert q.dtype == dtype
        assert q.float().abs().max() == torch.finfo(dtype).max  # the largest value lands on max
        back = q.float() * inverse
        # Relative error per element bounded by the mantissa (3 bits e4m3, 2 bits e5m2) where
        # the value is not tiny against its scale.
        big = (
            t.abs() > t.abs().amax(-1, keepdim=True) * 1e-2
            if rowwise
            else t.abs() > 1e-2 * t.abs().max()
        )
        assert ((back - t).abs() / t.abs())[big].max() < tolerance
    # Rowwise keeps the small rows accurate; one tensor-wide scale flushes them towards zero.
    q_row, s_row = quantize(t, E4M3, True)
    q_all, s_all = quantize(t, E4M3, False)
    small = slice(0, 8)
    assert rel_error(q_row.float()[small] * s_row[small], t[small]) < 0.05
    assert rel_error(q_all.float()[small] * s_all, t[small]) > 0.2


@pytest.mark.parametrize("scaling", ["tensorwise", "rowwise"])
@pytest.mark.parametrize("backward", ["e5m2", "e4m3"])
def test_float8_linear_matches_float32_forward_and_backward(scaling, backward):
    torch.manual_seed(1)
    layer = nn.Linear(64, 48, bias=False)
    reference = nn.Linear(64, 48, bias=False)
    reference.load_state_dict(layer.state_dict())
    convert_to_float8(nn.ModuleList([layer]), scaling, backward)
    assert isinstance(layer, Float8Linear)
    x = torch.randn(4, 32, 64, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    upstream = torch.randn(4, 32, 48)
    out = layer(x)
    out_ref = reference(x_ref)
    (out.float() * upstream).sum().backward()
    (out_ref * upstream).sum().backward()
    assert out.dtype == torch.bfloat16
    assert rel_error(out, out_ref) < 0.05
    assert rel_error(x.grad, x_ref.grad) < 0.08
    assert rel_error(layer.weight.grad, reference.weight.grad) < 0.08
    assert layer.weight.grad.dtype == torch.float32  # master gradients stay fp32


def test_conversion_keeps_head_embedding_router_and_odd_shapes_in_bf16():
    cfg = ModelConfig(
        d_model=64, n_layers=2, n_heads=4, tie_embeddings=False, moe_experts=4, moe_first_dense=1
    )
    model = Transformer(cfg, vocab_size=96)
    kept = convert_to_float8(model)
    assert isinstance(model.layers[0].self_attn.q_proj, Float8Linear)
    assert isinstance(model.layers[0].mlp.gate_proj, Float8Linear)
    assert not isinstance(model.lm_head, Float8Linear)
    assert any(k.startswith("lm_head") for k in kept)
    assert any(k.startswith("layers.1.mlp.router") for k in kept)
    # Same parameter names: checkpoints and exports do not see the conversion.
    assert set(model.state_dict()) == set(Transformer(cfg, vocab_size=96).state_dict())


def test_fp8_training_tracks_bf16(tmp_path):
    """The loop's fp8 precision: a short run ends within 2% of the bf16 run's loss."""
    import numpy as np

    from frontierlm.config import PretrainConfig
    from frontierlm.train.loop import TrainTask, train
    from frontierlm.train.pretrain import ShuffledWindows, lm_loss

    tokens = np.tile(np.arange(96, dtype=np.uint16), 80)
    windows = ShuffledWindows(tokens, 32, 8, seed=0)
    val = windows(10_000)
    finals = {}
    for precision in ("bf16", "fp8"):
        torch.manual_seed(0)
        model = Transformer(ModelConfig(d_model=64, n_layers=2, n_heads=4, max_seq_len=32), 96)
        loop = PretrainConfig(
            steps=40,
            batch_size=8,
            seq_len=32,
            lr=3e-3,
            warmup_steps=4,
            precision=precision,
            eval_every=40,
            checkpoint_every=40,
        )
        task = TrainTask("t", windows, lm_loss, lambda m: {"loss": lm_loss(m, val)[0].item()})
        finals[precision] = train(model, loop, task, tmp_path / precision, torch.device("cpu"))
    assert finals["fp8"]["train_loss"] == pytest.approx(finals["bf16"]["train_loss"], rel=0.02)
