"""The small training task the loop tests (single- and multi-process) share: a learnable token
stream, windows over it, a fixed validation batch, and a tiny model; and the two chores of the
multi-process tests (tests/train, tests/distributed): joining spawned processes under a
deadline, and stand-in upstream stages for fingerprint checks."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch

from frontierlm.config import ModelConfig, PretrainConfig
from frontierlm.model import Transformer
from frontierlm.train.loop import TrainTask
from frontierlm.train.pretrain import ShuffledWindows, lm_loss


class Crash(Exception):
    """Raised by a task's batch function to stop a run where a test wants it stopped."""


def token_stream() -> np.ndarray:
    rng = np.random.default_rng(0)
    base = np.tile(np.arange(97, dtype=np.uint16), 60)  # a learnable pattern, some noise
    noise = rng.integers(0, 97, size=base.shape, dtype=np.uint16)
    return np.where(rng.random(base.shape) < 0.2, noise, base)


def make_task(
    loop: PretrainConfig, tokens: np.ndarray | None = None, crash_at: int | None = None
) -> TrainTask:
    tokens = token_stream() if tokens is None else tokens
    windows = ShuffledWindows(tokens, loop.seq_len, loop.batch_size, seed=3)
    val = {
        "input_ids": torch.from_numpy(tokens[:64].astype("int64")).view(4, 16),
        "targets": torch.from_numpy(tokens[1:65].astype("int64")).view(4, 16),
    }

    def batch(i: int) -> dict[str, torch.Tensor]:
        if i == crash_at:
            raise Crash
        return windows(i)

    def evaluate(model: torch.nn.Module) -> dict[str, float]:
        return {"loss": lm_loss(model, val)[0].item()}

    return TrainTask("pretrain", batch, lm_loss, evaluate)


def new_model(**fields) -> Transformer:
    torch.manual_seed(0)
    fields = {"d_model": 32, "n_layers": 2, "n_heads": 2, "max_seq_len": 16, **fields}
    return Transformer(ModelConfig(**fields), 97)


def join_within(context, seconds: float, what: str) -> None:
    """Wait for the processes `torch.multiprocessing.start_processes` spawned; past `seconds`
    kill them and fail: a process waiting in a collective its peer never makes would otherwise
    hang the suite."""
    deadline = time.monotonic() + seconds
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"{what} did not finish within {seconds} s (a hang?)")


def fake_upstream(run_dir: Path, stages: tuple[str, ...] = ("tokenizer", "tokenize")) -> None:
    """Stand-in finished upstream stages (a fingerprint and nothing else) in `run_dir`, for
    tests that compute a stage's fingerprint without running what it depends on."""
    for stage in stages:
        (run_dir / stage).mkdir(parents=True)
        (run_dir / stage / "stage.json").write_text('{"fingerprint": "x"}')
