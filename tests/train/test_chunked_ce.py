"""The chunked cross-entropy equals the plain loss and its gradients (fp32, within 1e-5)."""

import pytest
import torch
import torch.nn.functional as F

from frontierlm.config import ModelConfig
from frontierlm.model import Transformer
from frontierlm.train.losses import chunked_cross_entropy, model_token_losses


def plain(hidden, weight, targets, softcap):
    logits = hidden @ weight.t()
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    return F.cross_entropy(
        logits.float().reshape(-1, weight.shape[0]), targets.reshape(-1), reduction="none"
    ).view(targets.shape)


@pytest.mark.parametrize("softcap", [None, 30.0, 5.0])
@pytest.mark.parametrize("chunk_tokens", [7, 64, None])  # uneven chunks, one chunk, default
def test_equals_plain_loss_and_gradients(softcap, chunk_tokens):
    gen = torch.Generator().manual_seed(0)
    batch, seq, d, vocab = 3, 17, 24, 301
    hidden = torch.randn(batch, seq, d, generator=gen) * 2
    weight = torch.randn(vocab, d, generator=gen) * 0.5
    targets = torch.randint(0, vocab, (batch, seq), generator=gen)
    targets[0, :5] = -100  # ignored positions: loss 0, no gradient
    targets[2, -3:] = -100
    upstream = torch.rand(batch, seq, generator=gen)  # a weighted sum, like a loss mask

    results = []
    for fn in (plain, lambda *a: chunked_cross_entropy(*a, chunk_tokens=chunk_tokens)):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        losses = fn(h, w, targets, softcap)
        (losses * upstream).sum().backward()
        results.append((losses.detach(), h.grad, w.grad))
    (ref_loss, ref_gh, ref_gw), (loss, gh, gw) = results
    assert loss.dtype == torch.float32 and loss.shape == targets.shape
    assert (loss[targets == -100] == 0).all()
    torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gh, ref_gh, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gw, ref_gw, atol=1e-5, rtol=1e-5)
    assert gh.abs().sum() > 0 and gw.abs().sum() > 0
    # Ignored targets pass no gradient to their hidden state.
    assert gh[0, :5].abs().max() == 0


def test_model_forward_with_targets_equals_logits_path():
    """Through the model (Gemma-style final softcap): the same losses and parameter gradients."""
    torch.manual_seed(0)
    cfg = ModelConfig(d_model=32, n_layers=2, n_heads=2, max_seq_len=32, final_softcap=15.0)
    model = Transformer(cfg, 97)
    batch = {"input_ids": torch.randint(0, 97, (2, 16)), "targets": torch.randint(0, 97, (2, 16))}
    batch["targets"][1, :4] = -100
    grads = []
    for chunked in (False, True):
        model.zero_grad()
        losses = model_token_losses(model, batch, chunked=chunked)
        mask = batch["targets"] != -100
        (losses * mask).sum().backward()
        grads.append((losses.detach() * mask, [p.grad.clone() for p in model.parameters()]))
    torch.testing.assert_close(grads[0][0], grads[1][0], atol=1e-5, rtol=1e-5)
    for a, b in zip(grads[0][1], grads[1][1], strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_bf16_autocast_is_close_to_plain():
    """Under bf16 autocast the matmuls run in bf16 like the plain head; reductions in fp32."""
    gen = torch.Generator().manual_seed(1)
    hidden = torch.randn(64, 32, generator=gen)
    weight = torch.randn(500, 32, generator=gen) * 0.2
    targets = torch.randint(0, 500, (64,), generator=gen)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = F.cross_entropy(F.linear(hidden, weight).float(), targets, reduction="none")
        out = chunked_cross_entropy(hidden, weight, targets, chunk_tokens=10)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
