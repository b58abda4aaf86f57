"""Every preference loss and its rewards against TRL 1.16 itself, within 1e-6, on random inputs.

TRL's own code is called, not a re-implementation: the trainers are built with
`object.__new__` (no model, no dataset, no accelerate state) and given only the attributes their
loss methods read.
  pair losses  DPOTrainer._compute_loss on a stand-in model whose per-token log-probs are the
               random inputs (TRL sums them per completion), with precomputed reference
               log-probs; per-example losses by calling it one example at a time.
  cDPO         TRL 1.16's DPO "sigmoid" has no label smoothing; the conservative form with
               label smoothing is checked against CPOTrainer.cpo_loss(loss_type="sigmoid"), which
               is the same formula on (policy - reference) log-ratios.
  kto          KTOTrainer._compute_loss with precomputed reference log-probs and KL completions.
  orpo         ORPOTrainer.odds_ratio_loss (TRL's total loss is nll - mean of its output).
  simpo        CPOTrainer.cpo_loss with loss_type="simpo".
"""

from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
from trl import DPOTrainer, KTOTrainer  # a declared test dependency (pyproject's dev extra)
from trl.experimental.cpo import CPOTrainer
from trl.experimental.orpo import ORPOTrainer

from frontierlm.posttrain.preference import (
    PAIR_LOSS_TYPES,
    kto_loss,
    orpo_loss,
    pair_loss,
    simpo_loss,
)

TOL = 1e-6
CPU = torch.device("cpu")


class FakeAccelerator:
    device = CPU

    @staticmethod
    def gather(x):
        return x

    gather_for_metrics = gather

    @staticmethod
    def unwrap_model(m):
        return m


class TokenLogpModel:
    """Stands in for a causal LM called with fused_lm_head=True: returns given per-token
    log-probs for each input_ids tensor it knows (by identity)."""

    training = True

    def __init__(self, table: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.table = table

    def __call__(self, input_ids, **kwargs):
        for ids, logps in self.table:
            if ids is input_ids:
                zeros = torch.zeros_like(logps)
                return SimpleNamespace(
                    log_probs=logps,
                    entropy=zeros,
                    mean_logits=zeros,
                    is_top1=zeros.bool(),
                    aux_loss=None,
                )
        raise AssertionError("unknown input_ids")


def completion(batch: int, width: int, gen: torch.Generator):
    """Random per-token log-probs on a completion mask of random lengths (>= 1 token)."""
    lengths = torch.randint(1, width, (batch,), generator=gen)
    mask = (torch.arange(width)[None, :] >= width - lengths[:, None]).long()  # right-aligned
    per_token = -torch.rand(batch, width - 1, generator=gen, dtype=torch.float64) * 3
    per_token = per_token * mask[:, 1:]
    return mask, per_token


def dpo_trainer(loss_type: str, beta: float, ls: float):
    t = object.__new__(DPOTrainer)
    t.accelerator = FakeAccelerator()
    t.aux_loss_enabled, t.ld_alpha, t.precompute_ref_logps = False, None, True
    t.f_divergence_type, t.use_weighting = "reverse_kl", False
    t.loss_types, t.loss_weights = [loss_type], [1.0]
    t.beta, t.label_smoothing = beta, ls
    t._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    t._total_train_tokens, t._tp_size = 0, 1
    t.args = SimpleNamespace(gradient_checkpointing_kwargs=None)
    return t


def trl_dpo_one(loss_type, beta, ls, mask, per_token, ref_c, ref_r):
    """TRL's DPO loss and rewards for one pair (rows: chosen, rejected)."""
    t = dpo_trainer(loss_type, beta, ls)
    ids = torch.zeros_like(mask)
    t.model = TokenLogpModel([(ids, per_token)])
    inputs = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(mask),
        "completion_mask": mask,
        "ref_chosen_logps": ref_c,
        "ref_rejected_logps": ref_r,
    }
    loss = t._compute_loss(t.model, inputs, return_outputs=False)
    m = t._metrics["train"]
    return loss.item(), m["rewards/chosen"][-1], m["rewards/rejected"][-1]


