"""Benchmark: the fused causal-attention kernels behind `F.scaled_dot_product_attention` at
pretraining shapes, forward + backward in bf16. Baseline in the same run: the FlashAttention-2
backend, which PyTorch picks by default. Causal FLOPs counted as half of 4 * b * h * s^2 * d
forward, 2.5x that forward + backward.

    python benchmarks/sdpa_backends.py [--out benchmarks/out/sdpa_backends.json]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from _runs import write_gpu_report
from attention_moe import bench
from torch.nn.attention import SDPBackend, sdpa_kernel

SHAPES = [(8, 16, 2048, 128), (8, 8, 2048, 128), (4, 32, 4096, 128)]  # batch, heads, seq, dim
BACKENDS = {
    "flash": SDPBackend.FLASH_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="benchmarks/out/sdpa_backends.json")
    args = parser.parse_args()
    device = torch.device("cuda")
    rows = []
    for b, h, s, d in SHAPES:
        q, k, v = (
            torch.randn(b, h, s, d, device=device, dtype=torch.bfloat16, requires_grad=True)
            for _ in range(3)
        )
        grad = torch.randn_like(q)
        flops = 2.5 * 4 * b * h * s * s * d / 2
        base = None
        for name, backend in BACKENDS.items():

            def run(backend=backend, q=q, k=k, v=v, grad=grad) -> None:
                with sdpa_kernel([backend]):
                    out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
                out.backward(grad)

            try:
                seconds = bench(run, device)
            except RuntimeError as err:  # a backend this build or GPU lacks
                print(f"{(b, h, s, d)} {name}: {err!s:.120}")
                continue
            base = base or seconds
            rows.append(
                {
                    "shape": [b, h, s, d],
                    "backend": name,
                    "ms": seconds * 1e3,
                    "tflops": flops / seconds / 1e12,
                    "vs_flash": base / seconds,
                }
            )
            print(f"{(b, h, s, d)} {name:<10}{seconds * 1e3:8.2f} ms {flops / seconds / 1e12:7.1f}")
    write_gpu_report(args.out, rows)


if __name__ == "__main__":
    main()
