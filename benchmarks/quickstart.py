"""Benchmark: the quickstart end to end on this machine, then again (every stage skipped).

Baselines in the same run: the pretrained model's validation bpb against a unigram model fitted
on the same training tokens (ratio), and the second, skipping run against the first (ratio).

    python benchmarks/quickstart.py [--out benchmarks/out/quickstart.json] [overrides ...]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def timed_run(args: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "frontierlm.cli", "run", *args], cwd=ROOT, check=True)
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="benchmarks/out/quickstart.json")
    parser.add_argument("--recipe", default="recipes/quickstart.toml")
    parser.add_argument("--run-name", default="bench-quickstart")
    args, overrides = parser.parse_known_args()
    run_dir = ROOT / "runs" / args.run_name
    shutil.rmtree(run_dir, ignore_errors=True)
    cli = [args.recipe, f"--run.name={args.run_name}", *overrides]
    first = timed_run(cli)
    second = timed_run(cli)

    stages = {}
    for record_file in sorted(run_dir.glob("*/stage.json")):
        record = json.loads(record_file.read_text())
        stages[record["stage"]] = record
    pre = stages["pretrain"]["metrics"]
    ev = stages["eval"]["metrics"]
    rows = [
        ("first run, wall s", first, None, ""),
        ("second run (all skipped), wall s", second, first, "second / first"),
        ("pretrain val bpb", pre["val_bpb"], pre["unigram_bpb"], "model / unigram"),
        ("sft held-out chat bpb", ev["sft_chat_bpb"], ev["pretrain_chat_bpb"], "sft / pretrained"),
        ("DPO held-out reward margin", ev["align_val_margin"], None, "(> 0 wanted)"),
    ]
    print(f"\n{'measure':<36} {'value':>10} {'baseline':>10} {'ratio':>8}  ratio of")
    for name, value, base, what in rows:
        ratio = f"{value / base:.3f}" if base else ""
        base_s = f"{base:.4f}" if base is not None else ""
        print(f"{name:<36} {value:>10.4f} {base_s:>10} {ratio:>8}  {what}")
    for name, record in stages.items():
        print(f"  stage {name:<10} {record['wall_s']:>8.1f} s")
    result = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()} {platform.processor() or ''} cpus={os.cpu_count()}",
        "first_run_s": first,
        "second_run_s": second,
        "stage_wall_s": {n: r["wall_s"] for n, r in stages.items()},
        "pretrain": pre,
        "eval": ev,
    }
    out = ROOT / args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
