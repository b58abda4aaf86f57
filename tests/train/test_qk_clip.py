"""QK-clip (MuonClip): the rescaling is exact per head for MHA, GQA and MLA, and a high-learning-
rate run whose attention logits explode without it stays within 5% of the threshold with it."""

from __future__ import annotations

import pytest
import torch

from frontierlm.config import ModelConfig, PretrainConfig
from frontierlm.model import Transformer
from frontierlm.train.loop import TrainTask, train
from frontierlm.train.metrics import MetricsLog
from frontierlm.train.optim import build_optimizer
from frontierlm.train.parallel import apply_activation_checkpointing
from frontierlm.train.pretrain import lm_loss
from frontierlm.train.qk_clip import QKClip, max_logits

VARIANTS = {
    "mha": {"n_heads": 4},
    "gqa": {"n_heads": 4, "n_kv_heads": 2},
    "mla": {
        "n_heads": 4,
        "attention": "mla",
        "mla_kv_lora_rank": 16,
        "mla_qk_nope_head_dim": 8,
        "mla_qk_rope_head_dim": 4,
        "mla_v_head_dim": 8,
    },
    "mla_q_lora": {
        "n_heads": 4,
        "attention": "mla",
        "mla_q_lora_rank": 16,
        "mla_kv_lora_rank": 16,
        "mla_qk_nope_head_dim": 8,
        "mla_qk_rope_head_dim": 4,
        "mla_v_head_dim": 8,
    },
}


def _head_maxima(model: Transformer, ids: torch.Tensor) -> torch.Tensor:
    probe = QKClip(model, tau=1e30)
    with torch.enable_grad():
        model(ids)
    seen = probe.seen[0].clone()
    probe.remove()
    return seen


@pytest.mark.parametrize("variant", VARIANTS)
def test_heads_over_tau_after_the_update_are_brought_exactly_to_tau_and_the_others_kept(variant):
    """The clip answers the logits of the weights it clips: the step's forward sees the weights
    before the optimizer update, and the factors come from the step's attention inputs put
    through the updated projections. (The inputs themselves also move when earlier layers are
    updated; only the attention layer is trained here, so the recomputation is exact.)"""
    torch.manual_seed(0)
    cfg = ModelConfig(d_model=32, n_layers=1, max_seq_len=24, init_std=0.3, **VARIANTS[variant])
    model = Transformer(cfg, 50)
    ids = torch.randint(0, 50, (3, 24))
    clip = QKClip(model, 1e30)  # replaced below, once the updated maxima are known
    optimizer = torch.optim.SGD(model.layers[0].self_attn.parameters(), lr=0.5)
    model(ids).logsumexp(-1).mean().backward()  # any loss: the weights move
    seen = clip.seen[0].clone()
    optimizer.step()
    updated = _head_maxima(model, ids)
    # Every head moved by far more than the tolerance below: a clip by the forward's maxima
    # would miss tau.
    assert ((updated - seen).abs() / seen).min() > 1e-4
    tau = float(updated.sort().values[1:3].mean())  # two heads above, two below
    assert (updated > tau).sum() == 2
    shared_rope_key = (
        model.layers[0].self_attn.kv_a_proj_with_mqa.weight.clone() if "mla" in variant else None
    )
    clip.tau = tau
    record = clip.after_step()
    clip.remove()
    assert record["qk_max_logit.0"] == pytest.approx(float(seen.max()), rel=1e-6)
    assert record["qk_clipped_heads"] == 2 and record["qk_clip_margin"] == 1.0
    after = _head_maxima(model, ids)
    over = updated > tau
    torch.testing.assert_close(after[over], torch.full_like(after[over], tau), rtol=1e-5, atol=0)
    torch.testing.assert_close(after[~over], updated[~over], rtol=1e-5, atol=0)
    if shared_rope_key is not None:  # MLA: the rotated key shared by all heads is untouched
        assert torch.equal(model.layers[0].self_attn.kv_a_proj_with_mqa.weight, shared_rope_key)


