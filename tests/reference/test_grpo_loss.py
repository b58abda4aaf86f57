"""The GRPO loss (grpo / dr_grpo / dapo / bnpo), its gradient, its advantages and its clip
statistics equal TRL 1.16's: TRL's own `GRPOTrainer._compute_loss` runs on a minimal stand-in
for the trainer whose model "forward" returns the same per-token log-probs we feed ours."""

from __future__ import annotations

import zlib
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
from trl.trainer.grpo_trainer import GRPOTrainer
from trl.trainer.utils import nanstd

from frontierlm.posttrain.rl_losses import clipped_policy_loss, group_advantages


class _Accelerator:
    num_processes = 1

    def gather(self, x):
        return x

    gather_for_metrics = gather

    def reduce(self, x, reduction="sum"):
        return x


def trl_loss(logps, old_logps, ref_logps, advantages, mask, loss_type, eps_low, eps_high, beta,
             max_len, num_items):  # fmt: skip
    """TRL's loss for these tensors (one process, no gradient accumulation)."""
    rows, length = logps.shape
    trainer = SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (logps, torch.zeros_like(logps), None),
        top_entropy_quantile=1.0,
        off_policy_mask_threshold=None,
        importance_sampling_level="token",
        beta=beta,
        args=SimpleNamespace(use_bias_correction_kl=False, delta=None),
        loss_type=loss_type,
        epsilon_low=eps_low,
        epsilon_high=eps_high,
        use_vllm=False,
        model=SimpleNamespace(training=True),
        current_gradient_accumulation_steps=1,
        max_completion_length=max_len,
        accelerator=_Accelerator(),
        _entropy_bonus_enabled=False,
        aux_loss_enabled=False,
        _metrics={"train": defaultdict(list)},
    )
    trainer.args.steps_per_generation = 1
    inputs = {
        "prompt_ids": torch.zeros(rows, 1, dtype=torch.long),
        "prompt_mask": torch.ones(rows, 1, dtype=torch.long),
        "completion_ids": torch.zeros(rows, length, dtype=torch.long),
        "completion_mask": mask,
        "advantages": advantages,
        "num_items_in_batch": torch.tensor(float(num_items)),
    }
    if old_logps is not None:
        inputs["old_per_token_logps"] = old_logps
    if beta:
        inputs["ref_per_token_logps"] = ref_logps
    loss = GRPOTrainer._compute_loss(trainer, None, inputs)
    return loss, trainer._metrics["train"]


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo", "bnpo"])
@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("several_passes", [False, True])
def test_loss_and_gradient_equal_trl(loss_type, beta, several_passes):
    gen = torch.Generator().manual_seed(zlib.crc32(f"{loss_type}{beta}{several_passes}".encode()))
    rows, length, max_len = 12, 9, 11
    base = -torch.rand(rows, length, generator=gen, dtype=torch.float64) * 3
    old = base + 0.3 * torch.randn(rows, length, generator=gen, dtype=torch.float64)
    ref = base + 0.2 * torch.randn(rows, length, generator=gen, dtype=torch.float64)
    lengths = torch.randint(1, length + 1, (rows,), generator=gen)
    mask = (torch.arange(length)[None] < lengths[:, None]).long()
    rewards = torch.randint(0, 2, (rows,), generator=gen).double()
    advantages = group_advantages(rewards, 4)
    num_items = int(mask.sum()) + 7  # dapo: tokens of the whole generation batch
    old_logps = old if several_passes else None

    ours_in = base.clone().requires_grad_(True)
    ours, stats = clipped_policy_loss(ours_in, old_logps, advantages, mask, loss_type, 0.2, 0.28,
                                      beta, ref, max_len, num_items)  # fmt: skip
    ours.backward()
    trl_in = base.clone().requires_grad_(True)
    theirs, metrics = trl_loss(trl_in, old_logps, ref, advantages, mask, loss_type, 0.2, 0.28,
                               beta, max_len, num_items)  # fmt: skip
    theirs.backward()
    assert abs(ours.item() - theirs.item()) < 1e-6
    assert torch.allclose(ours_in.grad, trl_in.grad, atol=1e-6, rtol=0)
    assert abs(stats["clip_low"].item() - metrics["clip_ratio/low_mean"][0]) < 1e-6
    assert abs(stats["clip_high"].item() - metrics["clip_ratio/high_mean"][0]) < 1e-6
    if beta:
        assert abs(stats["kl"].item() - metrics["kl"][0]) < 1e-6
    if several_passes:  # the ratio moved away from 1: something was clipped
        assert stats["clip_fraction"].item() > 0


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_advantages_equal_trl(scale):
    """TRL 1.16 `_generate_and_score_completions` (sum_then_normalize), with its nanstd."""
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.25, 1.0, 1.0, 1.0, 1.0, 0.0, 2.0, 3.0, 0.0])
    g = 4
    mean = rewards.view(-1, g).mean(1).repeat_interleave(g)
    if scale == "batch":
        std = nanstd(rewards).expand_as(rewards)
    else:
        std = nanstd(rewards.view(-1, g), dim=1).repeat_interleave(g)
    expected = rewards - mean
    if scale != "none":
        expected = expected / (std + 1e-4)
    assert torch.allclose(group_advantages(rewards, g, scale), expected, atol=1e-6)
