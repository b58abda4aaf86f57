"""Helpers the training benchmarks share: run the CLI, and reuse one copy of the upstream stages
(data, tokenizer, tokenize) for every variant, so all variants train on the same tokens."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
UPSTREAM = ("data", "tokenizer", "tokenize")


def frontierlm(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "frontierlm.cli", *args], cwd=ROOT, check=True)


def fresh_run_with_shared_upstream(recipe: str, shared: str, name: str) -> Path:
    """runs/<name>, emptied, holding copies of runs/<shared>'s upstream stages (run first if
    missing). The copies count as done because their config tables are the same."""
    for stage in UPSTREAM:
        frontierlm(stage, recipe, f"--run.name={shared}")
    run_dir = ROOT / "runs" / name
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    for stage in UPSTREAM:
        shutil.copytree(ROOT / "runs" / shared / stage, run_dir / stage)
    return run_dir


def write_gpu_report(path: str, rows: object, **fields: object) -> None:
    """The JSON a GPU benchmark leaves: its rows with the date, the GPU and torch's version."""
    import json
    from datetime import UTC, datetime

    import torch

    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        **fields,
        "rows": rows,
    }
    out.write_text(json.dumps(payload, indent=2))
    print(f"wrote {out}")
