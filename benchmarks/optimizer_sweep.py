"""Benchmark: Muon against AdamW on the quickstart pretraining, each over a learning-rate sweep.

Every run trains the quickstart model on the same tokens for the same steps, evaluating
validation loss every `--eval-every` steps on the same held-out windows. Baseline in the same
run: the best AdamW learning rate's final validation loss. Reported: each run's final loss and
the first step at which it reaches that baseline, as a share of the AdamW run's steps (the
issue's bar: Muon within 80%).

    python benchmarks/optimizer_sweep.py [--lrs 2.5e-3,5e-3,1e-2] [--steps 500] [--reuse]
    python benchmarks/optimizer_sweep.py --lrs adamw=1.25e-3,2.5e-3,5e-3/muon=2.5e-3,5e-3,1e-2

`--lrs` is one list for every optimizer, or `name=list` per optimizer separated by `/`, so that
each optimizer's grid can bracket its own optimum.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from datetime import UTC, datetime

from _runs import ROOT, fresh_run_with_shared_upstream, frontierlm

RECIPE = "recipes/quickstart.toml"


def val_curve(run_dir) -> list[tuple[int, float]]:
    records = [
        json.loads(x) for x in (run_dir / "pretrain" / "metrics.jsonl").read_text().split("\n") if x
    ]
    return [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]


def lr_grids(spec: str, optimizers: list[str]) -> dict[str, list[str]]:
    """`2.5e-3,5e-3` for all optimizers, or `adamw=1e-3,2e-3/muon=2e-3,4e-3` per optimizer."""
    if "=" not in spec:
        return {name: spec.split(",") for name in optimizers}
    grids = {}
    for part in spec.split("/"):
        name, _, lrs = part.partition("=")
        grids[name.strip()] = lrs.split(",")
    return grids


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lrs", default="2.5e-3,5e-3,1e-2")
    parser.add_argument("--optimizers", default="adamw,muon")
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--eval-every", type=int, default=25)
    parser.add_argument("--out", default="benchmarks/out/optimizer_sweep.json")
    parser.add_argument(
        "--reuse",
        action="store_true",
        help="take finished runs of the same names and length from runs/ instead of retraining "
        "(to add learning rates to a sweep)",
    )
    args, extra = parser.parse_known_args()
    curves: dict[str, list[tuple[int, float]]] = {}
    walls: dict[str, float] = {}
    grids = lr_grids(args.lrs, args.optimizers.split(","))
    for optimizer, lrs in grids.items():
        for lr in lrs:
            key = f"{optimizer} lr={lr}"
            name = f"bench-opt-{optimizer}-{lr}"
            done = ROOT / "runs" / name
            if args.reuse and (done / "pretrain" / "metrics.jsonl").exists():
                curve = val_curve(done)
                if curve and curve[-1][0] == args.steps:  # a finished run of the same length
                    curves[key], walls[key] = curve, float("nan")
                    continue
            run_dir = fresh_run_with_shared_upstream(RECIPE, "bench-opt-shared", name)
            t0 = time.perf_counter()
            frontierlm(
                "pretrain",
                RECIPE,
                f"--run.name={name}",
                f"--pretrain.optimizer={optimizer}",
                f"--pretrain.lr={lr}",
                f"--pretrain.steps={args.steps}",
                f"--pretrain.eval_every={args.eval_every}",
                *extra,
            )
            walls[key] = time.perf_counter() - t0
            curves[key] = val_curve(run_dir)
    adamw = {k: c for k, c in curves.items() if k.startswith("adamw")}
    best_adamw = min(adamw, key=lambda k: adamw[k][-1][1]) if adamw else None
    target = adamw[best_adamw][-1][1] if best_adamw else None
    rows = {}
    for key, curve in curves.items():
        reached = next((step for step, loss in curve if target and loss <= target), None)
        rows[key] = {
            "final_val_loss": curve[-1][1],
            "steps_to_baseline": reached,
            "share_of_baseline_steps": reached / args.steps if reached else None,
            "wall_s": walls[key],
        }
    print(f"\nbaseline: {best_adamw}, final val loss {target}")
    print(f"{'run':<22}{'final val loss':>15}{'steps to baseline':>19}{'share':>8}{'wall s':>8}")
    for key, r in rows.items():
        share = f"{r['share_of_baseline_steps']:.2f}" if r["share_of_baseline_steps"] else "-"
        reached = r["steps_to_baseline"] or "-"
        print(f"{key:<22}{r['final_val_loss']:>15.4f}{reached:>19}{share:>8}{r['wall_s']:>8.0f}")
    out = ROOT / args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": platform.processor() or platform.machine(),
        "baseline": best_adamw,
        "baseline_final_val_loss": target,
        "extra_overrides": extra,
        "rows": rows,
        "curves": curves,
    }
    out.write_text(json.dumps(payload, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
