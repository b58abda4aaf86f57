"""Benchmark: expert balance of a small MoE trained on the quickstart data, per balancing route.

Runs `recipes/moe-small.toml`'s pretraining once per variant (balancing off, bias, smoothed
bias, auxiliary loss), all on the same tokens (the data, tokenizer and tokenize stages run once
and are shared), and reports each MoE layer's max/mean expert load at the last step and averaged
over the last 20 steps, and over the held-out windows of the final evaluation (the measure
DeepSeek-V3 reports; one training batch of 16 windows mixes few documents, so its load swings
with their domains), with the validation bpb. Baseline in the same run: balancing off.

    python benchmarks/moe_balance.py [--steps 300] [--variants none,bias,smebu,aux_loss]
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import time
from datetime import UTC, datetime
from pathlib import Path

from _runs import ROOT, fresh_run_with_shared_upstream, frontierlm

RECIPE = "recipes/moe-small.toml"
VARIANTS = {
    "none": ["--model.moe_balance=none"],
    "bias": ["--model.moe_balance=bias"],
    "smebu": ["--model.moe_balance=smebu"],
    "aux_loss": ["--model.moe_balance=aux_loss", "--model.moe_score=softmax"],
}


def load_stats(metrics_file: Path, tail: int = 20) -> dict[str, float]:
    """Per MoE layer: max/mean load of the last training step, its mean and max over the last
    `tail` steps, of the last 20 steps' loads pooled (window), and over the final evaluation's
    held-out windows; the final val bpb."""
    records = [json.loads(line) for line in metrics_file.read_text().splitlines() if line]
    final = records[-1]
    layers = sorted(k.split("_")[0] for k in final if re.fullmatch(r"moe\d+_max_over_mean_load", k))
    stats: dict[str, float] = {}
    for layer in layers:
        key = f"{layer}_max_over_mean_load"
        values = [r[key] for r in records[-tail:]]
        stats[f"{layer}_final"] = values[-1]
        stats[f"{layer}_mean_last{tail}"] = sum(values) / len(values)
        stats[f"{layer}_max_last{tail}"] = max(values)
        stats[f"{layer}_window"] = final[f"{key}_20steps"]
        stats[f"{layer}_val"] = final[f"val_{key}"]
    stats["val_bpb"] = final["val_bpb"]
    return stats


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--out", default="benchmarks/out/moe_balance.json")
    args, extra = parser.parse_known_args()
    results = {}
    for variant in args.variants.split(","):
        name = f"bench-moe-balance-{variant}"
        run_dir = fresh_run_with_shared_upstream(RECIPE, "bench-moe-balance-shared", name)
        t0 = time.perf_counter()
        overrides = [f"--run.name={name}", f"--pretrain.steps={args.steps}", *VARIANTS[variant]]
        frontierlm("pretrain", RECIPE, *overrides, *extra)
        results[variant] = {
            **load_stats(run_dir / "pretrain" / "metrics.jsonl"),
            "wall_s": time.perf_counter() - t0,
        }
    layers = sorted({k.split("_")[0] for r in results.values() for k in r if k.startswith("moe")})
    print(
        f"\n{'variant':<10}"
        + "".join(f"{layer + ' step/mean20/max20/window/held-out':>46}" for layer in layers)
        + f"{'val bpb':>9}{'bpb / none':>11}"
    )
    base = results.get("none", {}).get("val_bpb")
    for variant, r in results.items():
        cells = "".join(
            f"{r[f'{layer}_final']:>10.2f}{r[f'{layer}_mean_last20']:>9.2f}"
            f"{r[f'{layer}_max_last20']:>9.2f}{r[f'{layer}_window']:>9.2f}{r[f'{layer}_val']:>9.2f}"
            for layer in layers
        )
        ratio = f"{r['val_bpb'] / base:>11.3f}" if base else ""
        print(f"{variant:<10}{cells}{r['val_bpb']:>9.4f}{ratio}")
    out = ROOT / args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "date": datetime.now(UTC).isoformat(timespec="seconds"),
                "machine": platform.processor() or platform.machine(),
                "steps": args.steps,
                "extra_overrides": extra,
                "results": results,
            },
            indent=2,
        )
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
