"""Where a decode step's time goes: kernel times of the engine's step (benchmarks/decode.py's
1.2B model, batch 64, 640 cached positions), eager and compiled, by torch.profiler.

    python benchmarks/profile_decode.py      # GPU, about 2 minutes
"""

from __future__ import annotations

import torch
from decode import GPU_MODEL
from torch.profiler import ProfilerActivity, profile

from frontierlm.config import ModelConfig
from frontierlm.inference import engine as engine_module
from frontierlm.inference.engine import generate
from frontierlm.inference.sampling import SamplingParams
from frontierlm.model import Transformer
from frontierlm.model.rope import rope_tables


def main() -> None:
    device, vocab, batch, span = torch.device("cuda"), 128256, 64, 640
    cfg = ModelConfig(**GPU_MODEL)
    torch.manual_seed(0)
    with torch.device(device):
        model = Transformer(cfg, vocab).eval()
    model.to(torch.bfloat16)
    cos, sin = rope_tables(cfg)
    model.rope_cos, model.rope_sin = cos.to(device), sin.to(device)
    prompts = torch.randint(0, vocab, (batch, 128)).tolist()
    # The cache must reach the profiled span: 128 prompt + 520 new > 640 positions.
    params = SamplingParams(max_new_tokens=520, temperature=0)
    generate(model, prompts, params, max_batch=batch, cuda_graphs=False)
    engine = next(iter(engine_module._ENGINES.values()))
    for compiled in (False, True):
        if compiled:
            engine.step = torch.compile(engine_module._decode_step)
        engine.positions.fill_(span - 2)
        for _ in range(3):
            engine._decode(span)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(10):
                engine._decode(span)
            torch.cuda.synchronize()
        print(f"=== compiled={compiled}: 10 steps")
        print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=20))


if __name__ == "__main__":
    main()
