"""Benchmark: an engine pool (one worker process per GPU) against one engine, same prompts.

Builds a random-weight FrontierLM model, generates `--new` tokens for `--prompts` prompts of
`--prompt-len` tokens with one in-process engine (the baseline) and with `EnginePool` over every
visible GPU (or `--workers` CPU processes), and reports generated tokens/s of each and their
ratio (same run, same prompts, greedy so both produce the same tokens: checked). Pool start-up
(spawning workers, sending weights) is timed apart from generation; each side first runs the
same call once untimed (cache allocation, CUDA graph capture).

    python benchmarks/engine_pool.py                      # every GPU, a ~125M model
    python benchmarks/engine_pool.py --tiny --workers 2   # CPU smoke run, seconds
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from datetime import UTC, datetime
from pathlib import Path

import torch

from frontierlm.config import ModelConfig
from frontierlm.inference.engine import generate
from frontierlm.inference.pool import EnginePool, default_devices
from frontierlm.inference.sampling import SamplingParams
from frontierlm.model import Transformer


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tiny", action="store_true", help="a tiny model and few prompts (CPU)")
    parser.add_argument("--workers", type=int, default=None, help="default: one per GPU")
    parser.add_argument("--prompts", type=int, default=128)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new", type=int, default=128)
    parser.add_argument("--d-model", type=int, default=768)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--vocab", type=int, default=32768)
    args = parser.parse_args()
    if args.tiny:
        args.prompts, args.prompt_len, args.new = 8, 16, 16
        args.d_model, args.layers, args.vocab = 64, 2, 512
    devices = default_devices(args.workers)
    cfg = ModelConfig(
        d_model=args.d_model,
        n_layers=args.layers,
        n_heads=max(1, args.d_model // 64),
        max_seq_len=args.prompt_len + args.new,
    )
    torch.manual_seed(0)
    model = Transformer(cfg, args.vocab).eval()
    gen = torch.Generator().manual_seed(1)
    prompts = torch.randint(0, args.vocab, (args.prompts, args.prompt_len), generator=gen).tolist()
    params = SamplingParams(max_new_tokens=args.new, temperature=0)

    single_device = devices[0]
    if single_device == "cpu":
        # The pool gives each CPU worker cores / workers threads; the baseline engine gets the
        # same, so the ratio measures running engines side by side (and a loaded machine's
        # oversubscribed thread pool does not slow one side only).
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // len(devices)))
    model_on = model.to(single_device)
    generate(model_on, prompts, params)  # warm-up: cache allocation, CUDA graph capture
    if single_device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    single = generate(model_on, prompts, params)
    if single_device.startswith("cuda"):
        torch.cuda.synchronize()
    single_s = time.perf_counter() - t0
    model = model_on.to("cpu")

    t0 = time.perf_counter()
    with EnginePool(model, devices=devices) as pool:
        start_s = time.perf_counter() - t0
        pool.generate(prompts, params)  # warm-up, as for the single engine
        t0 = time.perf_counter()
        pooled = pool.generate(prompts, params)
        pool_s = time.perf_counter() - t0
    same = [c.ids for c in pooled] == [c.ids for c in single]
    tokens = sum(len(c.ids) for c in single)
    rows = {
        "one engine": {"device": single_device, "s": single_s, "tokens_per_s": tokens / single_s},
        f"pool of {len(devices)}": {
            "device": ",".join(devices),
            "s": pool_s,
            "tokens_per_s": tokens / pool_s,
            "start_s": start_s,
        },
    }
    ratio = single_s / pool_s
    print(
        f"{args.prompts} prompts x {args.new} new tokens, d_model {args.d_model}, "
        f"{args.layers} layers, vocab {args.vocab}; greedy outputs equal: {same}"
    )
    print(f"{'':14} {'device':24} {'seconds':>9} {'tokens/s':>10}")
    for name, row in rows.items():
        print(f"{name:14} {row['device'][:24]:24} {row['s']:9.2f} {row['tokens_per_s']:10.1f}")
    print(f"pool / one engine: {ratio:.2f}x tokens/s (pool start-up {start_s:.1f} s, not counted)")
    record = {
        "benchmark": "engine_pool",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(0)
        if torch.cuda.is_available()
        else platform.processor(),
        "torch": torch.__version__,
        "args": vars(args),
        "rows": rows,
        "pool_over_single": ratio,
        "greedy_equal": same,
        "load": os.getloadavg()[0],
    }
    out_dir = Path(os.environ.get("OUT", "benchmarks/out"))
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "engine_pool.json").write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
