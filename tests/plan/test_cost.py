"""GPU table and the bill."""

import pytest

from frontierlm.plan.cost import Hardware, gpu, gpus
from frontierlm.train.metrics import PEAK_BF16_TFLOPS


def test_table_has_the_issue_gpus_with_sources():
    table = gpus()
    for key in ("H100", "H200", "B200", "A100"):
        spec = table[key]
        assert spec.bf16_tflops > 0 and spec.memory_gb > 0 and spec.tdp_w > 0
        assert "datasheet" in spec.source
    assert table["H200"].bf16_tflops == table["H100"].bf16_tflops  # same compute, more HBM
    assert table["H200"].memory_gb == 141.0 and table["A100"].fp8_tflops == 0.0


def test_table_agrees_with_the_mfu_peaks():
    """train/metrics.py looks GPUs up by name for MFU; the two tables must not disagree."""
    peaks = dict(PEAK_BF16_TFLOPS)
    assert peaks["H100"] == gpu("H100").bf16_tflops
    assert peaks["H100 PCIe"] == gpu("h100-pcie").bf16_tflops
    for key in ("H200", "B200", "A100"):
        assert peaks[key] == gpu(key).bf16_tflops


def test_bill_arithmetic():
    hw = Hardware(gpu=gpu("H100"), count=1000, mfu=0.5, price_per_gpu_hour=2.0, pue=1.25)
    per_hour = 989.4e12 * 0.5 * 3600
    bill = hw.bill(per_hour * 24_000)  # 24,000 GPU-hours
    assert bill["gpu_hours"] == pytest.approx(24_000)
    assert bill["wall_clock_days"] == pytest.approx(1.0)
    assert bill["energy_mwh"] == pytest.approx(24_000 * 700 * 1.25 / 1e6)
    assert bill["dollars"] == pytest.approx(48_000)
    assert hw.flops_from_dollars(48_000) == pytest.approx(per_hour * 24_000)
    assert Hardware(gpu=gpu("H100")).bill(1e20)["dollars"] is None


def test_bad_hardware_is_named():
    with pytest.raises(ValueError, match=r"unknown GPU 'V100'.*H100"):
        gpu("V100")
    with pytest.raises(ValueError, match="--mfu"):
        Hardware(gpu=gpu("H100"), mfu=1.5)
    with pytest.raises(ValueError, match="fp8"):
        gpu("A100").peak_flops("fp8")
    with pytest.raises(ValueError, match="--price"):
        Hardware(gpu=gpu("H100")).flops_from_dollars(1e6)