@pytest.mark.parametrize("loss_type", PAIR_LOSS_TYPES)
def test_pair_losses_equal_trl(loss_type):
    gen = torch.Generator().manual_seed(hash(loss_type) % 2**31)
    batch, width, beta = 6, 12, 0.3
    ls = 0.2 if loss_type == "robust" else 0.0
    mask, per_token = completion(2 * batch, width, gen)
    ref = -torch.rand(2 * batch, generator=gen, dtype=torch.float64) * 20
    logps = per_token.sum(1)
    lengths = mask.sum(1).double()
    ours, ours_c, ours_r = pair_loss(
        loss_type,
        logps[:batch],
        logps[batch:],
        ref[:batch],
        ref[batch:],
        beta,
        ls,
        chosen_lengths=lengths[:batch],
        rejected_lengths=lengths[batch:],
    )
    for i in range(batch):
        rows = [i, batch + i]
        loss, chosen_r, rejected_r = trl_dpo_one(
            loss_type, beta, ls, mask[rows], per_token[rows], ref[i : i + 1], ref[batch + i :][:1]
        )
        assert ours[i].item() == pytest.approx(loss, abs=TOL)
        assert ours_c[i].item() == pytest.approx(chosen_r, abs=TOL)
        assert ours_r[i].item() == pytest.approx(rejected_r, abs=TOL)


def test_ipo_on_given_averages_equals_trl_normalisation():
    """Without lengths, IPO takes the log-probs as per-token averages already."""
    gen = torch.Generator().manual_seed(3)
    logps = -torch.rand(4, dtype=torch.float64, generator=gen) * 30
    ref = -torch.rand(4, dtype=torch.float64, generator=gen) * 30
    lengths = torch.tensor([3.0, 7.0, 5.0, 11.0], dtype=torch.float64)
    with_lengths, *_ = pair_loss(
        "ipo", logps[:2], logps[2:], ref[:2], ref[2:], 0.1, 0.0, lengths[:2], lengths[2:]
    )
    averaged, *_ = pair_loss(
        "ipo", (logps / lengths)[:2], (logps / lengths)[2:], (ref / lengths)[:2],
        (ref / lengths)[2:], 0.1,
    )  # fmt: skip
    torch.testing.assert_close(with_lengths, averaged, atol=1e-12, rtol=0)


def cpo_trainer(loss_type: str, beta: float, ls: float, gamma: float = 0.0):
    t = object.__new__(CPOTrainer)
    t.accelerator = FakeAccelerator()
    t.alpha, t.loss_type, t.beta, t.label_smoothing, t.simpo_gamma = 0.0, loss_type, beta, ls, gamma
    return t


def test_conservative_dpo_with_label_smoothing_equals_trl_cdpo():
    gen = torch.Generator().manual_seed(4)
    c, r, rc, rr = (-torch.rand(8, dtype=torch.float64, generator=gen) * 40 for _ in range(4))
    for ls in (0.0, 0.1, 0.3):
        ours, ours_c, ours_r = pair_loss("sigmoid", c, r, rc, rr, 0.2, ls)
        theirs, *_ = cpo_trainer("sigmoid", 0.2, ls).cpo_loss(c - rc, r - rr)
        torch.testing.assert_close(ours, theirs, atol=TOL, rtol=0)
    # cDPO's rewards are DPO's: beta times the log-ratios (checked against DPOTrainer above).
    torch.testing.assert_close(ours_c, 0.2 * (c - rc))
    torch.testing.assert_close(ours_r, 0.2 * (r - rr))


def test_simpo_equals_trl():
    gen = torch.Generator().manual_seed(5)
    c, r = (-torch.rand(10, dtype=torch.float64, generator=gen) * 3 for _ in range(2))
    for beta, gamma, ls in [(2.0, 0.5, 0.0), (2.5, 1.4, 0.0), (1.0, 0.3, 0.1)]:
        ours = simpo_loss(c, r, beta, gamma, ls)
        theirs = cpo_trainer("simpo", beta, ls, gamma).cpo_loss(c, r)
        for a, b in zip(ours, theirs, strict=True):
            torch.testing.assert_close(a, b, atol=TOL, rtol=0)


