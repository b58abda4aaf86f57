"""Where a training step's GPU time goes: one step of a model profiled after warm-up, its kernels
grouped by kind (matmul, attention, elementwise and fused, optimizer, copies) and the heaviest
listed. Variants: FrontierLM's model compiled per block (the loop's way) or whole, and the plain
GPT of benchmarks/pretrain_throughput.py as the baseline.

    python benchmarks/profile_step.py [--model dense-1.3b] [--variants blocks,whole,baseline]
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from pathlib import Path

import torch
from pretrain_throughput import BASELINE_OF, MODELS, SEQ, VOCAB, PlainGPT, model_config
from torch.profiler import ProfilerActivity, profile

from frontierlm.model import Transformer
from frontierlm.train.losses import token_cross_entropy
from frontierlm.train.parallel import apply_compile

KINDS = [
    ("attention", ("flash", "fmha", "cudnn", "attention", "sdpa")),
    ("matmul", ("gemm", "sm90", "cutlass", "xmma", "nvjet", "matmul", "scaled_mm")),
    ("optimizer", ("adam", "multi_tensor", "foreach")),
    ("copy/cast", ("copy", "memcpy", "memset", "cast", "fill")),
    ("fused (triton)", ("triton",)),
]


def kind_of(name: str) -> str:
    low = name.lower()
    for kind, keys in KINDS:
        if any(k in low for k in keys):
            return kind
    return "other"


def build(variant: str, model_name: str, device: torch.device):
    torch.manual_seed(0)
    if variant == "baseline":
        cfg = MODELS[BASELINE_OF[model_name]]
        model = PlainGPT(cfg["d_model"], cfg["n_layers"], cfg["n_heads"]).to(device)
        compiled = torch.compile(model)

        def loss_fn(x, y):
            return compiled(x, y)

    else:
        model = Transformer(model_config(model_name), VOCAB).to(device)
        if variant == "blocks":
            apply_compile(model, device, "blocks")
            run = model
        else:
            apply_compile(model, device, "none")
            run = torch.compile(model)

        def loss_fn(x, y):
            return token_cross_entropy(run(x), y).mean()

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

    def step(x, y):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = loss_fn(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    return step


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="dense-1.3b")
    parser.add_argument("--variants", default="blocks,whole,baseline")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--top", type=int, default=12)
    parser.add_argument("--out", default="benchmarks/out/profile_step.json")
    args = parser.parse_args()
    device = torch.device("cuda")
    x = torch.randint(0, VOCAB, (args.batch_size, SEQ), device=device)
    y = torch.randint(0, VOCAB, (args.batch_size, SEQ), device=device)
    report = {}
    for variant in args.variants.split(","):
        step = build(variant, args.model, device)
        for _ in range(4):
            step(x, y)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(5):
            step(x, y)
        torch.cuda.synchronize()
        step_ms = (time.perf_counter() - t0) / 5 * 1e3
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            step(x, y)
            torch.cuda.synchronize()
        kernels = [
            (e.key, e.device_time_total / 1e3, e.count)
            for e in prof.key_averages()
            if e.device_time_total > 0
        ]
        by_kind: dict[str, float] = defaultdict(float)
        for name, ms, _ in kernels:
            by_kind[kind_of(name)] += ms
        gpu_ms = sum(by_kind.values())
        print(f"\n== {variant}: step {step_ms:.1f} ms wall, {gpu_ms:.1f} ms of kernels")
        for kind, ms in sorted(by_kind.items(), key=lambda kv: -kv[1]):
            print(f"   {kind:<16}{ms:8.1f} ms {ms / gpu_ms:6.1%}")
        top = sorted(kernels, key=lambda k: -k[1])[: args.top]
        for name, ms, count in top:
            print(f"   {ms:8.2f} ms x{count:<4} {name[:110]}")
        report[variant] = {
            "step_ms": step_ms,
            "kernel_ms": gpu_ms,
            "by_kind": by_kind,
            "top": top,
        }
        del step
        torch._dynamo.reset()
        torch.cuda.empty_cache()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
