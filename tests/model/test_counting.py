import pytest
import torch

from frontierlm.config import ModelConfig
from frontierlm.model import Transformer
from frontierlm.train.losses import z_loss


@pytest.mark.parametrize("tie,kv", [(True, 4), (False, 2)])
def test_flops_per_token_by_hand(tie, kv):
    cfg = ModelConfig(d_model=64, n_layers=2, n_heads=4, n_kv_heads=kv, tie_embeddings=tie)
    model = Transformer(cfg, vocab_size=300)
    d, hd, hidden = 64, 16, cfg.hidden
    per_layer = d * 4 * hd + 2 * d * kv * hd + 4 * hd * d + 3 * d * hidden  # q, k, v, o, MLP
    matmul = 2 * per_layer + d * 300  # plus the output head
    assert model.flops_per_token(128) == 6 * matmul + 6 * 2 * 128 * 4 * hd
    # Tied or not, the head is a matmul; only the parameter count differs.
    assert model.num_params() == matmul + 300 * d * (0 if tie else 1) + 2 * 2 * d + d


def test_z_loss_is_the_mean_squared_log_partition():
    logits = torch.randn(2, 5, 11) * 3 + 4
    expected = (torch.logsumexp(logits, -1) ** 2).mean()
    assert z_loss(logits).item() == pytest.approx(expected.item(), rel=1e-6)
    # Its gradient pulls the log-partition toward 0.
    logits.requires_grad_(True)
    z_loss(logits).backward()
    with torch.no_grad():
        assert z_loss(logits - 0.1 * logits.grad) < z_loss(logits)
