"""Muon: the same steps as torch.optim.Muon on matrices, stacks orthogonalised per matrix, and
the parameter split between Muon and AdamW."""

import pytest
import torch

from frontierlm.config import ModelConfig, PretrainConfig
from frontierlm.model import Transformer
from frontierlm.train.optim import Muon, Optimizers, build_optimizer, orthogonalise


def test_muon_steps_equal_torch_muon_with_adamw_rms_matching():
    torch.manual_seed(0)
    shapes = [(64, 32), (32, 96), (48, 48)]
    ours = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    opt_ours = Muon(ours, lr=0.02, weight_decay=0.1)
    opt_theirs = torch.optim.Muon(theirs, lr=0.02, weight_decay=0.1, adjust_lr_fn="match_rms_adamw")
    for _ in range(4):
        for a, b in zip(ours, theirs, strict=True):
            a.grad = torch.randn_like(a)
            b.grad = a.grad.clone()
        opt_ours.step()
        opt_theirs.step()
    for a, b in zip(ours, theirs, strict=True):
        assert torch.equal(a, b)


def test_a_stack_of_matrices_is_orthogonalised_matrix_by_matrix():
    torch.manual_seed(1)
    stack = torch.randn(3, 40, 24)
    together = orthogonalise(stack).float()
    for i in range(3):
        alone = orthogonalise(stack[i]).float()
        assert torch.allclose(together[i], alone, atol=2e-2)
    # Near-orthogonal columns: singular values in Newton-Schulz's (0.5, 1.5) band, not the
    # input's spread.
    singular = torch.linalg.svdvals(together)
    assert singular.min() > 0.4 and singular.max() < 1.6
    assert torch.linalg.svdvals(stack).max() / torch.linalg.svdvals(stack).min() > 3


def test_muon_takes_hidden_matrices_and_adamw_the_rest():
    model = Transformer(
        ModelConfig(
            d_model=32,
            n_layers=2,
            n_heads=2,
            moe_experts=4,
            moe_first_dense=1,
            tie_embeddings=False,
        ),
        50,
    )
    optimizer = build_optimizer(model, PretrainConfig(optimizer="muon", lr=1e-3))
    assert isinstance(optimizer, Optimizers)
    names = {id(p): n for n, p in model.named_parameters()}
    muon = {names[id(p)] for g in optimizer.optimizers["muon"].param_groups for p in g["params"]}
    adamw = {names[id(p)] for g in optimizer.optimizers["adamw"].param_groups for p in g["params"]}
    assert not muon & adamw and muon | adamw == set(names.values())
    assert "layers.1.mlp.gate_up_proj" in muon  # a stack of expert matrices
    assert "layers.0.self_attn.q_proj.weight" in muon
    assert {"embed_tokens.weight", "lm_head.weight", "norm.weight"} <= adamw
    assert all(g["lr"] == 1e-3 for g in optimizer.param_groups)
    with pytest.raises(ValueError, match="checkpoint holds optimizer state"):
        optimizer.load_state_dict({"adamw": {}})
