"""Mixture of experts: routing, mixing, balance losses and bias balancing, against direct loops."""

import pytest
import torch
import torch.nn.functional as F

from frontierlm.config import ModelConfig
from frontierlm.model import Transformer
from frontierlm.model.moe import MoE


def make_moe(**fields) -> MoE:
    torch.manual_seed(0)
    cfg = ModelConfig(**{"d_model": 32, "n_heads": 2, "moe_experts": 6, "moe_top_k": 2, **fields})
    moe = MoE(cfg)
    for w in (moe.gate_up_proj, moe.down_proj):
        torch.nn.init.normal_(w, 0.0, 0.2)
    return moe


def naive_choice(moe: MoE, choice: list[float]) -> list[int]:
    """The top-k experts by choice score; with groups, only within the best groups, a group
    scoring the sum of its two best choice scores (DeepSeek-V3)."""
    allowed = range(moe.n_experts)
    if moe.groups > 1:
        size = moe.n_experts // moe.groups
        members = [list(range(g * size, (g + 1) * size)) for g in range(moe.groups)]
        group_score = [sum(sorted(choice[e] for e in m)[-2:]) for m in members]
        best = sorted(range(moe.groups), key=lambda g: group_score[g])[-moe.topk_groups :]
        allowed = [e for g in best for e in members[g]]
    return sorted(allowed, key=lambda e: choice[e])[-moe.top_k :]


