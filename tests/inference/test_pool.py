"""The engine pool: several worker processes, each with its own model copy, fed from one queue."""

from __future__ import annotations

import os
import signal

import pytest
import torch

from frontierlm.inference.engine import generate
from frontierlm.inference.pool import EnginePool, PoolError
from frontierlm.inference.sampling import SamplingParams

PROMPTS = [[1, 2, 3], [7, 8], [9], [4, 5, 6, 7], [11, 12], [13, 2, 2]]


@pytest.fixture(scope="module")
def model():
    from frontierlm.config import ModelConfig
    from frontierlm.model import Transformer

    torch.manual_seed(0)
    return Transformer(ModelConfig(n_layers=2, d_model=64, n_heads=4, n_kv_heads=2), 300).eval()


@pytest.fixture(scope="module")
def pool(model):
    with EnginePool(model, devices=["cpu", "cpu"], chunk_size=2) as pool:
        yield pool


def test_pool_greedy_equals_one_engine_in_prompt_order(model, pool):
    params = SamplingParams(max_new_tokens=5, temperature=0)
    single = generate(model, PROMPTS, params)
    streamed: dict[int, list[int]] = {}
    pooled = pool.generate(
        PROMPTS, params, on_token=lambda i, t: streamed.setdefault(i, []).append(t)
    )
    assert [c.prompt_ids for c in pooled] == PROMPTS
    assert [c.ids for c in pooled] == [c.ids for c in single]
    assert [c.finish_reason for c in pooled] == [c.finish_reason for c in single]
    for a, b in zip(pooled, single, strict=True):
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-5)
    # Tokens streamed from both workers reach the caller under the right prompt index.
    assert [streamed[i] for i in range(len(PROMPTS))] == [c.ids for c in single]


def test_seeded_sampling_repeats_whichever_worker_runs_a_chunk(model, pool):
    params = SamplingParams(max_new_tokens=6, temperature=1.0, seed=7)
    first = [c.ids for c in pool.generate(PROMPTS, params)]
    assert first == [c.ids for c in pool.generate(PROMPTS, params)]
    # Each chunk of 2 prompts is sampled as one engine call with seed + chunk index.
    chunk1 = generate(
        model, PROMPTS[2:4], SamplingParams(max_new_tokens=6, temperature=1.0, seed=8)
    )
    assert first[2:4] == [c.ids for c in chunk1]


def test_new_weights_reach_every_worker(model, pool):
    other = type(model)(model.cfg, model.vocab_size).eval()  # fresh random weights
    params = SamplingParams(max_new_tokens=4, temperature=0)
    pool.update_weights(other)
    try:
        assert [c.ids for c in pool.generate(PROMPTS, params)] == [
            c.ids for c in generate(other, PROMPTS, params)
        ]
    finally:
        pool.update_weights(model)
    assert [c.ids for c in pool.generate(PROMPTS, params)] == [
        c.ids for c in generate(model, PROMPTS, params)
    ]


def test_a_failing_chunk_raises_and_the_pool_goes_on(model, pool):
    params = SamplingParams(max_new_tokens=3, temperature=0)
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        pool.generate([[1], []], params)
    # A token id outside the vocabulary fails inside a worker: the error names it.
    with pytest.raises(
        PoolError, match=r"pool worker \d \(cpu\) failed on the chunk starting at prompt 2"
    ):
        pool.generate([[1], [2], [5000], [3]], params)
    assert [c.ids for c in pool.generate(PROMPTS, params)] == [
        c.ids for c in generate(model, PROMPTS, params)
    ]


def test_a_killed_worker_raises_instead_of_hanging(pool):
    # Last in the file: it ends the module's pool (starting workers costs seconds of imports).
    os.kill(pool._procs[1].pid, signal.SIGKILL)
    pool._procs[1].join()
    params = SamplingParams(max_new_tokens=3, temperature=0)
    with pytest.raises(
        PoolError, match=r"worker 1 \(cpu\) died with exit code -9 \(killed by SIGKILL\)"
    ):
        pool.generate(PROMPTS, params)
    with pytest.raises(PoolError, match="closed"):
        pool.generate(PROMPTS, params)


@pytest.mark.slow
def test_generate_command_with_a_pool_of_workers(served, tiny_run, tmp_path):
    """`frontierlm generate --workers 2`: two worker processes load the model from its
    directory (with the tokenizer for stop strings) and give the one-process output."""
    import json

    from frontierlm.cli import main

    prompts = tmp_path / "p.jsonl"
    texts = ["ROMEO:", "JULIET:", "To be", "First Citizen:", "KING"]
    prompts.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in texts))
    common = ["--file", str(prompts), "--temperature", "0", "--max-new-tokens", "8", "--stop", "e"]
    one, two = tmp_path / "one.jsonl", tmp_path / "two.jsonl"
    assert main(["generate", str(tiny_run), *common, "--out", str(one)]) == 0
    assert main(["generate", str(tiny_run), *common, "--out", str(two), "--workers", "2"]) == 0
    assert one.read_text() == two.read_text()
    assert any(json.loads(line)["finish_reason"] == "stop" for line in one.read_text().splitlines())


@pytest.mark.slow
def test_a_worker_that_cannot_load_the_model_names_itself(tiny_run, tmp_path):
    import shutil

    broken = tmp_path / "model"
    shutil.copytree(tiny_run / "model", broken)
    (broken / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(PoolError, match=r"pool worker 0 \(cpu\) could not load the model"):
        EnginePool(broken, devices=["cpu"])
    with pytest.raises(FileNotFoundError, match="no model at"):
        EnginePool(tmp_path / "missing", devices=["cpu"])
