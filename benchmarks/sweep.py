"""Benchmark: a CPU scaling-law sweep on the quickstart data (issue 10's measure).

Runs `frontierlm sweep recipes/quickstart.toml` over three model sizes and three token budgets
(9 fitted runs sharing one copy of the data, tokenizer and token shards), fits
L(N, D) = E + A/N^alpha + B/D^beta with N the total parameters, and reports the wall
time (the bar: <= 20 minutes for >= 9 runs), the machine's load average before and after (the
machine is shared), the fitted law and its fit quality next to the published exponents, and the
plot. JSON to $OUT or benchmarks/out/.

The design, so that a bigger model is not handicapped by settings tuned for another size, and
so that the fit has something to find (measured on an H200 with 10 variants of this grid, see
RESULTS.md 2026-11-30): Muon on the hidden matrices (its update RMS does not grow with width),
lr = 1e-2 x (192 / d_model)^0.5 per width, a cosine schedule with warmup a tenth of every run,
budgets 0.5M / 1M / 2M tokens (at 0.25M every size ties and the N exponent runs off), N counted
as total parameters as Hoffmann et al. did (with non-embedding N, two of three seeds drove E to 0
and alpha to 0.01), and two points at a time, one per core (`--jobs 2`).

    nice -n 10 python benchmarks/sweep.py --fresh   # 9 runs
    python benchmarks/sweep.py --tiny          # 6 micro-recipe runs, a minute or two: smoke test
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
    parser.add_argument("--tokens", default="0.5M,1M,2M")
    parser.add_argument("--lr-search", default="", help="e.g. 5e-3,1e-2 (instead of the rule)")
    parser.add_argument("--lr-width-exponent", default="0.5", help="lr x (192 / d_model)^this")
    parser.add_argument("--n-count", default="total", choices=["non-embedding", "total"])
    parser.add_argument("--jobs", default="2", help="points trained at once (one per core)")
    parser.add_argument("--name", default="bench-sweep")
    parser.add_argument("--tiny", action="store_true", help="micro recipe, 2 sizes x 2 budgets")
    parser.add_argument("--fresh", action="store_true", help="delete earlier sweep points first")
    args, extra = parser.parse_known_args()  # extra: recipe overrides, e.g. --run.threads=2
    if not any(x.startswith("--run.threads=") for x in extra):
        # One torch thread: on this shared 2-core machine at load ~20, a d=64 step took 1.07 s
        # with 1 thread and 5.5 s with torch's default 2 (threads spinning for a busy core).
        extra.append("--run.threads=1")
    defaults = {"--pretrain.optimizer=": "muon", "--pretrain.lr=": "1e-2"}
    for key, value in defaults.items():
        if not any(x.startswith(key) for x in extra):
            extra.append(key + value)
    if args.tiny:
        args.recipe, args.sizes, args.tokens = "recipes/micro.toml", "32x1,64x2", "10k,20k,40k"
        args.lr_search, args.lr_width_exponent = "", "0"
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
        f"--n-count={args.n_count}",
        f"--jobs={args.jobs}",
        *([f"--lr-search={args.lr_search}"] if args.lr_search else []),
        *([f"--lr-width-exponent={args.lr_width_exponent}"] if not args.lr_search else []),
        *extra,
    )
    wall = time.perf_counter() - t0
    result = json.loads((run_dir / "sweep" / "sweep.json").read_text())
    law = result["law"]
    runs = len(result["points"]) + sum(not p["chosen"] for p in result["lr_search"])
    print(f"\n{runs} runs ({len(result['points'])} fitted) in {wall:.0f} s ({wall / 60:.1f} min)")
    print(f"load average before {load_before}, after {os.getloadavg()}")
    fit = law["extra"]
    print(
        f"fitted ({result['n_count']} N): E={law['E']:.3f} A={law['A']:.4g} B={law['B']:.4g} "
        f"alpha={law['alpha']:.3f} beta={law['beta']:.3f}"
    )
    print(
        f"fit quality: R2 {fit['r2']:.4f}, RMS log residual {fit['rms_log_residual']:.4f}, "
        f"largest residual {fit['max_abs_residual']:.4f} nats; leave-one-out alpha "
        f"{fit['loo_alpha'][0]:.3f}..{fit['loo_alpha'][1]:.3f}, beta "
        f"{fit['loo_beta'][0]:.3f}..{fit['loo_beta'][1]:.3f}"
    )
    for p in result["points"]:
        n, d, loss = p["n"], p["tokens"], p["val_loss"]
        print(f"  {p['name']:<24} N {n:>9,.0f}  D {d:>9,.0f}  loss {loss:.4f}")
    print("published: Hoffmann alpha=0.34 beta=0.28; Epoch alpha=0.3478 beta=0.3658")
    print(f"plot: {run_dir / 'sweep' / 'sweep.png'}")
    out = Path(os.environ.get("OUT", ROOT / "benchmarks" / "out")) / "sweep.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": vars(args) | {"overrides": extra},
        "wall_s": wall,
        "runs": runs,
        "fitted_runs": len(result["points"]),
        "load_before": load_before,
        "load_after": os.getloadavg(),
        "law": law,
        "points": result["points"],
        "lr_search": result["lr_search"],
    }
    out.write_text(json.dumps(payload, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