def naive(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """Token by token: the chosen experts' outputs, weighted by their (renormalised, scaled)
    scores, plus the shared experts."""
    out = torch.zeros_like(x)
    for t, token in enumerate(x):
        logits = moe.router(token)
        scores = logits.softmax(-1) if moe.score == "softmax" else logits.sigmoid()
        biased = moe.balance in ("bias", "smebu")
        choice = scores + (moe.selection_bias if biased else 0)
        chosen = torch.tensor(naive_choice(moe, choice.tolist()))
        weights = scores[chosen] / scores[chosen].sum() if moe.norm_topk else scores[chosen]
        weights = weights * moe.routed_scale
        for w, e in zip(weights, chosen.tolist(), strict=True):
            gate, up = (moe.gate_up_proj[e] @ token).chunk(2)
            out[t] += w * (moe.down_proj[e] @ (F.silu(gate) * up))
        if moe.shared is not None:
            out[t] += moe.shared(token)
    return out


@pytest.mark.parametrize(
    "fields",
    [
        {},
        {"moe_score": "sigmoid", "moe_shared_experts": 1},
        {"moe_balance": "bias"},
        {"moe_norm_topk": False},
        {"moe_routed_scale": 2.5, "moe_shared_experts": 1},
        # DeepSeek-V3's routing: sigmoid, bias, groups, no renormalisation, scaled
        {
            "moe_experts": 12,
            "moe_top_k": 3,
            "moe_expert_hidden": 16,
            "moe_groups": 4,
            "moe_topk_groups": 2,
            "moe_score": "sigmoid",
            "moe_balance": "bias",
            "moe_norm_topk": False,
            "moe_routed_scale": 2.5,
        },
        {"moe_experts": 8, "moe_top_k": 2, "moe_groups": 4, "moe_topk_groups": 1},
    ],
)
def test_moe_equals_token_by_token_loop(fields):
    moe = make_moe(**fields)
    if moe.balance == "bias":  # a bias that changes choices, not weights
        moe.selection_bias.copy_(torch.linspace(-0.3, 0.3, moe.n_experts))
    x = torch.randn(2, 9, 32)
    with torch.no_grad():
        ours = moe(x)
        ref = naive(moe, x.view(-1, 32)).view(2, 9, 32)
    assert torch.allclose(ours, ref, atol=1e-5), (ours - ref).abs().max()


def test_aux_loss_is_switch_formula_and_one_when_uniform():
    moe = make_moe()
    x = torch.randn(64, 32)
    moe(x)
    scores = moe.router(x).softmax(-1)
    chosen = scores.topk(2).indices
    share = torch.bincount(chosen.flatten(), minlength=6).float() / chosen.numel()
    expected = 0.01 * 6 * (share * scores.mean(0)).sum()  # moe_aux_weight 0.01 applied
    assert moe.aux_loss.item() == pytest.approx(expected.item(), rel=1e-5)
    with torch.no_grad():
        moe.router.weight.zero_()  # uniform probabilities: the loss is exactly 1 (x weight)
    moe(x)
    assert moe.aux_loss.item() == pytest.approx(0.01, rel=1e-5)
    moe.eval()
    moe(x)
    assert moe.aux_loss is None  # only training forwards carry it


def test_sequence_wise_aux_loss_is_deepseek_v3_formula():
    # DeepSeek-V3 eq. 17-20: per sequence, f_i = N / (K T) * #tokens choosing i, P_i = mean of
    # the normalised scores s_i / sum_j s_j; loss = alpha * sum_i f_i P_i, averaged over sequences.
    moe = make_moe(moe_balance="bias", moe_score="sigmoid", moe_seq_aux_weight=0.5)
    x = torch.randn(3, 10, 32)
    moe(x)
    expected = []
    for seq in x:
        scores = moe.router(seq).sigmoid()
        chosen = scores.topk(2).indices
        f = 6 / (2 * 10) * torch.bincount(chosen.flatten(), minlength=6).float()
        p = (scores / scores.sum(-1, keepdim=True)).mean(0)
        expected.append(0.5 * (f * p).sum())
    assert moe.aux_loss.item() == pytest.approx(torch.stack(expected).mean().item(), rel=1e-5)
    # A sequence sent entirely to two experts scores N / K, however balanced the batch.
    with torch.no_grad():
        moe.router.weight[:2] = 5.0
        moe.router.weight[2:] = -5.0
    moe(torch.rand(2, 10, 32) + 1)
    assert moe.aux_loss.item() == pytest.approx(0.5 * 6 / 2, rel=1e-2)


def test_gradients_equal_the_token_by_token_loop():
    moe = make_moe(moe_shared_experts=1)
    x = torch.randn(4, 8, 32, requires_grad=True)
    upstream = torch.randn(4, 8, 32)
    (moe(x) * upstream).sum().backward()
    ours = [moe.gate_up_proj.grad, moe.down_proj.grad, moe.router.weight.grad, x.grad]
    ref_moe = make_moe(moe_shared_experts=1)  # same seed: same weights
    x_ref = x.detach().clone().requires_grad_()
    (naive(ref_moe, x_ref.view(-1, 32)).view(4, 8, 32) * upstream).sum().backward()
    refs = [ref_moe.gate_up_proj.grad, ref_moe.down_proj.grad, ref_moe.router.weight.grad]
    for got, want in zip(ours, [*refs, x_ref.grad], strict=True):
        assert want.abs().sum() > 0
        assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()


@pytest.mark.parametrize("balance,rate", [("bias", 0.003), ("smebu", 0.01)])
def test_bias_balancing_evens_out_a_skewed_router(balance, rate):
    # Sigmoid scores with the bias, as DeepSeek-V3 (with peaked softmax scores and tokens this
    # alike, one bias step moves every token at once and the load oscillates instead).
    moe = make_moe(moe_balance=balance, moe_score="sigmoid")
    with torch.no_grad():
        moe.router.weight[0] += 0.5  # expert 0 is everyone's favourite
    x = torch.randn(256, 32) + 1.0
    history = []
    with torch.no_grad():
        for _ in range(300):
            moe(x)
            history.append(moe.balance_step(rate=rate)["max_over_mean_load"])
    settled = sum(history[-50:]) / 50
    assert history[0] == 3.0 and settled < 1.1, (history[0], settled)
    # The biases steered the choice; the router weights themselves did not move.
    assert moe.selection_bias[0] < 0


def test_transformer_counts_active_parameters_and_flops():
    cfg = ModelConfig(
        d_model=32,
        n_layers=3,
        n_heads=2,
        moe_experts=8,
        moe_top_k=2,
        moe_shared_experts=1,
        moe_first_dense=1,
        moe_expert_hidden=16,
    )
    model = Transformer(cfg, vocab_size=50)
    assert [type(layer.mlp).__name__ for layer in model.layers] == ["SwiGLU", "MoE", "MoE"]
    per_expert = 3 * 32 * 16  # gate, up and down
    assert model.num_params() - model.active_params() == 2 * (8 - 2) * per_expert
    dense = Transformer(ModelConfig(d_model=32, n_layers=3, n_heads=2), vocab_size=50)
    # Each MoE layer swaps a dense MLP for router + shared + top-k experts in the FLOP count.
    mlp = 3 * 32 * cfg.hidden
    moe_active = 32 * 8 + per_expert * (1 + 2)
    expected = dense.flops_per_token(16) + 6 * 2 * (moe_active - mlp)
    assert model.flops_per_token(16) == expected
    with pytest.raises(ValueError, match="moe_top_k=9 exceeds moe_experts=8"):
        ModelConfig(moe_experts=8, moe_top_k=9)


def test_bias_step_follows_the_learning_rate_when_asked():
    moves = {}
    for schedule in ("constant", "lr"):
        cfg = ModelConfig(
            d_model=32,
            n_layers=1,
            n_heads=2,
            moe_experts=4,
            moe_top_k=1,
            moe_balance="bias",
            moe_bias_rate=0.1,
            moe_bias_schedule=schedule,
        )
        model = Transformer(cfg, vocab_size=20).train()
        model(torch.randint(0, 20, (2, 16)))
        model.after_optimizer_step(lr_scale=0.25)
        moves[schedule] = model.moe_layers()[0].selection_bias.abs().max().item()
    assert moves["constant"] == pytest.approx(0.1) and moves["lr"] == pytest.approx(0.025)


def test_evaluation_forwards_count_expert_load_apart_from_training():
    cfg = ModelConfig(d_model=32, n_layers=2, n_heads=2, moe_experts=4, moe_top_k=2)
    model = Transformer(cfg, vocab_size=20).eval()
    with torch.no_grad():
        model(torch.randint(0, 20, (2, 16)))
    stats = model.eval_expert_load()
    assert set(stats) == {"moe0_max_over_mean_load", "moe1_max_over_mean_load"}
    assert all(1.0 <= v <= 2.0 for v in stats.values())  # at most 4 experts / top-2 = 2
    assert all(m.load.sum() == 0 for m in model.moe_layers())  # training count untouched
    assert model.eval_expert_load() == {}  # reset by the read


def test_windowed_load_pools_the_last_steps():
    moe = make_moe()
    # Step 1 all on expert 0, step 2 all on expert 1: each step alone is maximally skewed,
    # together they are half as skewed.
    for expert in (0, 1):
        moe.load.zero_()
        moe.load[expert] = 10.0
        stats = moe.balance_step(rate=0.0)
    assert stats["max_over_mean_load"] == pytest.approx(6.0)
    assert stats["max_over_mean_load_20steps"] == pytest.approx(3.0)


def test_group_limit_keeps_choices_within_the_best_groups():
    fields = {"moe_experts": 16, "moe_top_k": 4, "moe_score": "sigmoid"}
    grouped = make_moe(**fields, moe_groups=4, moe_topk_groups=2)
    free = make_moe(**fields)  # same seed: same router
    x = torch.randn(200, 32)
    with torch.no_grad():
        logits = grouped.router(x)
        choice = grouped._within_best_groups(logits.sigmoid())
    kept_groups = choice.isfinite().view(200, 4, 4).all(-1)
    assert (kept_groups.sum(-1) == 2).all()
    # The groups kept are the two with the best sums of their two best scores.
    top2 = logits.sigmoid().view(200, 4, 4).topk(2, -1).values.sum(-1)
    assert torch.equal(
        kept_groups, torch.zeros_like(kept_groups).scatter(1, top2.topk(2).indices, True)
    )
    # The limit binds: unrestricted top-4 often spans more than two groups.
    spans = torch.stack(
        [(free.router(x).sigmoid().topk(4).indices // 4 == g).any(-1) for g in range(4)]
    )
    assert (spans.sum(0) > 2).any()


def test_routed_scale_and_topk_normalisation():
    x = torch.randn(2, 7, 32)
    base = {"moe_score": "sigmoid", "moe_shared_experts": 1}
    with torch.no_grad():
        plain = make_moe(**base)
        shared = plain.shared(x)
        routed = plain(x) - shared
        scaled = make_moe(**base, moe_routed_scale=2.5)
        # Only the routed part is scaled, not the shared experts.
        assert torch.allclose(scaled(x) - shared, 2.5 * routed, atol=1e-5)
        # Without renormalisation, weights are the raw sigmoid scores: the routed output is
        # the normalised one times the chosen scores' sum.
        raw = make_moe(**base, moe_norm_topk=False)
        tokens = x.view(-1, 32)
        chosen_sum = raw.router(tokens).sigmoid().topk(2).values.sum(-1).view(2, 7, 1)
        assert torch.allclose(raw(x) - shared, routed * chosen_sum, atol=1e-5)


@pytest.mark.parametrize(
    "fields,message",
    [
        ({"moe_groups": 4}, "moe_groups=4 must divide moe_experts=6"),
        ({"moe_groups": 6}, "leaves 1 expert per group"),
        ({"moe_groups": 3, "moe_topk_groups": 4}, "moe_topk_groups=4 exceeds moe_groups=3"),
        ({"moe_groups": 3, "moe_top_k": 3}, "moe_top_k=3 exceeds the 2 experts"),
    ],
)
def test_group_settings_are_validated(fields, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig(**{"moe_experts": 6, "moe_top_k": 2, **fields})
