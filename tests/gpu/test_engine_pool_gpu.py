"""The engine pool on GPUs: one worker process per visible GPU (spawned, each on its own device)
gives the single-engine greedy output in prompt order, and takes new weights.

Needs CUDA; run on the device machine: `python -m pytest tests/gpu -m gpu` (two GPUs exercise
two workers; one GPU still checks the CUDA worker path)."""

from __future__ import annotations

import pytest
import torch

from frontierlm.inference.engine import generate
from frontierlm.inference.pool import EnginePool, default_devices
from frontierlm.inference.sampling import SamplingParams

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (device machine)"),
]


def test_pool_over_gpus_equals_one_engine(make_random_model):
    model = make_random_model(vocab_size=512, d_model=128, n_layers=2, n_heads=4)
    devices = default_devices()
    assert devices == [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    prompts = [[i + 1, (3 * i) % 500 + 1, 7] for i in range(8)]
    params = SamplingParams(max_new_tokens=12, temperature=0)
    single = generate(model.cuda(), prompts, params)
    with EnginePool(model.cpu(), devices=devices, chunk_size=2) as pool:
        assert [c.ids for c in pool.generate(prompts, params)] == [c.ids for c in single]
        other = make_random_model(vocab_size=512, seed=1, d_model=128, n_layers=2, n_heads=4)
        pool.update_weights(other)
        want = generate(other.cuda(), prompts, params)
        assert [c.ids for c in pool.generate(prompts, params)] == [c.ids for c in want]
