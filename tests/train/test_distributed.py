"""Data-parallel training: 2 CPU processes (gloo) against 1, on the same global batch.

Each test spawns 2 worker processes running the real loop (FSDP2 or DDP); the workers use one
thread each, so a 2-core machine runs them side by side.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from loop_tasks import Crash, join_within, make_task, new_model

from frontierlm.config import PretrainConfig, RunConfig
from frontierlm.train.checkpoint import is_sharded, list_checkpoints, load_model_dir
from frontierlm.train.loop import TrainTask, train
from frontierlm.train.parallel import init_distributed, shutdown_distributed
from frontierlm.train.pretrain import ShuffledWindows, lm_loss

WORLD = 2
TIMEOUT_S = 120
PRELOAD = ["frontierlm.train.loop", "torch.distributed.checkpoint", "torch._dynamo"]
CPU = torch.device("cpu")
# grad_accum 2: the accumulation path (DDP's no_sync) is part of what must match.
LOOP = PretrainConfig(
    steps=12,
    batch_size=4,
    grad_accum=2,
    seq_len=16,
    lr=1e-2,
    warmup_steps=2,
    eval_every=4,
    checkpoint_every=4,
    keep_checkpoints=2,
)


SPIKY = LOOP.model_copy(
    update={
        "steps": 40,
        "grad_accum": 1,
        "eval_every": 40,
        "checkpoint_every": 10,
        "spike_loss_factor": 1.5,
        "spike_min_history": 10,
        "spike_max_skips": 3,
    }
)


def records(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def max_difference(a: list[dict], b: list[dict], key: str) -> float:
    pairs = [(x[key], y[key]) for x, y in zip(a, b, strict=True) if key in x]
    assert pairs and all(key in y for y in b if key in y)
    return max(abs(x - y) for x, y in pairs)


# ----------------------------------------------------------------------------- workers


def _worker(rank: int, port: int, job, args: tuple) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(WORLD),
    )
    torch.set_num_threads(1)
    init_distributed(RunConfig(device="cpu"))
    try:
        job(*args)
    finally:
        shutdown_distributed()


def spawn(job, *args) -> None:
    """Run `job(*args)` in WORLD processes of one gloo job, as torchrun would start them.
    Forked from a fork server that imported torch and the package once: a fresh interpreter
    per worker would pay those imports (seconds) in every test."""
    multiprocessing.set_forkserver_preload(PRELOAD)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    context = mp.start_processes(
        _worker, args=(port, job, args), nprocs=WORLD, join=False, start_method="forkserver"
    )
    join_within(context, TIMEOUT_S, f"the {WORLD} processes")


def train_job(
    loop: PretrainConfig,
    run_dir: Path,
    parallel: str,
    crash_at: int | None,
    model_fields: dict | None = None,
) -> None:
    model = new_model(**(model_fields or {}))
    with contextlib.suppress(Crash):  # the crash ends this run where a test wants it ended
        task = make_task(loop, crash_at=crash_at)
        train(model, loop, task, run_dir, CPU, RunConfig(parallel=parallel))


def error_job(loop: PretrainConfig, run_dir: Path) -> None:
    from frontierlm.train.parallel import world

    try:
        train(new_model(), loop, make_task(loop), run_dir, CPU)
    except ValueError as err:
        (run_dir.parent / f"error-{world().rank}.txt").write_text(str(err))


def spiky_task(bad: set[int]) -> TrainTask:
    """A noise-free stream (learnt fast, so a corrupted batch stands out) whose data steps in
    `bad` get random targets."""
    tokens = np.tile(np.arange(97, dtype=np.uint16), 60)
    windows = ShuffledWindows(tokens, SPIKY.seq_len, SPIKY.batch_size, seed=3)
    val = windows(10_000)

    def batch(i: int) -> dict[str, torch.Tensor]:
        out = windows(i)
        if i in bad:
            generator = torch.Generator().manual_seed(i)
            out = {
                **out,
                "targets": torch.randint(0, 97, out["targets"].shape, generator=generator),
            }
        return out

    def evaluate(model: torch.nn.Module) -> dict[str, float]:
        return {"loss": lm_loss(model, val)[0].item()}

    return TrainTask("pretrain", batch, lm_loss, evaluate)


def spike_job(run_dir: Path, bad: set[int]) -> None:
    train(new_model(), SPIKY, spiky_task(bad), run_dir, CPU)


def events(run_dir: Path) -> list[dict]:
    path = run_dir / "events.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


# ----------------------------------------------------------------------------- tests


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The one-process runs here use one thread too: like the workers, and far faster than two
    threads fighting over a busy 2-core machine for tensors this small."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def single_process(tmp_path_factory):
    """Uninterrupted one-process runs, by optimizer."""
    runs: dict[str, Path] = {}

    def run(optimizer: str) -> Path:
        if optimizer not in runs:
            loop = LOOP.model_copy(update={"optimizer": optimizer})
            runs[optimizer] = tmp_path_factory.mktemp(f"single-{optimizer}")
            train(new_model(), loop, make_task(loop), runs[optimizer], CPU)
        return runs[optimizer]

    return run


@pytest.mark.parametrize("parallel", ["fsdp", "ddp"])
def test_two_processes_follow_the_single_process_curve(single_process, tmp_path, parallel):
    one = single_process("adamw")
    spawn(train_job, LOOP, tmp_path, parallel, None)
    ours, reference = records(tmp_path), records(one)
    assert [r["step"] for r in ours] == list(range(1, 13)), "rank 0 alone writes the metrics"
    loss_diff = max_difference(ours, reference, "loss")
    val_diff = max_difference(ours, reference, "val_loss")
    norm_diff = max_difference(ours, reference, "grad_norm")
    assert loss_diff < 1e-4 and val_diff < 1e-4 and norm_diff < 1e-4
    # The final model is one safetensors file with the full weights, gathered by rank 0.
    assert not is_sharded(tmp_path / "model")
    ours_model, reference_model = load_model_dir(tmp_path / "model"), load_model_dir(one / "model")
    weight_diff = max(
        (a - b).abs().max().item()
        for a, b in zip(
            ours_model.state_dict().values(), reference_model.state_dict().values(), strict=True
        )
    )
    assert weight_diff < 1e-4
    # Checkpoints of the 2-process run are sharded: one DCP file per process.
    last = list_checkpoints(tmp_path / "checkpoints")[-1]
    assert is_sharded(last) and len(list(last.glob("*.distcp"))) == WORLD
    print(
        f"\n{parallel}: max |loss diff| {loss_diff:.2e}, val_loss {val_diff:.2e}, "
        f"grad_norm {norm_diff:.2e}, final weights {weight_diff:.2e}"
    )


def test_moe_expert_loads_are_counted_over_the_global_batch(tmp_path):
    """Bias-balanced MoE: each process counts its rows' expert choices, the loop adds the counts
    up, so the selection biases (and the load metrics) move as in one process."""
    moe = {"moe_experts": 4, "moe_top_k": 2, "moe_balance": "bias", "moe_bias_rate": 0.01}
    train(new_model(**moe), LOOP, make_task(LOOP), tmp_path / "one", CPU)
    spawn(train_job, LOOP, tmp_path / "two", "fsdp", None, moe)
    ours, reference = records(tmp_path / "two"), records(tmp_path / "one")
    load_diff = max(
        max_difference(ours, reference, f"moe{layer}_max_over_mean_load") for layer in (0, 1)
    )
    loss_diff = max_difference(ours, reference, "loss")
    assert load_diff < 1e-6 and loss_diff < 1e-4
    print(f"\nMoE over 2 processes: max |loss diff| {loss_diff:.2e}, load metric {load_diff:.2e}")


def test_qk_clip_under_fsdp_clips_as_one_process(tmp_path):
    """QK-clip recomputes the step's logits with each block's gathered weights and rescales
    the sharded rows in place: 2 FSDP2 processes clip the same heads by the same factors as
    one process (tau is low enough that most steps clip)."""
    loop = LOOP.model_copy(update={"qk_clip": 0.15})
    train(new_model(), loop, make_task(loop), tmp_path / "one", CPU)
    spawn(train_job, loop, tmp_path / "two", "fsdp", None)
    ours, reference = records(tmp_path / "two"), records(tmp_path / "one")
    clipped = [r["qk_clipped_heads"] for r in reference]
    assert sum(clipped) >= 10 and [r["qk_clipped_heads"] for r in ours] == clipped
    logit_diff = max(max_difference(ours, reference, f"qk_max_logit.{i}") for i in (0, 1))
    loss_diff = max_difference(ours, reference, "loss")
    assert logit_diff < 1e-4 and loss_diff < 1e-4
    print(f"\nqk_clip under FSDP2: max |logit diff| {logit_diff:.2e}, loss {loss_diff:.2e}")


CRASH_AT = 9 * LOOP.grad_accum  # the first micro-batch of step 10, after the step-8 checkpoint


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_checkpoint_of_two_processes_resumes_in_one(single_process, tmp_path, optimizer):
    """FSDP2 over 2 processes stops after the step-8 checkpoint; one process resumes from it and
    ends where one process ends. Muon: two optimizers (Muon + AdamW) in one sharded state."""
    loop = LOOP.model_copy(update={"optimizer": optimizer})
    one = single_process(optimizer)
    spawn(train_job, loop, tmp_path, "fsdp", CRASH_AT)
    checkpoint = list_checkpoints(tmp_path / "checkpoints")[-1]
    assert checkpoint.name == "step_0000008" and is_sharded(checkpoint)
    assert not (tmp_path / "model").exists()
    resumed = train(new_model(), loop, make_task(loop), tmp_path, CPU)
    ours, reference = records(tmp_path), records(one)
    assert [r["step"] for r in ours] == list(range(1, 13))
    loss_diff = max_difference(ours, reference, "loss")
    after_resume = max_difference(ours[8:], reference[8:], "loss")
    val_diff = max_difference(ours, reference, "val_loss")
    assert loss_diff < 1e-4 and val_diff < 1e-4
    assert resumed["val_loss"] == pytest.approx(reference[-1]["val_loss"], abs=1e-4)
    # A sharded checkpoint also loads as a plain model.
    assert load_model_dir(checkpoint).cfg.d_model == 32
    print(
        f"\n2->1 resume ({optimizer}): max |loss diff| {loss_diff:.2e} "
        f"(steps 9-12: {after_resume:.2e}), val_loss {val_diff:.2e}"
    )


def test_single_process_checkpoint_resumes_in_two(single_process, tmp_path):
    """The other way: a one-process (single-file) checkpoint, spread over 2 FSDP2 processes."""
    loop = LOOP.model_copy(update={"optimizer": "muon"})
    one = single_process("muon")
    with pytest.raises(Crash):
        train(new_model(), loop, make_task(loop, crash_at=CRASH_AT), tmp_path, CPU)
    checkpoint = list_checkpoints(tmp_path / "checkpoints")[-1]
    assert checkpoint.name == "step_0000008" and not is_sharded(checkpoint)
    spawn(train_job, loop, tmp_path, "fsdp", None)
    ours, reference = records(tmp_path), records(one)
    assert [r["step"] for r in ours] == list(range(1, 13))
    after_resume = max_difference(ours[8:], reference[8:], "loss")
    val_diff = max_difference(ours, reference, "val_loss")
    assert after_resume < 1e-4 and val_diff < 1e-4
    assert is_sharded(list_checkpoints(tmp_path / "checkpoints")[-1])
    print(f"\n1->2 resume (muon): steps 9-12 max |loss diff| {after_resume:.2e}")


def test_a_batch_that_does_not_split_over_the_processes_is_refused(tmp_path):
    loop = LOOP.model_copy(update={"batch_size": 3})
    spawn(error_job, loop, tmp_path / "run")
    for rank in range(WORLD):
        message = (tmp_path / f"error-{rank}.txt").read_text()
        assert "pretrain.batch_size=3 does not divide by the 2 processes" in message
        assert "e.g. 2 or 4" in message
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_rows_are_split_by_stride_so_preference_pairs_stay_together(monkeypatch):
    from frontierlm.train import parallel

    # Chosen rows 0-3, then the same pairs' rejected rows 4-7 (preference.pair_batch).
    batch = {"input_ids": torch.arange(8)[:, None]}
    for rank in range(2):
        monkeypatch.setattr(parallel, "world", lambda rank=rank: parallel.World(rank, 2))
        rows = parallel.rank_rows(batch, "align")["input_ids"].flatten().tolist()
        assert rows == [rank, rank + 2, 4 + rank, 4 + rank + 2]
    with pytest.raises(ValueError, match=r"align: a batch of 8 rows .* over 3 processes"):
        monkeypatch.setattr(parallel, "world", lambda: parallel.World(0, 3))
        parallel.rank_rows(batch, "align")


def test_spikes_are_judged_alike_on_every_process(tmp_path):
    """Three corrupted batches in a row: skipped, skipped, skipped, then a rollback to the
    step-20 checkpoint (a sharded load mid-run), as in one process, on the same curve."""
    bad = {23, 24, 25}
    train(new_model(), SPIKY, spiky_task(bad), tmp_path / "one", CPU)
    spawn(spike_job, tmp_path / "two", bad)

    def decisions(run_dir: Path) -> list[tuple]:
        return [
            (e["step"], e["event"], e.get("data_step"), e.get("to_step")) for e in events(run_dir)
        ]

    assert decisions(tmp_path / "two") == decisions(tmp_path / "one")
    assert [e["event"] for e in events(tmp_path / "two")][-1] == "rollback"
    ours, reference = records(tmp_path / "two"), records(tmp_path / "one")
    assert [r["step"] for r in ours] == list(range(1, 41))
    loss_diff = max_difference(ours, reference, "loss")
    assert loss_diff < 1e-4
    print(f"\nspike guard, skips and rollback over 2 processes: max |loss diff| {loss_diff:.2e}")
