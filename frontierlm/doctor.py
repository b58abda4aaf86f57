"""`frontierlm doctor`: a preflight of the machine(s) before a long run.

Checks, each printed as a row (value, expectation, ok / warn / FAIL):
  versions      python, torch, CUDA, NCCL (information)
  accelerator   per GPU: name, memory, ECC error counts (nvidia-smi, where present), and a bf16
                matmul's TFLOP/s against the figure expected for that GPU; none on a CPU machine
                (reported, not a failure unless --require-gpu)
  collective    under torchrun: all-reduce bus bandwidth over all processes (NCCL on GPU, gloo on
                CPU), as nccl-tests define it: bytes * 2 (n - 1) / n / time
  disk          free space and sequential write speed (fsync'd) at the output path
  memory        free RAM (MemAvailable)
A check far below expectation is a failure: the command prints the reasons and exits 1, so a job
script can run `frontierlm doctor && torchrun ...`. Every threshold is a flag.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from frontierlm.console import console

# bf16 dense matmul TFLOP/s measured (8192^3, torch) rather than the datasheet peak: what a
# healthy GPU of the kind reaches. H100 SXM: 780 (this project's measurement); H200 is the same
# chip with more memory. Matched against the device name in order, first substring wins.
EXPECTED_MATMUL_TFLOPS = (
    ("H100 PCIe", 600.0),
    ("H100", 780.0),
    ("H200", 780.0),
    ("H800", 780.0),
    ("GH200", 780.0),
    ("A100", 280.0),
    ("L40S", 300.0),
    ("L4", 100.0),
)


@dataclass
class Check:
    name: str
    value: str
    expected: str = ""
    status: str = "ok"  # ok | info | warn | FAIL
    reason: str = ""
    number: float | None = None  # the measured figure, for the JSON record


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="frontierlm doctor",
        description="preflight checks before a long run; exits 1 naming what is far below "
        "expectation (run it under torchrun to measure the collective bandwidth too)",
    )
    p.add_argument("--path", default="runs", help="output path whose disk is checked")
    p.add_argument("--json", help="also write the results to this JSON file")
    p.add_argument("--require-gpu", action="store_true", help="fail when no GPU is visible")
    p.add_argument(
        "--expect-tflops",
        type=float,
        help="expected bf16 matmul TFLOP/s per GPU (default: by GPU name, see EXPECTED_MATMUL_"
        "TFLOPS; unknown GPUs are measured, not judged)",
    )
    p.add_argument(
        "--min-fraction",
        type=float,
        default=0.7,
        help="fail a measured figure below this share of its expectation (warn below 0.85 of it)",
    )
    p.add_argument("--matmul-size", type=int, default=8192, help="n of the n x n x n matmul")
    p.add_argument(
        "--min-busbw-gbps",
        type=float,
        help="all-reduce bus bandwidth floor, GB/s (default 10 with NCCL, 0.05 with gloo)",
    )
    p.add_argument(
        "--allreduce-mib", type=float, help="all-reduce size in MiB (default 256 GPU, 16 CPU)"
    )
    p.add_argument("--min-free-disk-gib", type=float, default=10.0)
    p.add_argument("--min-write-mbps", type=float, default=50.0, help="sequential write, MB/s")
    p.add_argument("--write-mib", type=int, default=256, help="bytes written by the disk test")
    p.add_argument("--min-free-ram-gib", type=float, default=2.0)
    return p


def _judge(check: Check, measured: float, expected: float | None, fraction: float) -> Check:
    check.number = measured
    if expected is None or expected <= 0:
        check.status = "info"
        return check
    if measured < fraction * expected:
        check.status = "FAIL"
        check.reason = f"{check.name}: {check.value} is below {fraction:.0%} of {check.expected}"
    elif measured < max(fraction, 0.85) * expected:
        check.status = "warn"
    return check


def version_checks() -> list[Check]:
    nccl = "-"
    if torch.cuda.is_available():
        try:
            nccl = ".".join(str(v) for v in torch.cuda.nccl.version())
        except (AttributeError, RuntimeError):
            nccl = "unavailable"
    return [
        Check("python", platform.python_version(), status="info"),
        Check("torch", torch.__version__, status="info"),
        Check("CUDA (torch build)", torch.version.cuda or "none (CPU build)", status="info"),
        Check("NCCL", nccl, status="info"),
    ]


def _nvidia_smi_ecc(index: int) -> str | None:
    """Uncorrected ECC errors since boot (volatile) and aggregate, or None without nvidia-smi."""
    if shutil.which("nvidia-smi") is None:
        return None
    query = (
        "ecc.mode.current,ecc.errors.uncorrected.volatile.total,"
        "ecc.errors.uncorrected.aggregate.total"
    )
    try:
        out = subprocess.run(
            ["nvidia-smi", f"--id={index}", f"--query-gpu={query}", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def matmul_tflops(device: torch.device, n: int, dtype: torch.dtype, seconds: float = 1.0) -> float:
    """Sustained n x n x n matmul rate, TFLOP/s, after a warm-up."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(3):
        a @ b
    sync()
    iters, start = 0, time.perf_counter()
    while True:
        for _ in range(10 if device.type == "cuda" else 1):
            a @ b
            iters += 1
        sync()
        if time.perf_counter() - start >= seconds:
            break
    return 2 * n**3 * iters / (time.perf_counter() - start) / 1e12


