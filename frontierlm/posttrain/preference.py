"""Preference-optimisation losses with TRL 1.16's names and formulas, so published
hyper-parameters transfer. Pure functions of sequence log-probabilities; the align stage
(posttrain/align.py) computes those and picks a loss with `align.loss_type`.

Each function returns (per-example losses, chosen rewards, rejected rewards); the batch loss is
the mean of the per-example losses (TRL's reduction). Rewards are detached and are what TRL logs
as `rewards/chosen` and `rewards/rejected`: beta times the log-ratio to the reference for the
reference-based losses, beta times the (length-normalised) policy log-prob for ORPO and SimPO.
Log-probs are summed over the completion (assistant) tokens unless a docstring says otherwise.

Where the definitions come from (trl 1.16.0):
  pair_loss   trl/trainer/dpo_trainer.py, DPOTrainer._compute_loss
  kto_loss    trl/trainer/kto_trainer.py, KTOTrainer._compute_loss
  orpo_loss   trl/experimental/orpo/orpo_trainer.py, odds_ratio_loss + get_batch_loss_metrics
  simpo_loss  trl/experimental/cpo/cpo_trainer.py, cpo_loss with loss_type="simpo"
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

Tensor = torch.Tensor

# The DPO-family losses of `pair_loss`, all against a reference model.
PAIR_LOSS_TYPES = (
    "sigmoid",  # DPO (Rafailov et al. 2023); label_smoothing > 0 gives conservative DPO (cDPO)
    "ipo",  # IPO (Azar et al. 2023), on per-token average log-probs as TRL normalises it
    "robust",  # robust DPO (Chowdhury et al. 2024), unbiased under label noise label_smoothing
    "hinge",  # SLiC (Zhao et al. 2023)
    "apo_zero",  # APO-zero (D'Oosterlinck et al. 2024): push chosen up and rejected down
    "apo_down",  # APO-down: push both down, rejected more
    "bco_pair",  # BCO on pairs (Jung et al. 2024)
    "nca_pair",  # NCA on pairs (Chen et al. 2024)
    "sppo_hard",  # SPPO with hard win/lose probabilities (Wu et al. 2024)
)
# Every `align.loss_type`: the pair losses, and the three with their own data or no reference.
LOSS_TYPES = (*PAIR_LOSS_TYPES, "kto", "orpo", "simpo")
REFERENCE_FREE = ("orpo", "simpo")


def pair_loss(
    loss_type: str,
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float,
    label_smoothing: float = 0.0,
    chosen_lengths: Tensor | None = None,
    rejected_lengths: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """A DPO-family loss on (B,) sequence log-probs of policy and reference.

    With h = (chosen_logps - ref_chosen_logps) - (rejected_logps - ref_rejected_logps):
      sigmoid    -(1 - ls) log s(beta h) - ls log s(-beta h)   (TRL 1.16 has ls = 0 only; ls > 0
                 is cDPO as TRL < 0.20 and CPOTrainer write it)
      ipo        (h_avg - 1 / (2 beta))^2 with h on per-token average log-probs
      robust     (-(1 - ls) log s(beta h) + ls log s(-beta h)) / (1 - 2 ls)
      hinge      relu(1 - beta h)
      apo_zero   1 - s(beta r_w) + s(beta r_l)          r = policy - reference log-prob
      apo_down   s(beta r_w) + 1 - s(beta (r_w - r_l))
    IPO: TRL divides each side's log-ratio by its number of completion tokens. Pass
    `chosen_lengths`/`rejected_lengths` (completion tokens) with summed log-probs and this does
    the same, with rewards exactly TRL's (beta times the summed log-ratios); without them the
    log-probs are taken to be per-token averages already (and the rewards are beta times those).
    """
    chosen_ratio = chosen_logps - ref_chosen_logps
    rejected_ratio = rejected_logps - ref_rejected_logps
    h = beta * (chosen_ratio - rejected_ratio)
    ls = label_smoothing
    if loss_type == "sigmoid":
        losses = -(1 - ls) * F.logsigmoid(h) - ls * F.logsigmoid(-h)
    elif loss_type == "ipo":
        if chosen_lengths is not None and rejected_lengths is not None:
            chosen_avg = chosen_ratio / chosen_lengths.clamp(min=1.0)
            rejected_avg = rejected_ratio / rejected_lengths.clamp(min=1.0)
        else:
            chosen_avg, rejected_avg = chosen_ratio, rejected_ratio
        losses = (chosen_avg - rejected_avg - 1 / (2 * beta)) ** 2
    elif loss_type == "robust":
        if not ls < 0.5:
            raise ValueError(f"robust DPO needs label_smoothing < 0.5, got {ls}")
        losses = (-(1 - ls) * F.logsigmoid(h) + ls * F.logsigmoid(-h)) / (1 - 2 * ls)
    elif loss_type == "hinge":
        losses = torch.relu(1 - h)
    elif loss_type == "apo_zero":
        losses = 1 - torch.sigmoid(beta * chosen_ratio) + torch.sigmoid(beta * rejected_ratio)
    elif loss_type == "apo_down":
        losses = torch.sigmoid(beta * chosen_ratio) + 1 - torch.sigmoid(h)
    elif loss_type == "bco_pair":
        losses = -F.logsigmoid(beta * chosen_ratio) - F.logsigmoid(-beta * rejected_ratio)
    elif loss_type == "nca_pair":
        chosen_r, rejected_r = beta * chosen_ratio, beta * rejected_ratio
        losses = (
            -F.logsigmoid(chosen_r)
            - 0.5 * F.logsigmoid(-chosen_r)
            - 0.5 * F.logsigmoid(-rejected_r)
        )
    elif loss_type == "sppo_hard":
        losses = (chosen_ratio - 0.5 / beta) ** 2 + (rejected_ratio + 0.5 / beta) ** 2
    else:
        raise ValueError(f"unknown pair loss_type {loss_type!r}; one of {list(PAIR_LOSS_TYPES)}")
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def kto_loss(
    logps: Tensor,
    ref_logps: Tensor,
    desirable: Tensor,
    kl_logps: Tensor,
    ref_kl_logps: Tensor,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """KTO (Ethayarajh et al. 2024) on unpaired completions: (B,) log-probs of policy and
    reference, `desirable` a (B,) bool label. The reference point is the batch KL estimate
    z0 = max(0, mean(kl_logps - ref_kl_logps)), detached, where the KL completions are each
    prompt paired with another example's completion (TRL rotates completions by one within a
    batch). Desirable: 1 - s(beta (r - z0)); undesirable: 1 - s(beta (z0 - r)), r = log-ratio.

    Returns (weighted per-example losses, rewards of the desirable examples, rewards of the
    undesirable ones, z0). Losses are in batch order; TRL concatenates desirable then
    undesirable, which does not change their mean."""
    kl = (kl_logps - ref_kl_logps).mean().detach().clamp(min=0)
    ratio = logps - ref_logps
    desirable = desirable.bool()
    chosen_losses = desirable_weight * (1 - torch.sigmoid(beta * (ratio - kl)))
    rejected_losses = undesirable_weight * (1 - torch.sigmoid(beta * (kl - ratio)))
    losses = torch.where(desirable, chosen_losses, rejected_losses)
    rewards = beta * ratio.detach()
    return losses, rewards[desirable], rewards[~desirable], kl


def log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x < 0, stable on both sides of -ln 2 (Maechler 2012)."""
    return torch.where(
        x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x))
    )


