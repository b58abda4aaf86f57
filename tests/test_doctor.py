"""`frontierlm doctor` on this CPU machine: the table, a failing threshold's exit code, and the
all-reduce bus bandwidth of a 2-process gloo job started by torchrun."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from frontierlm.cli import main
from frontierlm.doctor import matmul_tflops

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--write-mib", "8", "--min-write-mbps", "1", "--min-free-disk-gib", "0.1"]


def test_doctor_reports_no_accelerator_and_passes_on_this_machine(tmp_path):
    out = tmp_path / "doctor.json"
    assert main(["doctor", "--path", str(tmp_path), "--json", str(out), *FAST]) == 0
    rows = {r["name"]: r for r in json.loads(out.read_text())["rows"]}
    assert rows["torch"]["value"] == torch.__version__
    assert rows["accelerator"]["value"] == "none (CPU only)"
    assert rows["free RAM"]["number"] > 0
    assert rows[f"disk write at {tmp_path}"]["number"] > 1
    assert not list(tmp_path.glob(".doctor-write-*"))  # the probe file is removed
    assert json.loads(out.read_text())["failures"] == []


def test_a_check_far_below_expectation_exits_non_zero_naming_it(tmp_path):
    out = ["--json", str(tmp_path / "doctor.json")]
    code = main(["doctor", "--path", str(tmp_path), *FAST, *out, "--min-free-ram-gib", "1e6"])
    assert code == 1
    [failure] = json.loads((tmp_path / "doctor.json").read_text())["failures"]
    assert failure.startswith("free RAM:") and failure.endswith("below 1e+06 GiB")
    assert main(["doctor", "--path", str(tmp_path), *FAST, *out, "--require-gpu"]) == 1
    [failure] = json.loads((tmp_path / "doctor.json").read_text())["failures"]
    assert "no GPU visible" in failure


def test_matmul_rate_is_the_flops_over_the_time():
    # 2 n^3 FLOPs per matmul: a 256^3 fp32 matmul on any CPU runs at 0.1-10000 GFLOP/s.
    rate = matmul_tflops(torch.device("cpu"), 256, torch.float32, seconds=0.2)
    assert 1e-4 < rate < 10


@pytest.mark.slow
def test_doctor_under_torchrun_measures_the_all_reduce(tmp_path):
    out = tmp_path / "doctor.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2"]
    cmd += ["-m", "frontierlm.cli", "doctor", "--path", str(tmp_path), "--json", str(out), *FAST]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    rows = json.loads(out.read_text())["rows"]
    reduce = [r for r in rows if r["name"].startswith("all-reduce 16 MiB x 2 (gloo)")]
    assert len(reduce) == 1 and reduce[0]["number"] > 0.05
    # Fails, and says so, when the floor is set above what loopback gloo can do.
    done = subprocess.run(
        [*cmd, "--min-busbw-gbps", "1e4", "--allreduce-mib", "1"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode != 0
    assert "all-reduce: bus bandwidth" in done.stderr
