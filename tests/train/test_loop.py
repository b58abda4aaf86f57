"""The training loop: schedule, checkpoints, and exact resume after a crash."""

import itertools
import json
import math

import pytest
import torch
from loop_tasks import Crash, make_task, new_model, token_stream

from frontierlm.config import PretrainConfig
from frontierlm.train.checkpoint import list_checkpoints, load_model_dir
from frontierlm.train.loop import TrainTask, train
from frontierlm.train.pretrain import lm_loss
from frontierlm.train.schedule import lr_at

LOOP = PretrainConfig(
    steps=12,
    batch_size=4,
    seq_len=16,
    lr=1e-2,
    warmup_steps=2,
    eval_every=4,
    checkpoint_every=4,
    keep_checkpoints=2,
)


@pytest.fixture
def tokens():
    return token_stream()


def test_schedule_warms_up_then_decays_to_floor():
    lrs = [lr_at(s, LOOP) for s in range(LOOP.steps)]
    assert lrs[0] == pytest.approx(LOOP.lr / 2) and lrs[1] == pytest.approx(LOOP.lr)
    assert all(a >= b - 1e-12 for a, b in itertools.pairwise(lrs[1:]))
    assert lrs[-1] == pytest.approx(LOOP.lr * LOOP.min_lr_ratio)


def test_training_lowers_loss_and_writes_artifacts(tokens, tmp_path):
    metrics = train(new_model(), LOOP, make_task(LOOP, tokens), tmp_path, torch.device("cpu"))
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 13))
    assert records[-1]["loss"] < records[0]["loss"] - 0.3
    assert metrics["val_loss"] == records[-1]["val_loss"]
    # keep_checkpoints=2: only the last two survive; the final model loads back identically.
    assert [p.name for p in list_checkpoints(tmp_path / "checkpoints")] == [
        "step_0000008",
        "step_0000012",
    ]
    reloaded = load_model_dir(tmp_path / "model")
    assert reloaded.cfg.d_model == 32 and reloaded.vocab_size == 97


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_crash_then_resume_ends_exactly_where_an_uninterrupted_run_ends(
    tokens, tmp_path, optimizer
):
    loop = LOOP.model_copy(update={"optimizer": optimizer})
    cpu = torch.device("cpu")
    straight = train(new_model(), loop, make_task(LOOP, tokens), tmp_path / "a", cpu)
    with pytest.raises(Crash):
        train(new_model(), loop, make_task(LOOP, tokens, crash_at=9), tmp_path / "b", cpu)
    assert [p.name for p in list_checkpoints(tmp_path / "b" / "checkpoints")][-1] == "step_0000008"
    # A fresh model object: everything must come from the checkpoint.
    resumed = train(new_model(), loop, make_task(LOOP, tokens), tmp_path / "b", cpu)
    assert resumed["train_loss"] == pytest.approx(straight["train_loss"], abs=1e-5)
    assert resumed["val_loss"] == pytest.approx(straight["val_loss"], abs=1e-5)
    steps = [
        json.loads(x)["step"] for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
    ]
    assert steps == list(range(1, 13)), "metrics of the lost steps are rewritten, not duplicated"


def test_metrics_log_survives_a_torn_last_line(tmp_path):
    from frontierlm.train.metrics import MetricsLog

    log = MetricsLog(tmp_path / "metrics.jsonl")
    for step in (1, 2, 3):
        log.write({"step": step, "loss": 1.0 / step})
    with log.path.open("a") as f:
        f.write('{"step": 4, "lo')  # killed mid-write
    assert [r["step"] for r in log.read()] == [1, 2, 3]
    log.truncate_after(2)
    assert [r["step"] for r in log.read()] == [1, 2]
    log.path.write_text('{"step": 1}\nnot json\n{"step": 3}\n')
    with pytest.raises(ValueError, match=r"metrics\.jsonl:2"):
        log.read()


SPIKY = LOOP.model_copy(
    update={
        "steps": 60,
        "eval_every": 60,
        "checkpoint_every": 10,
        "spike_loss_factor": 1.5,
        "spike_min_history": 10,
        "spike_max_skips": 3,
    }
)


def corrupting_task(tokens, bad: set[int]):
    """The test task, except that the data steps in `bad` get random targets: a corrupted
    batch, whose loss on a model that has learnt the pattern is far above the median."""
    task = make_task(LOOP, tokens)
    clean = task.batch

    def batch(i):
        out = clean(i)
        if i in bad:
            generator = torch.Generator().manual_seed(i)
            out = {
                **out,
                "targets": torch.randint(0, 97, out["targets"].shape, generator=generator),
            }
        return out

    return TrainTask("test", batch, task.loss, task.evaluate)