def orpo_loss(
    chosen_logps: Tensor, rejected_logps: Tensor, chosen_nll: Tensor, beta: float
) -> tuple[Tensor, Tensor, Tensor]:
    """ORPO (Hong et al. 2024), no reference model: NLL of the chosen response plus
    -beta * log s(log odds(chosen) - log odds(rejected)), odds(y) = p / (1 - p).

    `chosen_logps`/`rejected_logps` are per-token AVERAGE log-probs (TRL's ORPO calls
    get_batch_logps with average_log_prob=True); `chosen_nll` the chosen responses' NLL, a (B,)
    tensor or a scalar (TRL: the token-mean cross-entropy of the chosen batch, computed over
    prompt and response; the align stage uses the response tokens, as the ORPO paper does).
    Rewards: beta times the average log-probs, as TRL logs them."""
    chosen_logps, rejected_logps = chosen_logps.float(), rejected_logps.float()
    log_odds = (chosen_logps - rejected_logps) - (log1mexp(chosen_logps) - log1mexp(rejected_logps))
    losses = chosen_nll - beta * F.logsigmoid(log_odds)
    return losses, beta * chosen_logps.detach(), beta * rejected_logps.detach()


def simpo_loss(
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    beta: float,
    gamma: float,
    label_smoothing: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """SimPO (Meng et al. 2024), no reference model: with per-token AVERAGE log-probs,
    -(1 - ls) log s(beta (c - r) - gamma) - ls log s(gamma - beta (c - r)).
    `gamma` is the target reward margin (TRL's `simpo_gamma`; TRL subtracts gamma / beta inside
    the bracket, the same thing). Rewards: beta times the average log-probs."""
    logits = chosen_logps - rejected_logps - gamma / beta
    losses = -(1 - label_smoothing) * F.logsigmoid(beta * logits) - label_smoothing * F.logsigmoid(
        -beta * logits
    )
    return losses, beta * chosen_logps.detach(), beta * rejected_logps.detach()
