"""Benchmark: one FP8 linear layer (train/fp8.py) against the same layer in bf16 autocast,
forward + backward, eager and torch.compile'd (compilation fuses the amax, scale and cast
around each fp8 matmul). Baseline in the same run: the bf16 layer.

    python benchmarks/fp8_linear.py [--out benchmarks/out/fp8_linear.json]
"""

from __future__ import annotations

import argparse

import torch
from _runs import write_gpu_report
from attention_moe import bench
from torch import nn

from frontierlm.train.fp8 import convert_to_float8

SHAPES = [(16384, 4096, 4096), (16384, 4096, 14336), (16384, 14336, 4096)]  # tokens, in, out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="benchmarks/out/fp8_linear.json")
    args = parser.parse_args()
    device = torch.device("cuda")
    rows = []
    for tokens, d_in, d_out in SHAPES:
        x = torch.randn(tokens, d_in, device=device, dtype=torch.bfloat16, requires_grad=True)
        grad = torch.randn(tokens, d_out, device=device, dtype=torch.bfloat16)
        flops = 6 * tokens * d_in * d_out
        base = None
        for variant in ("bf16", "fp8 tensorwise", "fp8 rowwise"):
            for compiled in (False, True):
                layer = nn.Linear(d_in, d_out, bias=False, device=device)
                if variant != "bf16":
                    convert_to_float8(nn.ModuleList([layer]), variant.split()[1])
                module = torch.compile(layer) if compiled else layer

                def run(module=module, x=x, grad=grad) -> None:
                    with torch.autocast("cuda", dtype=torch.bfloat16):
                        out = module(x)
                    out.backward(grad)

                try:
                    seconds = bench(run, device)
                except Exception as err:  # a variant this torch cannot run: report it, go on
                    rows.append(
                        {
                            "shape": [tokens, d_in, d_out],
                            "variant": variant,
                            "error": str(err)[:200],
                        }
                    )
                    print(f"{tokens}x{d_in}x{d_out} {variant} compiled={compiled}: {err!s:.200}")
                    continue
                if variant == "bf16" and compiled:
                    base = seconds
                row = {
                    "shape": [tokens, d_in, d_out],
                    "variant": variant,
                    "compiled": compiled,
                    "ms": seconds * 1e3,
                    "tflops": flops / seconds / 1e12,
                    "speedup_vs_bf16_compiled": base / seconds if base else None,
                }
                rows.append(row)
                print(
                    " | ".join(
                        f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}"
                        for k, v in row.items()
                    )
                )
    write_gpu_report(args.out, rows)


if __name__ == "__main__":
    main()
