"""What training compute costs on real hardware: GPU-hours, wall-clock, energy and dollars.

FLOPs = GPU-hours x 3600 x peak x MFU. The peaks, memory and power come from `gpus.toml`
(dense tensor-core peaks from NVIDIA's datasheets, each with its source). Energy counts the GPUs
at their TDP for the whole run (an upper bound for the GPUs: they rarely sit at TDP) times the
data centre's PUE (power usage effectiveness: facility power over IT power); the CPUs, network
and storage of the nodes are not counted.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from functools import cache
from importlib import resources


@dataclass(frozen=True)
class GPU:
    key: str
    name: str
    bf16_tflops: float
    fp8_tflops: float
    memory_gb: float
    bandwidth_tbs: float
    tdp_w: float
    source: str

    def peak_flops(self, precision: str = "bf16") -> float:
        """Dense peak FLOP/s at `precision` (bf16 or fp8)."""
        if precision not in ("bf16", "fp8"):
            raise ValueError(f"precision must be bf16 or fp8, got {precision!r}")
        tflops = self.bf16_tflops if precision == "bf16" else self.fp8_tflops
        if tflops <= 0:
            raise ValueError(f"{self.name} has no {precision} tensor cores; use --precision bf16")
        return tflops * 1e12


@cache
def gpus() -> dict[str, GPU]:
    table = tomllib.loads(resources.files("frontierlm.plan").joinpath("gpus.toml").read_text())
    return {key: GPU(key=key, **row) for key, row in table.items()}


def gpu(name: str) -> GPU:
    """A GPU by its key, case-insensitive (`h100`, `H100-PCIe`)."""
    table = gpus()
    for key, spec in table.items():
        if key.lower() == name.lower():
            return spec
    raise ValueError(f"unknown GPU {name!r}; known: {', '.join(table)} (frontierlm/plan/gpus.toml)")


@dataclass(frozen=True)
class Hardware:
    """A cluster assumption: how many GPUs of which kind, at what utilisation and price."""

    gpu: GPU
    count: int = 1024
    mfu: float = 0.40  # model FLOPs utilisation; 35-45% is typical of large dense bf16 runs
    precision: str = "bf16"
    price_per_gpu_hour: float | None = None  # USD; no default: prices vary too much to guess
    pue: float = 1.2

    def __post_init__(self) -> None:
        if not 0 < self.mfu <= 1:
            raise ValueError(f"--mfu must be in (0, 1], got {self.mfu}")
        if self.count < 1:
            raise ValueError(f"--gpus must be at least 1, got {self.count}")
        if self.pue < 1:
            raise ValueError(f"--pue must be at least 1, got {self.pue}")
        if self.price_per_gpu_hour is not None and self.price_per_gpu_hour <= 0:
            raise ValueError(f"--price must be positive, got {self.price_per_gpu_hour}")

    @property
    def flops_per_gpu_hour(self) -> float:
        """Useful model FLOPs one GPU does in an hour at this MFU."""
        return self.gpu.peak_flops(self.precision) * self.mfu * 3600.0

    def gpu_hours(self, flops: float) -> float:
        return flops / self.flops_per_gpu_hour

    def flops_from_gpu_hours(self, hours: float) -> float:
        return hours * self.flops_per_gpu_hour

    def flops_from_dollars(self, dollars: float) -> float:
        if self.price_per_gpu_hour is None:
            raise ValueError("--dollars needs --price (USD per GPU-hour)")
        return self.flops_from_gpu_hours(dollars / self.price_per_gpu_hour)

    def bill(self, flops: float) -> dict[str, float | None]:
        """GPU-hours, days on `count` GPUs, energy (MWh) and dollars (None without a price)."""
        hours = self.gpu_hours(flops)
        energy_mwh = hours * self.gpu.tdp_w * self.pue / 1e6
        return {
            "gpu_hours": hours,
            "wall_clock_days": hours / self.count / 24.0,
            "energy_mwh": energy_mwh,
            "dollars": None if self.price_per_gpu_hour is None else hours * self.price_per_gpu_hour,
        }
