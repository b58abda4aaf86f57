"""Where and in what precision a model runs; applied to a built model, never inside it.

Issue 4 adds DDP/FSDP2, torch.compile, activation checkpointing and float8 here.
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch

from frontierlm.config import RunConfig
from frontierlm.console import console


def select_device(run: RunConfig) -> torch.device:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise NotImplementedError(
            "multi-process training (torchrun with WORLD_SIZE > 1) arrives with issue 4 "
            "(DDP/FSDP2); run a single process for now"
        )
    if run.threads:
        torch.set_num_threads(run.threads)
    if run.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("run.device = 'cuda' but no CUDA GPU is visible; use 'auto' or 'cpu'")
    if run.device == "cpu" or (run.device == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    return torch.device("cuda")


@functools.cache
def cpu_has_native_bf16() -> bool:
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def autocast(device: torch.device, precision: str = "auto") -> contextlib.AbstractContextManager:
    """bf16 autocast on GPU and, when asked, on CPU; otherwise full fp32. Weights, gradients and
    optimizer state stay fp32: autocast only lowers the matmul inputs."""
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    if precision == "bf16" and device.type == "cpu" and not cpu_has_native_bf16():
        # Emulated bf16 matmuls are slower than fp32 and no more accurate: not worth it.
        warn_once("this CPU has no native bf16 (AVX512-BF16/AMX): training in fp32 instead")
        precision = "fp32"
    if precision in ("bf16", "fp8"):  # fp8 layers quantise themselves; the rest runs in bf16
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@functools.cache
def warn_once(message: str) -> None:
    console.print(f"[yellow]warning:[/] {message}")