def test_max_logits_equals_the_masked_score_matrix_maximum():
    torch.manual_seed(1)
    q, k = torch.randn(2, 4, 40, 8), torch.randn(2, 2, 40, 8)
    scores = q @ k.repeat_interleave(2, dim=1).transpose(-1, -2) * 0.3
    causal = torch.ones(40, 40, dtype=torch.bool).tril()
    expected = scores.masked_fill(~causal, -torch.inf).amax(dim=(0, 2, 3))
    torch.testing.assert_close(max_logits(q, k, 0.3), expected)


def test_qk_clip_and_qk_norm_are_refused_together():
    model = Transformer(ModelConfig(d_model=32, n_layers=1, n_heads=4, qk_norm=True), 50)
    with pytest.raises(ValueError, match="qk_norm"):
        QKClip(model, 10.0)


@pytest.fixture(autouse=True)
def one_thread():
    """One thread: far faster than two fighting over a busy 2-core machine at this size."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# A copy task (the second half of each window repeats the first) rewards ever sharper
# attention: at this learning rate the copying heads' logits grow without bound.
SEQ, HALF, VOCAB, BATCH = 32, 16, 64, 32


def _copy_batch(index: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(index)
    x = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=g)
    x[:, HALF + 1 :] = x[:, 1 : SEQ - HALF + 1]
    return {"input_ids": x[:, :-1], "targets": x[:, 1:]}


def _copy_task() -> TrainTask:
    val = _copy_batch(10**6)

    def evaluate(model: torch.nn.Module) -> dict[str, float]:
        return {"loss": lm_loss(model, val)[0].item()}

    return TrainTask("pretrain", _copy_batch, lm_loss, evaluate)


def _copy_model() -> Transformer:
    torch.manual_seed(0)
    return Transformer(
        ModelConfig(d_model=32, n_layers=1, n_heads=4, n_kv_heads=2, max_seq_len=SEQ), VOCAB
    )


def _loop_config(tau: float, optimizer: str, steps: int, lr: float) -> PretrainConfig:
    return PretrainConfig(
        steps=steps,
        batch_size=BATCH,
        seq_len=SEQ,
        lr=lr,
        optimizer=optimizer,
        weight_decay=0.0,
        min_lr_ratio=1.0,  # a constant learning rate: the explosion is not decayed away
        grad_clip=0.0,
        spike_loss_factor=0.0,
        eval_every=steps,
        checkpoint_every=0,
        prefetch=0,
        qk_clip=tau,
    )


def _run(tmp_path, tau: float, optimizer: str, steps: int, lr: float) -> list[dict]:
    """Through the training loop (metrics as it logs them)."""
    loop = _loop_config(tau, optimizer, steps, lr)
    work = tmp_path / f"{optimizer}-{tau}"
    train(_copy_model(), loop, _copy_task(), work, torch.device("cpu"), export=False)
    return MetricsLog(work / "metrics.jsonl").read()


def _run_bare(tau: float, optimizer: str, steps: int, lr: float) -> list[dict]:
    """The same steps as the loop takes them (forward, backward, optimizer step, clip), without
    its bookkeeping: several times faster on a busy machine."""
    model = _copy_model()
    optimizer_ = build_optimizer(model, _loop_config(tau, optimizer, steps, lr))
    clip = QKClip(model, tau)
    records = []
    for step in range(steps):
        clip.begin_step()
        loss, _ = lm_loss(model, _copy_batch(step))
        loss.backward()
        optimizer_.step()
        optimizer_.zero_grad(set_to_none=True)
        records.append({**clip.after_step(), "loss": loss.item()})
    return records


def _check_bounded_and_no_worse(free: list[dict], clipped: list[dict], tau: float) -> None:
    """The acceptance of issue 11: the clipped run's largest logit in any training forward
    stays within 5% of tau where the unclipped run's exceeds 10 tau, and its loss is no worse
    than the unclipped run's before that run diverged."""
    free_max = [r["qk_max_logit"] / tau for r in free]
    clipped_max = [r["qk_max_logit"] / tau for r in clipped]
    diverged = next(i for i, m in enumerate(free_max) if m > 10)  # StopIteration: never did
    window = slice(diverged - 10, diverged)  # the 10 steps before the unclipped run diverged
    before = [sum(r["loss"] for r in run[window]) / 10 for run in (free, clipped)]
    end = [sum(r["loss"] for r in run[-10:]) / 10 for run in (free, clipped)]
    engaged = next(i for i, r in enumerate(clipped) if r["qk_clipped_heads"] > 0)
    held = clipped_max[engaged + 1 :]
    print(
        f"\nunclipped: over 10 tau at step {diverged + 1}, peak {max(free_max):.1f} tau; "
        f"clipped: peak {max(clipped_max):.3f} tau, mean {sum(held) / len(held):.3f} tau after "
        f"step {engaged + 1}, margin {clipped[-1]['qk_clip_margin']:.3f}; loss over the 10 "
        f"steps before the divergence {before[0]:.3f} unclipped, {before[1]:.3f} clipped; "
        f"last 10 steps {end[0]:.3f} unclipped, {end[1]:.3f} clipped"
    )
    assert max(clipped_max) <= 1.05
    assert max(clipped_max) > 0.8  # held near tau, not far below it
    assert before[1] <= before[0]
    assert end[1] <= end[0]  # and no worse after it


