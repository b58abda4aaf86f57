"""Benchmark: a CPU scaling-law sweep on the quickstart data (issue 10's measure).

Runs `frontierlm sweep recipes/quickstart.toml` over a 3 x 3 grid (three model sizes, three token
budgets; 9 pretraining runs sharing one copy of the data, tokenizer and token shards), fits
L(N, D) = E + A/N^alpha + B/D^beta, and reports the wall time (the bar: <= 20 minutes for >= 9
runs), the machine's load average before and after (the machine is shared), the fitted
exponents against the published ones, and the plot. JSON to $OUT or benchmarks/out/.

    nice -n 10 python benchmarks/sweep.py [--sizes 64x1,128x2,192x4] [--tokens 0.25M,0.5M,1M]
    python benchmarks/sweep.py --tiny          # 4 micro-recipe runs, a minute or two: smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from datetime import UTC, datetime
from pathlib import Path

from _runs import ROOT, frontierlm


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--recipe", default="recipes/quickstart.toml")
    parser.add_argument("--sizes", default="64x1,128x2,192x4")
    parser.add_argument("--tokens", default="0.25M,0.5M,1M")
    parser.add_argument("--name", default="bench-sweep")
    parser.add_argument("--tiny", action="store_true", help="micro recipe, 2 sizes x 2 budgets")
    parser.add_argument("--fresh", action="store_true", help="delete earlier sweep points first")
    args, extra = parser.parse_known_args()  # extra: recipe overrides, e.g. --run.threads=2
    if not any(x.startswith("--run.threads=") for x in extra):
        # One torch thread: on this shared 2-core machine at load ~20, a d=64 step took 1.07 s
        # with 1 thread and 5.5 s with torch's default 2 (threads spinning for a busy core).
        extra.append("--run.threads=1")
    if args.tiny:
        args.recipe, args.sizes, args.tokens = "recipes/micro.toml", "32x1,64x2", "10k,20k"
        args.name = "bench-sweep-tiny"
    run_dir = ROOT / "runs" / args.name
    if args.fresh:
        shutil.rmtree(run_dir / "sweep", ignore_errors=True)
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    frontierlm(
        "sweep",
        args.recipe,
        f"--sizes={args.sizes}",
        f"--tokens={args.tokens}",
        f"--run.name={args.name}",
        *extra,
    )
    wall = time.perf_counter() - t0
    result = json.loads((run_dir / "sweep" / "sweep.json").read_text())
    law = result["law"]
    print(f"\n{len(result['points'])} runs in {wall:.0f} s ({wall / 60:.1f} min; bar 20 min)")
    print(f"load average before {load_before}, after {os.getloadavg()}")
    print(
        f"fitted: E={law['E']:.3f} A={law['A']:.4g} B={law['B']:.4g} "
        f"alpha={law['alpha']:.3f} beta={law['beta']:.3f}"
    )
    print("published: Hoffmann alpha=0.34 beta=0.28; Epoch alpha=0.3478 beta=0.3658")
    print(f"plot: {run_dir / 'sweep' / 'sweep.png'}")
    out = Path(os.environ.get("OUT", ROOT / "benchmarks" / "out")) / "sweep.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": vars(args) | {"overrides": extra},
        "wall_s": wall,
        "runs": len(result["points"]),
        "load_before": load_before,
        "load_after": os.getloadavg(),
        "law": law,
        "points": result["points"],
    }
    out.write_text(json.dumps(payload, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