def test_orpo_equals_trl():
    gen = torch.Generator().manual_seed(6)
    # Average log-probs, across both branches of log1mexp (above and below -ln 2).
    # TRL's ORPO computes in float32.
    c, r = (-torch.rand(10, generator=gen) * 2.5 - 1e-3 for _ in range(2))
    nll = torch.rand(10, generator=gen) * 3
    t = object.__new__(ORPOTrainer)
    t.accelerator, t.beta = FakeAccelerator(), 0.25
    ours, ours_c, ours_r = orpo_loss(c, r, nll, 0.25)
    trl_losses, trl_c, trl_r, *_ = t.odds_ratio_loss(c, r)
    # TRL: loss = nll - losses.mean(); per example, ours = nll_i - trl_losses_i.
    torch.testing.assert_close(ours, nll - trl_losses, atol=TOL, rtol=0)
    torch.testing.assert_close(ours_c, trl_c, atol=TOL, rtol=0)
    torch.testing.assert_close(ours_r, trl_r, atol=TOL, rtol=0)
    # With TRL's scalar batch NLL the batch loss is TRL's loss.
    batch_nll = nll.mean()
    ours_scalar, *_ = orpo_loss(c, r, batch_nll, 0.25)
    assert ours_scalar.mean().item() == pytest.approx(
        (batch_nll - trl_losses.mean()).item(), abs=TOL
    )


def kto_trainer(beta, dw, uw):
    t = object.__new__(KTOTrainer)
    t.accelerator = FakeAccelerator()
    t.precompute_ref_logps, t.calculate_KL, t.loss_type, t.aux_loss_enabled = (
        True,
        True,
        "kto",
        False,
    )
    t.beta, t.desirable_weight, t.undesirable_weight = beta, dw, uw
    t._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    t._total_train_tokens, t._tp_size = 0, 1
    return t


@pytest.mark.parametrize("shift", [-8.0, 8.0])  # the KL estimate clamped at 0, and positive
def test_kto_equals_trl(shift):
    gen = torch.Generator().manual_seed(7)
    batch, width, beta, dw, uw = 8, 10, 0.2, 1.0, 1.33
    label = torch.tensor([1, 0, 0, 1, 1, 0, 1, 0])
    mask, per_token = completion(batch, width, gen)
    kl_mask, kl_per_token = completion(batch, width, gen)
    ref = -torch.rand(batch, generator=gen, dtype=torch.float64) * 20
    ref_kl = kl_per_token.sum(1) - shift + torch.randn(batch, generator=gen, dtype=torch.float64)

    def trl_kto(rows):
        t = kto_trainer(beta, dw, uw)
        ids, kl_ids = torch.zeros_like(mask[rows]), torch.zeros_like(kl_mask)
        t.model = TokenLogpModel([(ids, per_token[rows]), (kl_ids, kl_per_token)])
        inputs = {
            "input_ids": ids,
            "attention_mask": torch.ones_like(ids),
            "completion_mask": mask[rows],
            "KL_input_ids": kl_ids,
            "KL_attention_mask": torch.ones_like(kl_ids),
            "KL_completion_mask": kl_mask,
            "label": label[rows],
            "ref_logps": ref[rows],
            "ref_KL_logps": ref_kl,
        }
        loss = t._compute_loss(t.model, inputs, return_outputs=False)
        return loss.item(), t._metrics["train"]

    ours, ours_c, ours_r, kl = kto_loss(
        per_token.sum(1), ref, label, kl_per_token.sum(1), ref_kl, beta, dw, uw
    )
    loss, metrics = trl_kto(list(range(batch)))
    assert ours.mean().item() == pytest.approx(loss, abs=TOL)
    assert kl.item() == pytest.approx(metrics["kl"][-1], abs=TOL)
    assert ours_c.mean().item() == pytest.approx(metrics["rewards/chosen"][-1], abs=TOL)
    assert ours_r.mean().item() == pytest.approx(metrics["rewards/rejected"][-1], abs=TOL)
    assert (kl.item() == 0.0) == (shift < 0)
    for i in range(batch):  # per example: TRL on that one example, same KL batch
        loss_i, metrics_i = trl_kto([i])
        assert ours[i].item() == pytest.approx(loss_i, abs=TOL)
        key = "rewards/chosen" if label[i] else "rewards/rejected"
        assert beta * (per_token[i].sum() - ref[i]).item() == pytest.approx(
            metrics_i[key][-1], abs=TOL
        )
