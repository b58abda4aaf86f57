"""DiLoCo's claims on the quickstart model, CPU with gloo, islands as processes.

  (a) 4 islands, H = 50, vs. data-parallel training with the same total tokens and global batch:
      final val loss within 2%, >= 40x fewer bytes;
  (b) Streaming DiLoCo (4 fragments, overlap 1, 4-bit outer gradients) vs. plain DiLoCo: loss
      within 1%, >= 4x fewer bytes;
  (c) decoupled islands, one 3x slower: aggregate tokens/s >= 90% of the sum of the islands' solo
      speeds, loss within 3% of synchronous DiLoCo at equal tokens;
  (d) SIGKILL of one asynchronous island mid-run: the others go on, and the island restarted by
      hand rejoins and contributes (events.jsonl shows it);
  (e) (`--parts e`, on a machine with 2 GPUs) the same DiLoCo with one island per GPU: bytes,
      seconds per outer step and the share of time communicating over a simulated 1 Gbit/s link.

With `--processes-per-island K` every island is K processes, data parallel inside (DDP, or
FSDP2 with `--parallel fsdp`), and the outer exchange goes between islands only.

The data-parallel baseline is DDP under torchrun with N = islands x K gloo processes of one
thread each (the islands' CPU share on a shared machine), on the same global batch, steps,
schedule, data stream and held-out windows; its bytes are what DDP's ring all-reduce of fp32
gradients sends, 2 (N - 1) / N x 4 bytes x parameters per worker per step. DiLoCo's bytes
are counted from the payloads the islands actually exchange. "Solo speed" in (c) is an island's
tokens over its own compute time (its steps, slowdown included, without communication or
waiting): what it would do alone; the aggregate is the sum of the islands' rates over their
training steps (exchanges and waiting included, process start-up excluded). The loss-vs-bytes
plot is written beside the JSON.

    python benchmarks/diloco.py --upstream /work/main/runs/bench-opt-shared    # ~20 min, 2 cores
    python benchmarks/diloco.py --upstream runs/bench-opt-shared --parts a --steps 500 \
        --dp-lr 2.5e-3 --inner-lr 1.25e-3 --outer-lr 0.5 --outer-momentum 0.8   # each tuned
    python benchmarks/diloco.py --upstream runs/bench-opt-shared --parts a --batch 1024 \
        --steps 500 --dp-lr 1e-2 --inner-lr 1e-2 --outer-lr 1 --outer-momentum 0 \
        --dp-processes 1 --set pretrain.compile=none      # 20 tokens/parameter, one GPU
    python benchmarks/diloco.py --tiny                                         # smoke run
    python benchmarks/diloco.py --tiny --parts a --processes-per-island 2     # islands of 2
    python benchmarks/diloco.py --parts e --steps 500 --batch 32 --seq-len 256    # 2 GPUs
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from frontierlm.report import loss_vs_bytes, plot_loss_vs_bytes  # noqa: E402
from frontierlm.train.metrics import MetricsLog  # noqa: E402

RECIPE = "recipes/quickstart.toml"


def cli(*args: str, log: Path | None = None, processes: int = 1) -> None:
    """`frontierlm ARGS`; with `processes` > 1 under torchrun (gloo data parallel on CPU)."""
    out = log.open("w") if log else None
    launcher = [sys.executable, "-m", "frontierlm.cli"]
    if processes > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                    f"--nproc_per_node={processes}", "-m", "frontierlm.cli"]  # fmt: skip
    subprocess.run(
        ["nice", "-n", "10", *launcher, *args],
        cwd=ROOT,
        check=True,
        stdout=out,
        stderr=subprocess.STDOUT if out else None,
    )


def prepare(name: str, upstream: Path) -> Path:
    """runs/<name> with the shared tokenizer and token shards linked in."""
    run_dir = ROOT / "runs" / name
    run_dir.mkdir(parents=True, exist_ok=True)
    for stage in ("tokenizer", "tokenize"):
        link = run_dir / stage
        if not link.exists():
            link.symlink_to(upstream.resolve() / stage)
    return run_dir


def stage_metrics(run_dir: Path, stage: str) -> dict:
    return json.loads((run_dir / stage / "stage.json").read_text())["metrics"]


def uptime() -> str:
    return Path("/proc/loadavg").read_text().split()[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--upstream", help="a run directory holding tokenizer/ and tokenize/")
    parser.add_argument("--steps", type=int, default=200, help="inner steps per island")
    parser.add_argument("--batch", type=int, default=16, help="global batch (sequences)")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--islands", type=int, default=4)
    parser.add_argument("--inner-steps", type=int, default=50)
    parser.add_argument(
        "--processes-per-island", type=int, default=1, help="K: processes per island"
    )
    parser.add_argument(
        "--parallel", default="ddp", choices=["ddp", "fsdp"], help="inside an island of K > 1"
    )
    parser.add_argument("--dp-lr", type=float, help="data parallel's lr (default: the recipe's)")
    parser.add_argument("--inner-lr", type=float, help="the islands' lr (default: the recipe's)")
    parser.add_argument("--outer-lr", type=float, help="outer Nesterov lr (default: 0.7)")
    parser.add_argument("--outer-momentum", type=float, help="outer momentum (default: 0.9)")
    parser.add_argument(
        "--dp-processes",
        type=int,
        help="data parallel's DDP workers (default islands x K; 1 = one process on the global "
        "batch, the same arithmetic, for a machine with one GPU)",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a recipe override for every run, e.g. --set run.seed=1 --set pretrain.compile=none",
    )
    parser.add_argument("--parts", default="a,b,c,d", help="which claims to measure")
    parser.add_argument("--tiny", action="store_true", help="a few steps of everything")
    parser.add_argument(
        "--reuse",
        action="store_true",
        help="take finished runs (and their figures) from the last JSON",
    )
    args = parser.parse_args()
    if args.tiny:
        args.steps, args.batch, args.seq_len, args.inner_steps = 20, 8, 32, 10
    parts = set(args.parts.split(","))
    upstream = Path(args.upstream) if args.upstream else ROOT / "runs" / "bench-diloco-shared"
    if not args.upstream:
        for stage in ("data", "tokenizer", "tokenize"):
            cli(stage, RECIPE, "--run.name=bench-diloco-shared")
    out = Path(os.environ.get("OUT", ROOT / "benchmarks" / "out"))
    out.mkdir(parents=True, exist_ok=True)
    M, H, T = args.islands, args.inner_steps, args.steps
    K = args.processes_per_island
    common = [
        RECIPE,
        f"--pretrain.steps={T}",
        f"--pretrain.batch_size={args.batch}",
        f"--pretrain.seq_len={args.seq_len}",
        f"--pretrain.warmup_steps={max(1, T // 10)}",
        f"--pretrain.eval_every={T}",
        "--pretrain.eval_batches=8",
        f"--diloco.islands={M}",
        f"--diloco.inner_steps={H}",
        f"--diloco.processes_per_island={K}",
        f"--run.parallel={args.parallel}",
        *(f"--{override}" for override in args.set),
        "--force",
    ]
    # Each method at its own tuned settings (RESULTS.md 2026-11-30 found them on a GPU).
    tuned = {
        "pretrain": [f"--pretrain.lr={args.dp_lr}"] if args.dp_lr else [],
        "diloco": [
            f"--{key}={value}"
            for key, value in (
                ("pretrain.lr", args.inner_lr),
                ("diloco.outer_lr", args.outer_lr),
                ("diloco.outer_momentum", args.outer_momentum),
            )
            if value is not None
        ],
    }
    previous = out / "diloco.json"
    results: dict[str, dict] = {}
    if args.reuse and previous.is_file():
        results = json.loads(previous.read_text())["runs"]
    curves: dict[str, list] = {}

    def save() -> None:  # after every run, so an interrupted benchmark keeps what it finished
        (out / "diloco.json").write_text(
            json.dumps({"args": vars(args), "rows": [], "runs": results}, indent=2)
        )

    def run(label: str, stage: str, *overrides: str, processes: int = 1) -> dict:
        name = f"bench-diloco-{label}"
        run_dir = prepare(name, upstream)
        if label in results and (run_dir / stage / "stage.json").is_file():
            return results[label]  # --reuse
        load = uptime()
        t0 = time.perf_counter()
        log = out / f"diloco-{label}.log"
        cli(stage, *common, *tuned[stage], f"--run.name={name}", *overrides, log=log,
            processes=processes)  # fmt: skip
        metrics = stage_metrics(run_dir, stage)
        metrics["inner_steps"] = H
        metrics["bench_wall_s"] = time.perf_counter() - t0
        metrics["load_before"], metrics["load_after"] = float(load), float(uptime())
        results[label] = metrics
        print(f"{label}: val_loss {metrics['val_loss']:.4f} in {metrics['bench_wall_s']:.0f}s")
        save()
        return metrics

    if parts & {"a", "b", "c"}:
        run("diloco", "diloco")
        diloco_log = MetricsLog(ROOT / "runs/bench-diloco-diloco/diloco/islands/0/metrics.jsonl")
        label = f"DiLoCo M={M} H={H}" + (f" K={K}" if K > 1 else "")
        curves[label] = loss_vs_bytes(diloco_log.read(), islands=M)
    if "a" in parts:
        # M x K gloo processes of one thread each, like the islands' processes: the same CPU
        # share under load.
        N = M * K
        dp_processes = args.dp_processes or N
        ddp = run("ddp", "pretrain", "--run.threads=1", "--run.parallel=ddp",
                  processes=dp_processes)  # fmt: skip
        params = ddp["params"]
        per_step = N * 2 * (N - 1) / N * 4 * params  # all workers, ring all-reduce, fp32
        ddp["bytes_sent"] = per_step * T
        log = MetricsLog(ROOT / "runs/bench-diloco-ddp/pretrain/metrics.jsonl")
        curves[f"data parallel ({N} workers)"] = loss_vs_bytes(log.read(), bytes_per_step=per_step)
    if "b" in parts:
        run("streaming", "diloco", "--diloco.fragments=4", "--diloco.overlap=1",
            "--diloco.codec=int4")  # fmt: skip
        log = MetricsLog(ROOT / "runs/bench-diloco-streaming/diloco/islands/0/metrics.jsonl")
        curves["Streaming DiLoCo, 4-bit"] = loss_vs_bytes(log.read(), islands=M)
    if "c" in parts:
        slow = ",".join(["1"] * (M - 1) + ["3"])
        # Asynchronous islands are one process each (K > 1 is not built yet, issue 9).
        run("async", "diloco", "--diloco.mode=async", f"--diloco.slowdown=[{slow}]",
            "--diloco.processes_per_island=1")  # fmt: skip
    if "e" in parts:  # one island per GPU (on a machine with them), a simulated 1 Gbit/s link
        run("gpu", "diloco", "--diloco.islands=2", "--diloco.bandwidth_mbit=[1000]",
            "--diloco.latency_ms=[10]", "--pretrain.precision=auto")  # fmt: skip
    if "d" in parts:
        results["kill"] = kill_and_rejoin(common, upstream, out)

    rows = summarise(results, M)
    if curves:
        plot_loss_vs_bytes(curves, out / "diloco_loss_vs_bytes.png")
    (out / "diloco.json").write_text(
        json.dumps({"args": vars(args), "rows": rows, "runs": results}, indent=2)
    )
    print(f"wrote {out / 'diloco.json'}")


def summarise(results: dict[str, dict], islands: int) -> list[dict]:
    rows = []
    print("\n| claim | measured | target | load (1-min, before/after) |\n|---|---|---|---|")

    def row(claim: str, value: float, target: str, ok: bool, run: str) -> None:
        r = results[run]
        load = f"{r.get('load_before', 0):.1f}/{r.get('load_after', 0):.1f}"
        rows.append({"claim": claim, "value": value, "target": target, "met": ok})
        print(f"| {claim} | {value:.4g} {'✓' if ok else '✗'} | {target} | {load} |")

    d = results.get("diloco")
    if d and "ddp" in results:
        p = results["ddp"]
        gap = d["val_loss"] / p["val_loss"] - 1
        ratio = p["bytes_sent"] / d["bytes_sent"]
        row("(a) DiLoCo val loss vs DDP, relative", gap, "<= +2%", gap <= 0.02, "diloco")
        row("(a) DDP bytes / DiLoCo bytes", ratio, ">= 40x", ratio >= 40, "diloco")
    if d and "streaming" in results:
        s = results["streaming"]
        gap = s["val_loss"] / d["val_loss"] - 1
        ratio = d["bytes_sent"] / s["bytes_sent"]
        row("(b) streaming 4-bit val loss vs DiLoCo", gap, "<= +1%", gap <= 0.01, "streaming")
        row("(b) DiLoCo bytes / streaming bytes", ratio, ">= 4x", ratio >= 4, "streaming")
    if d and "async" in results:
        a = results["async"]
        share = a["islands_tokens_per_s"] / a["solo_tokens_per_s_sum"]
        gap = a["val_loss"] / d["val_loss"] - 1
        row("(c) async tokens/s / sum of solo speeds", share, ">= 0.90", share >= 0.9, "async")
        row("(c) async val loss vs sync DiLoCo", gap, "<= +3%", gap <= 0.03, "async")
    if "gpu" in results:
        g = results["gpu"]
        syncs = g["island0_steps"] / results_inner_steps(g)
        per_outer = g["island0_span_s"] / syncs
        comm = g["island0_comm_exposed_s"] / g["island0_span_s"]
        row("(e) bytes sent per island", g["island0_bytes_sent"], "-", True, "gpu")
        row("(e) seconds per outer step (H inner steps + sync)", per_outer, "-", True, "gpu")
        row("(e) share of time communicating at 1 Gbit/s", comm, "-", True, "gpu")
    if "kill" in results:
        k = results["kill"]
        ok = k["others_finished"] and k["rejoined"] and k["contributed_after_rejoin"]
        row("(d) SIGKILL: others go on, restarted island rejoins and contributes", float(ok),
            "1 (yes)", ok, "kill")  # fmt: skip
    return rows


def results_inner_steps(metrics: dict) -> int:
    return int(metrics["inner_steps"])


def kill_and_rejoin(common: list[str], upstream: Path, out: Path) -> dict:
    """An async run: SIGKILL island 1 mid-run, restart it by hand once it has been dropped."""
    name = "bench-diloco-kill"
    run_dir = prepare(name, upstream)
    work = run_dir / "diloco.partial"
    load = uptime()
    overrides = ["--diloco.mode=async", "--diloco.timeout_s=10", "--diloco.rejoin_wait_s=120",
                 "--diloco.processes_per_island=1"]  # fmt: skip
    log = (out / "diloco-kill.log").open("w")
    launcher = subprocess.Popen(
        ["nice", "-n", "10", sys.executable, "-m", "frontierlm.cli", "diloco", *common,
         f"--run.name={name}", *overrides],
        cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    victim = 1
    metrics_path = work / "islands" / str(victim) / "metrics.jsonl"
    steps = int(next(a for a in common if a.startswith("--pretrain.steps=")).split("=")[1])
    while not (metrics_path.exists() and len(MetricsLog(metrics_path).read()) >= steps // 3):
        if launcher.poll() is not None:
            raise RuntimeError(f"the run ended before island {victim} was killed; see {log.name}")
        time.sleep(0.5)
    killed_at = MetricsLog(metrics_path).read()[-1]["step"]
    pid = int((work / "islands" / str(victim) / "pid").read_text())
    os.kill(pid, signal.SIGKILL)
    events = MetricsLog(work / "events.jsonl")
    while not any(e.get("event") == "dropped" for e in events.read()):
        time.sleep(0.5)
    others_steps = {
        i: MetricsLog(work / "islands" / str(i) / "metrics.jsonl").read()[-1]["step"]
        for i in (0, 2)
    }
    restart = subprocess.Popen(
        ["nice", "-n", "10", sys.executable, "-m", "frontierlm.distributed.island", str(work),
         str(victim)],
        cwd=ROOT, stdout=(out / "diloco-kill-restart.log").open("w"), stderr=subprocess.STDOUT,
    )  # fmt: skip
    launcher.wait()
    restart.wait()
    if launcher.returncode:
        raise RuntimeError(f"the launcher failed: see {log.name}")
    final = run_dir / "diloco"
    records = MetricsLog(final / "events.jsonl").read()
    kinds = [(e["event"], e.get("island")) for e in records]
    rejoin_at = kinds.index(("rejoined", victim)) if ("rejoined", victim) in kinds else None
    contributed = rejoin_at is not None and any(
        e["event"] == "outer_step" and victim in e["islands"] for e in records[rejoin_at:]
    )
    finished = {i: MetricsLog(final / "islands" / str(i) / "metrics.jsonl").read()[-1]["step"]
                for i in (0, 2)}  # fmt: skip
    metrics = stage_metrics(run_dir, "diloco")
    return {
        **metrics,
        "killed_at_step": killed_at,
        "others_steps_when_dropped": others_steps,
        "others_final_steps": finished,
        "others_finished": all(finished[i] == steps for i in finished),
        "rejoined": rejoin_at is not None,
        "contributed_after_rejoin": contributed,
        "events": kinds,
        "load_before": float(load),
        "load_after": float(uptime()),
    }


if __name__ == "__main__":
    main()