def events(run_dir):
    path = run_dir / "events.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def test_a_corrupted_batch_is_skipped_and_repeated_ones_roll_back(tmp_path):
    import numpy as np

    # A noise-free stream: the model learns it fast, so a corrupted batch stands out clearly.
    tokens = np.tile(np.arange(97, dtype=np.uint16), 60)
    cpu = torch.device("cpu")
    clean = train(new_model(), SPIKY, make_task(LOOP, tokens), tmp_path / "clean", cpu)
    assert events(tmp_path / "clean") == []  # no false alarm on a clean run

    one = train(new_model(), SPIKY, corrupting_task(tokens, {25}), tmp_path / "one", cpu)
    assert [(e["event"], e["data_step"]) for e in events(tmp_path / "one")] == [("skipped", 25)]
    assert one["val_loss"] == pytest.approx(clean["val_loss"], rel=0.01)

    burst = train(new_model(), SPIKY, corrupting_task(tokens, {33, 34, 35}), tmp_path / "b", cpu)
    log = events(tmp_path / "b")
    assert [e["event"] for e in log] == ["skipped", "skipped", "skipped", "rollback"]
    rollback = log[-1]
    # Back to the step-30 checkpoint; data steps 30..35 are never trained on.
    assert rollback["to_step"] == 30 and rollback["skipped_data_steps"] == [30, 35]
    records = (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
    steps = [json.loads(x)["step"] for x in records]
    assert steps == list(range(1, 61))
    assert burst["val_loss"] == pytest.approx(clean["val_loss"], rel=0.01)


def test_non_finite_loss_is_skipped_even_with_the_guard_off(tokens, tmp_path):
    task = make_task(LOOP, tokens)

    def batch(i):
        out = task.batch(i)
        if i == 5:
            out = {**out, "input_ids": out["input_ids"].clone()}
            out["input_ids"][0, 0] = -1  # marks the poisoned batch for `loss`
        return out

    def safe_loss(model, batch):
        if batch["input_ids"][0, 0] == -1:
            batch = {**batch, "input_ids": batch["input_ids"].clamp_min(0)}
            value, parts = lm_loss(model, batch)
            return value * float("nan"), parts
        return lm_loss(model, batch)

    poisoned = TrainTask("test", batch, safe_loss, task.evaluate)
    metrics = train(new_model(), LOOP, poisoned, tmp_path, torch.device("cpu"))
    assert [e["data_step"] for e in events(tmp_path)] == [5]
    assert math.isfinite(metrics["val_loss"])


def test_repeated_spikes_before_any_checkpoint_reset_the_guard(tmp_path):
    import numpy as np

    tokens = np.tile(np.arange(97, dtype=np.uint16), 60)
    loop = SPIKY.model_copy(update={"steps": 40, "checkpoint_every": 100, "eval_every": 40})
    train(new_model(), loop, corrupting_task(tokens, {27, 28, 29}), tmp_path, torch.device("cpu"))
    kinds = [e["event"] for e in events(tmp_path)]
    assert kinds == ["skipped", "skipped", "skipped", "guard_reset"]
    steps = [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 41))


def test_wsd_holds_the_peak_then_decays_over_the_last_fraction():
    cfg = LOOP.model_copy(
        update={"steps": 100, "warmup_steps": 10, "schedule": "wsd", "decay_fraction": 0.2}
    )
    lrs = [lr_at(s, cfg) for s in range(100)]
    assert lrs[9] == pytest.approx(cfg.lr) and lrs[10:80] == [cfg.lr] * 70
    assert all(a > b for a, b in itertools.pairwise(lrs[79:]))
    assert lrs[-1] == pytest.approx(cfg.lr * cfg.min_lr_ratio)
    sqrt = [lr_at(s, cfg.model_copy(update={"decay_shape": "1-sqrt"})) for s in range(100)]
    assert sqrt[-1] == pytest.approx(lrs[-1]) and sqrt[85] < lrs[85]  # 1-sqrt drops faster first


def test_batch_size_scaling_rule_scales_the_peak():
    from frontierlm.train.schedule import batch_tokens, peak_lr

    cfg = LOOP.model_copy(
        update={"lr_batch_scaling": "sqrt", "lr_reference_batch_tokens": 16, "grad_accum": 4}
    )
    assert batch_tokens(cfg) == 4 * 4 * 16
    assert peak_lr(cfg) == pytest.approx(LOOP.lr * 4)  # sqrt(256 / 16)
    linear = cfg.model_copy(update={"lr_batch_scaling": "linear"})
    assert peak_lr(linear) == pytest.approx(LOOP.lr * 16)
    assert lr_at(40, cfg.model_copy(update={"steps": 100})) <= peak_lr(cfg)
    with pytest.raises(ValueError, match="needs lr_reference_batch_tokens"):
        PretrainConfig(lr_batch_scaling="sqrt")
