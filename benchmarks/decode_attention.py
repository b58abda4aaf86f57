"""Experiment: the decode step's attention kernel. SDPA with a boolean mask (what
`attend_cached` calls: on Hopper it runs the sm80 memory-efficient kernel) against plain batched
matmuls with a float32 softmax, first alone at the decode benchmark's shapes, then inside the
engine (graphs + compile) on benchmarks/decode.py's 1.2B model.

    python benchmarks/decode_attention.py      # GPU, about 4 minutes
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from decode import GPU_MODEL, bandwidth_rows

from frontierlm.config import ModelConfig
from frontierlm.inference import engine as engine_module
from frontierlm.inference.engine import generate
from frontierlm.inference.sampling import SamplingParams
from frontierlm.model import Transformer
from frontierlm.model import attention as attention_module
from frontierlm.model.rope import rope_tables

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
    report: dict = {"device": torch.cuda.get_device_name(), "kernel": {}, "engine": {}}
    batch, kv_heads, heads, dim = 64, 8, 32, 128
    for kv_len in (640, 2048):
        q = torch.randn(batch, heads, 1, dim, device=device, dtype=torch.bfloat16)
        cache = torch.randn(2, batch, kv_heads, 2048, dim, device=device, dtype=torch.bfloat16)
        keys, values = cache[0, :, :, :kv_len], cache[1, :, :, :kv_len]
        lengths = torch.randint(kv_len // 2, kv_len + 1, (batch,), device=device)
        mask = (torch.arange(kv_len, device=device) < lengths[:, None])[:, None, None, :]
        ref = SDPA_MASKED(q, keys, values, mask)
        for name, fn in [
            ("sdpa_masked", SDPA_MASKED),
            ("matmul", matmul_attention),
            ("matmul_compiled", torch.compile(matmul_attention)),
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

    cfg = ModelConfig(**GPU_MODEL)
    vocab = 128256
    torch.manual_seed(0)
    with torch.device(device):
        model = Transformer(cfg, vocab).eval()
    model.to(torch.bfloat16)
    cos, sin = rope_tables(cfg)
    model.rope_cos, model.rope_sin = cos.to(device), sin.to(device)
    args = SimpleNamespace(batch=64, prompt=128, new=512)
    prompts = torch.randint(0, vocab, (args.batch, args.prompt)).tolist()
    params = SamplingParams(max_new_tokens=args.new, temperature=0)
    outputs = {}
    for name, fn in [("matmul", matmul_attention), ("sdpa_masked", SDPA_MASKED)]:
        attention_module.attend_cached = fn
        engine_module._ENGINES.clear()
        generate(model, prompts, params, max_batch=args.batch, compile=True)
        torch.cuda.synchronize()
        start = time.perf_counter()
        done = generate(model, prompts, params, max_batch=args.batch, compile=True)
        torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        outputs[name] = torch.tensor([c.ids for c in done])
        row = {"seconds": seconds, "tokens_per_s": args.batch * args.new / seconds}
        row |= bandwidth_rows(model, args, seconds, device)
        report["engine"][name] = row
        run, replay = row["run_fraction_of_floor"], row["replay_fraction_of_floor"]
        print(f"engine {name}: {row['tokens_per_s']:.0f} tok/s, floor {run:.3f} / {replay:.3f}")
    same = (outputs["matmul"] == outputs["sdpa_masked"]).int().cumprod(1).sum(1).float().mean()
    report["engine"]["leading_tokens_equal"] = same.item()
    print(f"leading tokens equal between the two: {same.item():.1f} of {args.new}")
    out = Path(os.environ.get("OUT", "benchmarks/out"))
    out.mkdir(parents=True, exist_ok=True)
    (out / "decode_attention.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
