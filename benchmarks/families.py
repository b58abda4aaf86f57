"""Benchmark: each architecture-family recipe pretrains on the quickstart data (same tokens,
same steps), with its size, KV cache and speed. Baseline in the same run: dense-llama.

    python benchmarks/families.py [--steps 150] [--recipes dense-llama,dense-qwen3,...]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from datetime import UTC, datetime

from _runs import ROOT, fresh_run_with_shared_upstream, frontierlm

from frontierlm.config import load_config
from frontierlm.model import Transformer

RECIPES = ["dense-llama", "dense-qwen3", "dense-gemma2", "moe-qwen3", "moe-deepseek-v3"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--recipes", default=",".join(RECIPES))
    parser.add_argument("--out", default="benchmarks/out/families.json")
    args, extra = parser.parse_known_args()
    results = {}
    for recipe in args.recipes.split(","):
        path = f"recipes/{recipe}.toml"
        name = f"bench-family-{recipe}"
        run_dir = fresh_run_with_shared_upstream(path, "bench-family-shared", name)
        t0 = time.perf_counter()
        frontierlm("pretrain", path, f"--run.name={name}", f"--pretrain.steps={args.steps}", *extra)
        record = json.loads((run_dir / "pretrain" / "stage.json").read_text())["metrics"]
        cfg = load_config(ROOT / path)
        model = Transformer(cfg.model, cfg.tokenizer.vocab_size)
        results[recipe] = {
            "val_bpb": record["val_bpb"],
            "params": model.num_params(),
            "active_params": model.active_params(),
            "kv_cache_bytes_per_token_bf16": model.kv_cache_bytes_per_token(),
            "flops_per_token": model.flops_per_token(cfg.pretrain.seq_len),
            "wall_s": time.perf_counter() - t0,
        }
    base = results.get("dense-llama", {}).get("val_bpb")
    print(
        f"\n{'recipe':<17}{'params':>10}{'active':>10}{'KV B/tok':>9}{'MFLOP/tok':>10}"
        f"{'wall s':>8}{'val bpb':>9}{'bpb / llama':>12}"
    )
    for recipe, r in results.items():
        ratio = f"{r['val_bpb'] / base:>12.3f}" if base else ""
        print(
            f"{recipe:<17}{r['params']:>10,}{r['active_params']:>10,}"
            f"{r['kv_cache_bytes_per_token_bf16']:>9,}{r['flops_per_token'] / 1e6:>10.1f}"
            f"{r['wall_s']:>8.0f}{r['val_bpb']:>9.4f}{ratio}"
        )
    out = ROOT / args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": platform.processor() or platform.machine(),
        "steps": args.steps,
        "extra_overrides": extra,
        "results": results,
    }
    out.write_text(json.dumps(payload, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