def test_high_lr_logits_explode_without_qk_clip_and_stay_within_5pc_of_tau_with_it():
    tau, steps, lr = 20.0, 120, 0.05
    free = _run_bare(1e9, "adamw", steps, lr)  # measured, never clipped
    clipped = _run_bare(tau, "adamw", steps, lr)
    assert sum(r["qk_clipped_heads"] for r in free) == 0
    _check_bounded_and_no_worse(free, clipped, tau)


@pytest.mark.slow  # two 200-step runs through the loop: ~35 s on 2 loaded cores
def test_through_the_training_loop_logits_stay_within_5pc_of_tau(tmp_path):
    tau, steps, lr = 40.0, 200, 0.05
    free = _run(tmp_path, 1e9, "adamw", steps, lr)
    clipped = _run(tmp_path, tau, "adamw", steps, lr)
    assert "qk_max_logit.0" in clipped[-1]
    _check_bounded_and_no_worse(free, clipped, tau)


def test_the_loop_logs_and_clips_with_muon(tmp_path):
    free = _run(tmp_path, 1e9, "muon", 30, 0.05)
    clipped = _run(tmp_path, 2.0, "muon", 30, 0.05)
    assert sum(r["qk_clipped_heads"] for r in clipped) > 0
    assert all("qk_max_logit.0" in r for r in clipped)
    assert sum(r["qk_clipped_heads"] for r in free) == 0
    last = [max(r["qk_max_logit"] for r in run[-10:]) for run in (free, clipped)]
    peak = max(r["qk_max_logit"] for r in clipped)
    print(
        f"muon, last 10 steps: max logit {last[0]:.2f} unclipped, {last[1]:.2f} with tau 2; "
        f"clipped peak {peak:.3f}"
    )
    assert last[0] > 3 * 2.0 and peak <= 1.05 * 2.0


@pytest.mark.parametrize("mode", ["block", "selective"])
def test_activation_checkpointing_recomputes_without_counting_twice(mode):
    """The recomputed forward inside backward is not a second forward: one kept input per
    layer and micro-batch, and the same clip as without checkpointing."""
    runs = {}
    for checkpointing in ("none", mode):
        model = _copy_model()
        apply_activation_checkpointing(model, checkpointing)
        optimizer = torch.optim.AdamW(model.parameters(), lr=0.05)
        clip = QKClip(model, 1.0)
        records = []
        for step in range(6):
            clip.begin_step()
            lm_loss(model, _copy_batch(step))[0].backward()
            assert [len(kept) for kept in clip.inputs] == [1]
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            records.append(clip.after_step())
        runs[checkpointing] = records
    assert sum(r["qk_clipped_heads"] for r in runs[mode]) > 0
    for a, b in zip(runs["none"], runs[mode], strict=True):
        assert a["qk_max_logit"] == pytest.approx(b["qk_max_logit"], rel=1e-5)
        assert a["qk_clipped_heads"] == b["qk_clipped_heads"]