def accelerator_checks(args: argparse.Namespace) -> list[Check]:
    if not torch.cuda.is_available():
        n = min(args.matmul_size, 1024)
        rate = matmul_tflops(torch.device("cpu"), n, torch.float32, seconds=0.5)
        status = "FAIL" if args.require_gpu else "info"
        return [
            Check(
                "accelerator",
                "none (CPU only)",
                "a GPU" if args.require_gpu else "",
                status,
                "accelerator: no GPU visible (--require-gpu)" if args.require_gpu else "",
            ),
            Check(
                f"CPU fp32 matmul {n}^3", f"{rate * 1e3:.1f} GFLOP/s", status="info", number=rate
            ),
        ]
    index = torch.cuda.current_device()
    device = torch.device("cuda", index)
    name = torch.cuda.get_device_name(device)
    free, total = torch.cuda.mem_get_info(device)
    checks = [
        Check(f"GPU {index}", name, status="info"),
        Check(
            f"GPU {index} memory",
            f"{total / 2**30:.1f} GiB ({free / 2**30:.1f} free)",
            status="info",
            number=total / 2**30,
        ),
    ]
    ecc = _nvidia_smi_ecc(index)
    if ecc is None:
        checks.append(Check(f"GPU {index} ECC", "not readable (no nvidia-smi)", status="info"))
    else:
        fields = [f.strip() for f in ecc.split(",")]
        errors = [int(f) for f in fields[1:] if f.isdigit()]
        bad = any(errors)
        checks.append(
            Check(
                f"GPU {index} ECC",
                f"mode {fields[0]}, uncorrected volatile/aggregate {'/'.join(fields[1:])}",
                "0 uncorrected",
                "FAIL" if bad else "ok",
                f"GPU {index} ECC: uncorrected errors ({ecc})" if bad else "",
            )
        )
    expected = args.expect_tflops
    if expected is None:
        expected = next((t for key, t in EXPECTED_MATMUL_TFLOPS if key in name), None)
    rate = matmul_tflops(device, args.matmul_size, torch.bfloat16)
    check = Check(
        f"GPU {index} bf16 matmul {args.matmul_size}^3",
        f"{rate:.0f} TFLOP/s",
        f"{expected:.0f} TFLOP/s" if expected else "unknown GPU: not judged",
    )
    checks.append(_judge(check, rate, expected, args.min_fraction))
    return checks


