"""JSONL metrics on disk: one object per line, safe to resume. Under torchrun every process
reads the log and only rank 0 (`writer=True`) writes it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch


class MetricsLog:
    def __init__(self, path: Path, writer: bool = True) -> None:
        self.path = path
        self.writer = writer

    def truncate_after(self, step: int, key: str = "step") -> None:
        """On resume, forget records from steps the checkpoint does not contain (records
        counted by another `key`, such as an outer version, likewise; those without it stay)."""
        if not self.writer or not self.path.exists():
            return
        kept = [line for line in self.read() if line.get(key, -1) <= step]
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        tmp.replace(self.path)

    def write(self, record: dict[str, Any]) -> None:
        if not self.writer:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def read(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        lines = [line for line in self.path.read_text().splitlines() if line.strip()]
        records = []
        for i, line in enumerate(lines):
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                if i == len(lines) - 1:  # a write torn by a kill: that step reruns on resume
                    break
                raise ValueError(f"{self.path}:{i + 1}: not a JSON record") from None
        return records


# Dense (no sparsity) bf16 tensor-core peaks from the vendors' datasheets, TFLOP/s, matched
# against torch.cuda.get_device_name in this order (the first substring found wins).
PEAK_BF16_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.4),  # SXM ("NVIDIA H100 80GB HBM3")
    ("H200", 989.4),
    ("H800", 989.4),
    ("GH200", 989.4),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.1),
    ("L4", 121.0),
    ("A10", 125.0),
    ("RTX 4090", 165.2),
    ("RTX 3090", 71.0),
)


def peak_flops(device: torch.device, override_tflops: float | None = None) -> float | None:
    """The device's dense bf16 peak in FLOP/s (`run.peak_tflops` when set), None when unknown:
    then no MFU is logged rather than a made-up one."""
    if override_tflops is not None:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, tflops in PEAK_BF16_TFLOPS:
        if key in name:
            return tflops * 1e12
    return None
