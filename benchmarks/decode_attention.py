"""Experiment: the decode step's attention kernel at the decode benchmark's shapes (batch 64,
32 query heads over 8 KV heads of 64 dims, per-sequence lengths): SDPA with a boolean mask (what
eager and CPU steps run: on Hopper the sm80 memory-efficient kernel), the same compiled, plain
batched matmuls, FlexAttention's decode kernel (what a compiled GPU step runs), and unmasked SDPA
as a bound (not usable: no per-sequence lengths). The engine-level comparison is
`python benchmarks/decode.py --ablate`.

    python benchmarks/decode_attention.py      # GPU, about 1 minute
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from decode import GPU_MODEL

from frontierlm.config import ModelConfig
from frontierlm.model import attention as attention_module

SDPA_MASKED = attention_module.attend_cached


def matmul_attention(q, keys, values, mask, scale=None, softcap=None):
    batch, heads, _, dim = q.shape
    kv_heads = keys.shape[1]
    q = q.reshape(batch, kv_heads, heads // kv_heads, dim).to(keys.dtype)
    scores = (q @ keys.transpose(-1, -2)).float() * (dim**-0.5 if scale is None else scale)
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    weights = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
    return (weights.to(values.dtype) @ values).reshape(batch, heads, 1, values.shape[-1])


def unmasked_sdpa(q, keys, values, mask, scale=None, softcap=None):  # a bound, not usable
    return F.scaled_dot_product_attention(q.to(keys.dtype), keys, values, enable_gqa=True)


def compiled_with(kernel: str):
    """attend_cached compiled, running `kernel` inside (attention.DECODE_KERNEL)."""

    def run(*inputs):
        attention_module.DECODE_KERNEL = kernel
        try:
            return compiled(*inputs)
        finally:
            attention_module.DECODE_KERNEL = "flex"

    compiled = torch.compile(SDPA_MASKED, dynamic=False)
    return run


def time_us(fn, reps: int = 200) -> float:
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / reps * 1e6


def main() -> None:
    device, hbm = (
        torch.device("cuda"),
        4.8e12 if "H200" in torch.cuda.get_device_name() else 3.35e12,
    )
    report: dict = {"device": torch.cuda.get_device_name(), "kernel": {}}
    cfg = ModelConfig(**GPU_MODEL)
    batch, kv_heads, heads, dim = 64, cfg.kv_heads, cfg.n_heads, cfg.head_dim
    for kv_len in (640, 2048):
        q = torch.randn(batch, heads, 1, dim, device=device, dtype=torch.bfloat16)
        cache = torch.randn(2, batch, kv_heads, 2048, dim, device=device, dtype=torch.bfloat16)
        keys, values = cache[0, :, :, :kv_len], cache[1, :, :, :kv_len]
        lengths = torch.randint(kv_len // 2, kv_len + 1, (batch,), device=device)
        mask = (torch.arange(kv_len, device=device) < lengths[:, None])[:, None, None, :]
        ref = SDPA_MASKED(q, keys, values, mask)
        for name, fn in [
            ("sdpa_masked", SDPA_MASKED),
            ("sdpa_masked_compiled", compiled_with("sdpa")),
            ("matmul_compiled", torch.compile(matmul_attention)),
            ("flex_decode_compiled", compiled_with("flex")),
            ("sdpa_unmasked_bound", unmasked_sdpa),
        ]:
            inputs = (q, keys, values, mask)
            us = time_us(lambda fn=fn, inputs=inputs: fn(*inputs))
            err = (fn(q, keys, values, mask).float() - ref.float()).abs().max().item()
            kv_bytes = 2 * keys.numel() * keys.element_size()
            row = {"us": us, "fraction_of_hbm": kv_bytes / (us * 1e-6) / hbm, "max_err": err}
            report["kernel"][f"{name}@{kv_len}"] = row
            share = row["fraction_of_hbm"]
            print(f"kernel {name:<22} kv {kv_len:5d}: {us:8.1f} us {share:.2f} HBM err {err:.1e}")

    out = Path(os.environ.get("OUT", "benchmarks/out"))
    out.mkdir(parents=True, exist_ok=True)
    (out / "decode_attention.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