def collective_check(args: argparse.Namespace) -> list[Check]:
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [
            Check("all-reduce", "single process (run under torchrun to measure)", status="info")
        ]
    size = dist.get_world_size()
    nccl = dist.get_backend() == "nccl"
    device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
    mib = args.allreduce_mib or (256 if nccl else 16)
    tensor = torch.ones(int(mib * 2**20) // 4, dtype=torch.float32, device=device)
    for _ in range(2):
        dist.all_reduce(tensor)
    if nccl:
        torch.cuda.synchronize(device)
    dist.barrier()
    iters = 10 if nccl else 5
    start = time.perf_counter()
    for _ in range(iters):
        dist.all_reduce(tensor)
    if nccl:
        torch.cuda.synchronize(device)
    elapsed = (time.perf_counter() - start) / iters
    busbw = tensor.numel() * 4 * 2 * (size - 1) / size / elapsed / 1e9
    floor = args.min_busbw_gbps if args.min_busbw_gbps is not None else (10.0 if nccl else 0.05)
    check = Check(
        f"all-reduce {mib:g} MiB x {size} ({dist.get_backend()})",
        f"{busbw:.2f} GB/s bus bandwidth ({elapsed * 1e3:.1f} ms)",
        f">= {floor:g} GB/s",
        number=busbw,
    )
    if busbw < floor:
        check.status = "FAIL"
        check.reason = f"all-reduce: bus bandwidth {busbw:.2f} GB/s is below {floor:g} GB/s"
    return [check]


def disk_checks(args: argparse.Namespace) -> list[Check]:
    path = Path(args.path)
    path.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(path).free / 2**30
    checks = [
        Check(
            f"disk free at {path}",
            f"{free:.1f} GiB",
            f">= {args.min_free_disk_gib:g} GiB",
            number=free,
        )
    ]
    if free < args.min_free_disk_gib:
        checks[0].status = "FAIL"
        checks[0].reason = f"disk: {free:.1f} GiB free at {path}, below {args.min_free_disk_gib:g}"
    probe = path / f".doctor-write-{os.getpid()}"
    block = os.urandom(2**20)
    try:
        start = time.perf_counter()
        with open(probe, "wb") as f:
            for _ in range(args.write_mib):
                f.write(block)
            f.flush()
            os.fsync(f.fileno())
        rate = args.write_mib * 2**20 / (time.perf_counter() - start) / 1e6
    finally:
        probe.unlink(missing_ok=True)
    write = Check(
        f"disk write at {path}",
        f"{rate:.0f} MB/s ({args.write_mib} MiB, fsync)",
        f">= {args.min_write_mbps:g} MB/s",
        number=rate,
    )
    if rate < args.min_write_mbps:
        write.status = "FAIL"
        write.reason = f"disk: writes at {rate:.0f} MB/s at {path}, below {args.min_write_mbps:g}"
    return [*checks, write]


def free_ram_gib() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30


def memory_check(args: argparse.Namespace) -> list[Check]:
    free = free_ram_gib()
    check = Check("free RAM", f"{free:.1f} GiB", f">= {args.min_free_ram_gib:g} GiB", number=free)
    if free < args.min_free_ram_gib:
        check.status = "FAIL"
        check.reason = f"free RAM: {free:.1f} GiB, below {args.min_free_ram_gib:g} GiB"
    return [check]


def run_checks(args: argparse.Namespace) -> list[Check]:
    return [
        *version_checks(),
        *accelerator_checks(args),
        *collective_check(args),
        *disk_checks(args),
        *memory_check(args),
    ]


def _init_distributed() -> bool:
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return False
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl")
    else:
        dist.init_process_group("gloo")
    return True


def print_table(rows: list[tuple[int, Check]]) -> None:
    from rich.table import Table

    table = Table(title="frontierlm doctor")
    for column in ("rank", "check", "value", "expected", "status"):
        table.add_column(column)
    colours = {"ok": "green", "info": "cyan", "warn": "yellow", "FAIL": "red"}
    for rank, c in rows:
        status = f"[{colours[c.status]}]{c.status}[/]"
        table.add_row(str(rank), c.name, c.value, c.expected, status)
    console.print(table)


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    started = _init_distributed()
    try:
        checks = run_checks(args)
        rank = dist.get_rank() if dist.is_initialized() else 0
        if dist.is_initialized():
            gathered: list[list[Check] | None] = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, checks)
            # Versions, collective, disk and RAM are per machine: shown once per node's first
            # process is enough; accelerators are shown for every process.
            rows = [
                (r, c)
                for r, part in enumerate(gathered)
                for c in part or []
                if r == 0 or c.name.startswith("GPU")
            ]
        else:
            rows = [(0, c) for c in checks]
        failures = [c.reason or c.name for _, c in rows if c.status == "FAIL"]
        if rank == 0:
            print_table(rows)
            if args.json:
                record = {"rows": [{"rank": r, **asdict(c)} for r, c in rows], "failures": failures}
                Path(args.json).write_text(json.dumps(record, indent=2))
            if failures:
                console.print("[red]doctor: failed:[/] " + "; ".join(failures))
            else:
                console.print("[green]doctor: all checks passed")
        return 1 if failures else 0
    finally:
        if started:
            dist.destroy_process_group()
