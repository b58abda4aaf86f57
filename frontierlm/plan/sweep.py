"""`frontierlm sweep RECIPE --sizes 64x2,128x3,192x4 --tokens 0.2M,0.4M,0.8M`: a grid of small
pretraining runs, the law L(N, D) = E + A/N^alpha + B/D^beta fitted to their final validation
losses (scaling.fit_law, Hoffmann et al.'s Huber fit), and a plot of the fit and its IsoFLOP
curves. `--flops 1e12,4e12` instead of `--tokens` gives true IsoFLOP profiles: each size trains
for the tokens that spend that budget at its exact FLOPs per token.

The recipe's own run directory provides the data, tokenizer and token shards (run first when
missing, skipped when current); each grid point is a run under `runs/<name>/sweep/points/`
whose tokenizer/ and tokenize/ link to them, so every point trains on the same tokens and only
its pretrain stage runs. Points are ordinary stages: a second sweep skips the finished ones, and
a killed point resumes from its checkpoint. Output: `runs/<name>/sweep/sweep.json` (the points,
the law, timing and machine load; `frontierlm plan --law` reads it), `sweep.png`, `report.md`;
`frontierlm report` includes them once a sweep has run.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from frontierlm.atomic import write_text
from frontierlm.config import ConfigError, ModelConfig, RecipeConfig
from frontierlm.console import console
from frontierlm.plan.flops import ModelCount, count_model
from frontierlm.plan.scaling import EPOCH, HOFFMANN, IDENTIFIED_MAX, ScalingLaw, fit_law

UPSTREAM = ("data", "tokenizer", "tokenize")
LINKED = ("tokenizer", "tokenize")  # what pretrain reads from its run directory
WARMUP_FRACTION = 0.1
N_COUNTS = ("non-embedding", "total")  # which parameters the law's N counts
# Fit-quality thresholds for the "weakly identified" warning: a leave-one-out spread of an
# exponent wider than 2x, or an irreducible loss E below 5% of the best run's loss (no floor seen).
WEAK_SPREAD = 2.0
WEAK_E_SHARE = 0.05


def parse_sizes(text: str) -> list[tuple[int, int]]:
    """`64x2,128x3` -> [(d_model, n_layers), ...]."""
    sizes = []
    for part in text.split(","):
        match = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", part)
        if not match:
            raise ValueError(
                f"--sizes: {part!r} is not D_MODELxN_LAYERS (e.g. --sizes 64x2,128x3,192x4)"
            )
        sizes.append((int(match[1]), int(match[2])))
    return sizes


_SUFFIX = {"": 1.0, "k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9, "t": 1e12}


def parse_amounts(text: str, flag: str) -> list[float]:
    """`0.2M,400k,1e6` -> [200000.0, 400000.0, 1000000.0]."""
    amounts = []
    for part in text.split(","):
        match = re.fullmatch(r"\s*([0-9.]+(?:e[+-]?\d+)?)\s*([kKmMbBgGtT]?)\s*", part)
        if not match:
            raise ValueError(f"{flag}: {part!r} is not a number such as 2e5, 200k or 0.2M")
        value = float(match[1]) * _SUFFIX[match[2].lower()]
        if value <= 0:
            raise ValueError(f"{flag}: {part!r} must be positive")
        amounts.append(value)
    return amounts


def point_config(
    cfg: RecipeConfig,
    d_model: int,
    n_layers: int,
    tokens: float,
    points_dir: Path,
    lr: float | None = None,
    warmup_fraction: float = WARMUP_FRACTION,
) -> RecipeConfig:
    """The recipe at one grid point: the model resized (heads of the recipe's head width), the
    run long enough for `tokens`, one evaluation at the end, warmup a fixed share of the steps
    (a fixed count would be most of a short run and a sliver of a long one), peak lr `lr`
    (default: the recipe's)."""
    tree = cfg.model_dump(mode="json")
    head_dim = cfg.model.head_dim
    if d_model % head_dim:
        raise ValueError(
            f"--sizes: d_model {d_model} is not a multiple of the recipe's head width "
            f"{head_dim} (model.d_model / model.n_heads); pick multiples of {head_dim}"
        )
    if not 0 <= warmup_fraction < 1:
        raise ValueError(f"--warmup-fraction must be in [0, 1), got {warmup_fraction}")
    n_heads = d_model // head_dim
    kv = cfg.model.n_kv_heads
    tree["model"].update(
        d_model=d_model,
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=kv if kv and n_heads % kv == 0 else None,
        ffn_hidden=None,  # the default SwiGLU width of d_model
        attn_head_dim=None,
    )
    pre = cfg.pretrain
    step_tokens = pre.batch_size * pre.grad_accum * pre.seq_len
    steps = max(2, round(tokens / step_tokens))
    tree["pretrain"].update(
        steps=steps,
        lr=lr or pre.lr,
        warmup_steps=min(steps - 1, round(warmup_fraction * steps)),
        eval_every=steps,
        checkpoint_every=min(pre.checkpoint_every, steps) if pre.checkpoint_every else 0,
    )
    tree["run"].update(out_dir=str(points_dir), name=point_name(d_model, n_layers, tokens, lr))
    try:
        return RecipeConfig.model_validate(tree)
    except Exception as err:  # pydantic's error names the key
        raise ConfigError(f"sweep point d_model={d_model} n_layers={n_layers}: {err}") from None


def point_name(d_model: int, n_layers: int, tokens: float, lr: float | None = None) -> str:
    return f"d{d_model}-l{n_layers}-t{round(tokens)}" + (f"-lr{lr:g}" if lr else "")


def width_lr(cfg: RecipeConfig, d_model: int, exponent: float) -> float:
    """The recipe's lr moved to another width: lr x (recipe d_model / d_model)^exponent."""
    return cfg.pretrain.lr * (cfg.model.d_model / d_model) ** exponent


def non_embedding_params(count: ModelCount, model: ModelConfig) -> int:
    """Kaplan et al.'s N: active parameters less the token embedding and (untied) output head.
    At these sizes a 4k vocabulary is most of the total (d64: 524k of 578k), so the total would
    hide the body's growth; at planning sizes the two differ by a few percent."""
    head = 0 if model.tie_embeddings else count.embedding_params
    return count.active_params - count.embedding_params - head


def _link_upstream(upstream: Path, point_dir: Path) -> None:
    point_dir.mkdir(parents=True, exist_ok=True)
    for stage in LINKED:
        link = point_dir / stage
        if link.is_symlink() or link.exists():
            if link.is_symlink() and link.resolve() == (upstream / stage).resolve():
                continue
            if not link.is_symlink():
                raise RuntimeError(f"{link} is a directory, not the sweep's link; remove it")
            link.unlink()
        link.symlink_to((upstream / stage).resolve(), target_is_directory=True)


def run_sweep(
    cfg: RecipeConfig,
    sizes: list[tuple[int, int]],
    tokens: list[float] | None = None,
    flops: list[float] | None = None,
    force: bool = False,
    lrs: list[float] | None = None,
    warmup_fraction: float = WARMUP_FRACTION,
    n_count: str = "total",
    lr_width_exponent: float = 0.0,
    jobs: int = 1,
) -> dict[str, Any]:
    """Train the grid and fit the law. One lr for all sizes favours whichever size it was
    tuned for, and the fit then measures the tuning, not the size; two ways out:
    `lr_width_exponent` p: each size trains at the recipe's lr x (recipe d_model / d_model)^p
    (p = 1 is muP's rule for hidden matrices under Adam: the recipe's lr is taken as tuned for
    the recipe's width). `lrs`: a search: each size's smallest budget is trained at every one
    of them and the size's other budgets use the best."""
    from frontierlm.stages import run_stage
    from frontierlm.tokenizer.train import load_tokenizer

    if (tokens is None) == (flops is None):
        raise ValueError("give --tokens or --flops (one of them)")
    if lrs and lr_width_exponent:
        raise ValueError("give --lr-search or --lr-width-exponent, not both")
    if n_count not in N_COUNTS:
        raise ValueError(f"--n-count: {n_count!r} is not one of {', '.join(N_COUNTS)}")
    if jobs < 1:
        raise ValueError(f"--jobs must be at least 1, got {jobs}")
    runs = len(sizes) * len(tokens or flops)
    if runs < 5:
        raise ValueError(
            f"{len(sizes)} sizes x {len(tokens or flops)} budgets = {runs} runs; the law has 5 "
            "parameters (E, A, B, alpha, beta), so the fit needs at least 5 runs"
        )
    t0 = time.perf_counter()
    load_before = os.getloadavg()
    for stage in UPSTREAM:
        run_stage(cfg, stage)
    upstream = cfg.run.run_dir
    vocab = load_tokenizer(upstream / "tokenizer").get_vocab_size()
    sweep_dir = upstream / "sweep"
    points_dir = sweep_dir / "points"
    total = runs + (len(sizes) * (len(lrs) - 1) if lrs else 0)
    done = 0

    def plan_point(
        d_model: int, n_layers: int, n_tokens: float, budget: float | None, lr: float | None
    ) -> tuple[RecipeConfig, float | None]:
        point = point_config(cfg, d_model, n_layers, n_tokens, points_dir, lr, warmup_fraction)
        _link_upstream(upstream, point.run.run_dir)
        return point, budget

    def train_points(planned: list[tuple[RecipeConfig, float | None]]) -> list[dict[str, Any]]:
        """Train the points (in order with one job; longest first over `jobs` processes) and
        return their records in the order given."""
        nonlocal done
        if jobs == 1:
            records = []
            for point, _ in planned:
                done += 1
                console.rule(
                    f"[bold]sweep point {done}/{total}[/]: d_model {point.model.d_model}, "
                    f"{point.model.n_layers} layers, {point.pretrain.steps} steps, "
                    f"lr {point.pretrain.lr:g}"
                )
                records.append(run_stage(point, "pretrain", force=force))
        else:
            records = _train_in_parallel([p for p, _ in planned], jobs, force, done, total)
            done += len(planned)
        return [
            _point_record(point, record, budget, vocab, n_count)
            for (point, budget), record in zip(planned, records, strict=True)
        ]

    points, search = [], []
    size_budgets: list[tuple[int, int, list[tuple[float, float | None]]]] = []
    for d_model, n_layers in sizes:
        budgets = []
        for amount in tokens or flops:
            if tokens is not None:
                budgets.append((amount, None))
                continue
            probe = point_config(cfg, d_model, n_layers, 1.0, points_dir)
            per_token = count_model(probe.model, vocab)
            budgets.append((amount / per_token.train_flops_per_token(cfg.pretrain.seq_len), amount))
        size_budgets.append((d_model, n_layers, sorted(budgets)))
    chosen_lr: dict[tuple[int, int], float | None] = {}
    if lrs:  # each size's smallest budget at every lr; the best one is that budget's grid point
        tried = train_points(
            [plan_point(d, layers, *b[0], each) for d, layers, b in size_budgets for each in lrs]
        )
        for d_model, n_layers, _ in size_budgets:
            own = [p for p in tried if (p["d_model"], p["n_layers"]) == (d_model, n_layers)]
            best = min(own, key=lambda p: p["val_loss"])
            chosen_lr[(d_model, n_layers)] = best["lr"]
            search += [p | {"chosen": p is best} for p in own]
            points.append(best)
        size_budgets = [(d, layers, b[1:]) for d, layers, b in size_budgets]
    else:
        for d_model, n_layers, _ in size_budgets:
            rule = width_lr(cfg, d_model, lr_width_exponent) if lr_width_exponent else None
            chosen_lr[(d_model, n_layers)] = rule
    points += train_points(
        [
            plan_point(d, layers, n_tokens, budget, chosen_lr[(d, layers)])
            for d, layers, budgets in size_budgets
            for n_tokens, budget in budgets
        ]
    )
    size_index = {size: i for i, size in enumerate(sizes)}
    points.sort(key=lambda p: (size_index[(p["d_model"], p["n_layers"])], p["tokens"]))
    law = fit_points(points, loo=True)
    law = dataclasses.replace(law, extra=law.extra | {"n_count": n_count})
    result = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "recipe_run": str(upstream),
        "grid": "isoflop" if flops else "tokens",
        "n_count": n_count,
        "n_is": N_MEANING[n_count],
        "warmup_fraction": warmup_fraction,
        "lr_width_exponent": lr_width_exponent,
        "optimizer": cfg.pretrain.optimizer,
        "lr_search": search,
        "points": points,
        "law": law.to_json(),
        "optimum_at": {
            f"{c:.3g}": dict(zip(("params", "tokens"), law.optimal(c), strict=True))
            for c in (_budgets(points) if law.has_optimum else [])
        },
        "wall_s": round(time.perf_counter() - t0, 1),
        "load_before": load_before,
        "load_after": os.getloadavg(),
        "cpus": os.cpu_count(),
    }
    write_text(sweep_dir / "sweep.json", json.dumps(result, indent=2))
    plot_sweep(result, sweep_dir / "sweep.png")
    write_text(sweep_dir / "report.md", "\n".join(sweep_section(result, "")) + "\n")
    return result


def _point_record(
    point: RecipeConfig, record: dict[str, Any], budget: float | None, vocab: int, n_count: str
) -> dict[str, Any]:
    """What the fit and the report keep of one finished point."""
    m = record["metrics"]
    non_embedding = non_embedding_params(count_model(point.model, vocab), point.model)
    return {
        "name": point.run.name,
        "d_model": point.model.d_model,
        "n_layers": point.model.n_layers,
        "params": m["params"],
        "active_params": m["active_params"],
        "non_embedding_params": non_embedding,
        "n": non_embedding if n_count == "non-embedding" else m["active_params"],
        "tokens": m["tokens_seen"],
        "flops": m["train_flops"],
        "flops_per_token": m["flops_per_token"],
        "budget": budget,
        "steps": point.pretrain.steps,
        "lr": point.pretrain.lr,
        "warmup_steps": point.pretrain.warmup_steps,
        "val_loss": m["val_loss"],
        "val_bpb": m["val_bpb"],
        "wall_s": record["wall_s"],
    }


def _worker_init(devices: Any, threads: int) -> None:
    """A sweep worker process: its own GPU where there are several, `threads` CPU threads, a
    quiet console (the parent prints one line per finished point)."""
    import torch

    if devices is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(devices.get())
    torch.set_num_threads(threads)
    console.quiet = True


def _train_worker(point_json: str, force: bool) -> dict[str, Any]:
    from frontierlm.stages import run_stage

    return run_stage(RecipeConfig.model_validate_json(point_json), "pretrain", force=force)


def _train_in_parallel(
    points: list[RecipeConfig], jobs: int, force: bool, done: int, total: int
) -> list[dict[str, Any]]:
    """Train `points` over `jobs` worker processes, longest first (the last to start are the
    shortest, so the workers finish together); records in the order given. On a machine with
    GPUs each worker takes its own (jobs above the GPU count share them round-robin); on CPU
    each takes cores / jobs threads unless run.threads says how many."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    import torch

    jobs = min(jobs, len(points))
    context = multiprocessing.get_context("spawn")  # no forked torch state in the workers
    devices = None
    gpus = torch.cuda.device_count() if points[0].run.device != "cpu" else 0
    if gpus > 1:
        devices = context.Queue()
        for i in range(jobs):
            devices.put(i % gpus)
    threads = points[0].run.threads or max(1, (os.cpu_count() or 1) // jobs)
    order = sorted(range(len(points)), key=lambda i: -points[i].pretrain.steps)
    records: list[dict[str, Any] | None] = [None] * len(points)
    console.print(f"sweep: {len(points)} points over {jobs} processes, {threads} threads each")
    with ProcessPoolExecutor(jobs, context, _worker_init, (devices, threads)) as pool:
        futures = {pool.submit(_train_worker, points[i].model_dump_json(), force): i for i in order}
        for future in as_completed(futures):
            i = futures[future]
            records[i] = future.result()
            done += 1
            p = points[i]
            console.print(
                f"sweep point {done}/{total}: d_model {p.model.d_model}, {p.model.n_layers} "
                f"layers, {p.pretrain.steps} steps, lr {p.pretrain.lr:g}: val loss "
                f"{records[i]['metrics']['val_loss']:.4f} in {records[i]['wall_s']:.0f} s"
            )
    return [r for r in records if r is not None]


N_MEANING = {
    "non-embedding": "non-embedding parameters (Kaplan et al.'s N: active parameters less the "
    "token embedding and output head); compute in the law is 6 N D with this N",
    "total": "active parameters, embeddings included (Hoffmann et al.'s N)",
}


def point_n(point: dict[str, Any]) -> float:
    """The law's N of a run (sweeps before `n` existed fitted active parameters)."""
    return point.get("n", point["active_params"])


def fit_points(points: list[dict[str, Any]], loo: bool = False) -> ScalingLaw:
    """The law fitted to the runs, its fit quality in `extra` (RMS log residual, R^2 of the
    losses, the largest residual), the range of N and D it was measured on, and with `loo`
    the exponents of each leave-one-out refit: how much one run moves them."""
    n = np.array([point_n(p) for p in points], dtype=np.float64)
    d = np.array([p["tokens"] for p in points], dtype=np.float64)
    loss = np.array([p["val_loss"] for p in points], dtype=np.float64)
    law = fit_law(n, d, loss)
    extra = dict(law.extra)
    extra["n_range"] = [float(n.min()), float(n.max())]
    extra["d_range"] = [float(d.min()), float(d.max())]
    if loo and len(points) > 5:
        alphas, betas = [], []
        # Each refit starts from the full fit's optimum (a jackknife): one L-BFGS run, not 16.
        start = {
            "a": [math.log(law.A)],
            "b": [math.log(law.B)],
            "e": [math.log(law.E)],
            "alpha": [law.alpha],
            "beta": [law.beta],
        }
        for i in range(len(points)):
            keep = np.arange(len(points)) != i
            each = fit_law(n[keep], d[keep], loss[keep], grid=start, starts=0)
            alphas.append(float(each.alpha))
            betas.append(float(each.beta))
        extra["loo_alpha"] = [min(alphas), max(alphas)]
        extra["loo_beta"] = [min(betas), max(betas)]
    return dataclasses.replace(law, extra=extra)


def _budgets(points: list[dict[str, Any]], count: int = 3) -> list[float]:
    """Compute budgets across the runs' range, as the law counts compute: 6 N D."""
    flops = [6.0 * point_n(p) * p["tokens"] for p in points]
    return list(np.geomspace(min(flops), max(flops), count))


def plot_sweep(result: dict[str, Any], path: Path) -> None:
    """Left: final validation loss against tokens, one colour per model size, the fitted law as
    lines. Right: IsoFLOP curves of the fitted law (loss against N at fixed 6ND) with the runs,
    coloured by their compute, and each curve's optimum marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    law = ScalingLaw.from_json(result["law"])
    points = result["points"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.4))
    sizes = sorted({(p["d_model"], p["n_layers"]) for p in points})
    colours = plt.cm.viridis(np.linspace(0, 0.9, len(sizes)))
    d_all = np.array([p["tokens"] for p in points])
    d_line = np.geomspace(d_all.min() / 1.5, d_all.max() * 1.5, 100)
    for size, colour in zip(sizes, colours, strict=True):
        own = [p for p in points if (p["d_model"], p["n_layers"]) == size]
        n = point_n(own[0])
        left.scatter([p["tokens"] for p in own], [p["val_loss"] for p in own], color=colour)
        left.plot(
            d_line, law.loss(n, d_line), color=colour, label=f"{size[0]}x{size[1]} ({n:,.0f})"
        )
    left.set_xscale("log")
    left.set_xlabel("training tokens D")
    left.set_ylabel("validation loss (nats/token)")
    left.set_title(
        f"fit: E={law.E:.3f} A={law.A:.3g} B={law.B:.3g} α={law.alpha:.3f} β={law.beta:.3f}"
    )
    left.legend(fontsize="small", title="d_model x layers (N)")

    n_all = np.array([point_n(p) for p in points])
    budgets = _budgets(points, 4)
    # The curves span the runs and every optimum, so a star never floats off its curve.
    optima = [law.optimal(c)[0] for c in budgets] if law.has_optimum else []
    n_low = min([n_all.min(), *optima]) / 3
    n_high = max([n_all.max(), *optima]) * 3
    n_line = np.geomspace(n_low, n_high, 200)
    cmap = plt.cm.plasma
    for i, c in enumerate(budgets):
        colour = cmap(i / max(1, len(budgets) - 1) * 0.85)
        curve = law.loss(n_line, c / (6 * n_line))
        right.plot(n_line, curve, color=colour, label=f"C = {c:.2g}")
        if law.has_optimum:
            n_opt, d_opt = law.optimal(c)
            right.plot([n_opt], [law.loss(n_opt, d_opt)], "*", color=colour, ms=12)
    lo, hi = np.log(min(budgets)), np.log(max(budgets))
    for p in points:
        c = 6 * point_n(p) * p["tokens"]
        shade = 0.0 if hi == lo else (np.log(c) - lo) / (hi - lo)
        right.scatter(point_n(p), p["val_loss"], color=cmap(shade * 0.85), edgecolor="k")
    losses = [p["val_loss"] for p in points]
    if law.has_optimum:
        losses += [float(law.loss(*law.optimal(c))) for c in budgets]
    span = max(losses) - min(losses) or 0.1
    # A degenerate fit (an exponent running off) would stretch the axis to nothing.
    right.set_ylim(min(losses) - 0.5 * span, max(losses) + 0.5 * span)
    right.set_xscale("log")
    right.set_xlabel(f"parameters N ({result.get('n_count', 'total')})")
    right.set_ylabel("validation loss (nats/token)")
    right.set_title("IsoFLOP curves of the fit (C = 6ND), ★ optimum")
    right.legend(fontsize="small")
    for ax in (left, right):
        ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def fit_warning(law: ScalingLaw) -> str:
    """A sentence when the runs do not pin the law down, else ''."""
    if not law.has_optimum:
        return (
            "The fit has a non-positive exponent: these runs do not constrain the law (too "
            "small a range of sizes or tokens, or runs too short to learn)."
        )
    loose = [name for name, x in (("N", law.alpha), ("D", law.beta)) if x > IDENTIFIED_MAX]
    if loose:
        return (
            f"The {' and '.join(loose)} term is not identified: its exponent ran past 2 (the "
            "edge of Hoffmann et al.'s starting grid), i.e. within these runs the loss hardly "
            f"depends on {' or '.join(loose)}; longer runs or a wider range would separate it."
        )
    notes = []
    floor = WEAK_E_SHARE * float(law.loss(*_largest_run(law)))
    if floor > law.E:
        notes.append(
            f"E ran to {law.E:.3g}: the runs show no loss floor, so E, A and α trade off "
            "against each other and α is not pinned down"
        )
    for name, key in (("α", "loo_alpha"), ("β", "loo_beta")):
        low, high = law.extra.get(key, (1.0, 1.0))
        if low <= 0 or high / low > WEAK_SPREAD:
            notes.append(f"leaving one run out moves {name} from {low:.3g} to {high:.3g}")
    if notes:
        return (
            "Weakly identified: "
            + "; ".join(notes)
            + ". Treat the exponents as rough; more sizes, longer runs or repeated seeds would "
            "narrow them."
        )
    return ""


def _largest_run(law: ScalingLaw) -> tuple[float, float]:
    """The biggest N and D the law was fitted on (its measured range), else a middling run."""
    n_range, d_range = law.extra.get("n_range"), law.extra.get("d_range")
    return (n_range[1], d_range[1]) if n_range and d_range else (1e6, 1e6)


def _first_size(result: dict[str, Any]) -> list[dict[str, Any]]:
    first = result["lr_search"][0]
    return [p for p in result["lr_search"] if p["d_model"] == first["d_model"]]


def fit_quality(law: ScalingLaw, result: dict[str, Any] | None = None) -> list[str]:
    """One sentence on how well the law fits the runs and how firmly they fix its exponents."""
    x = law.extra
    if "rms_log_residual" not in x:
        return []
    parts = [f"Fit quality: RMS log residual {x['rms_log_residual']:.4f}"]
    if "r2" in x:
        parts.append(
            f"R² {x['r2']:.4f} of the losses, largest residual {x['max_abs_residual']:.4f} nats"
        )
    if "loo_alpha" in x:
        (a0, a1), (b0, b1) = x["loo_alpha"], x["loo_beta"]
        parts.append(
            f"leaving one run out moves α within [{a0:.3f}, {a1:.3f}] and β within "
            f"[{b0:.3f}, {b1:.3f}]"
        )
    return ["; ".join(parts) + "."]


def sweep_section(result: dict[str, Any], image_prefix: str = "sweep/") -> list[str]:
    """Markdown: the fitted law next to the published ones, the runs, the plot."""
    law = ScalingLaw.from_json(result["law"])
    load = ", ".join(f"{x:.2f}" for x in result["load_before"])
    lines = [
        "## Scaling-law sweep",
        "",
        f"{len(result['points'])} pretraining runs ({result['grid']} grid) in "
        f"{result['wall_s']:.0f} s on {result['cpus']} CPUs (load average before: {load}), "
        "fitted as Hoffmann et al. did (Huber on log residuals, L-BFGS from a grid of starts). "
        f"N counts {result.get('n_is', N_MEANING['total'])}.",
        "",
        "| law | E | A | B | α | β | a = β/(α+β) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, each in (
        ("this sweep", law),
        ("Hoffmann et al. 2022", HOFFMANN),
        ("Epoch AI 2024", EPOCH),
    ):
        a = each.beta / (each.alpha + each.beta)
        lines.append(
            f"| {name} | {each.E:.3f} | {each.A:.4g} | {each.B:.4g} | {each.alpha:.3f} "
            f"| {each.beta:.3f} | {a:.3f} |"
        )
    lines += ["", *fit_quality(law, result), fit_warning(law), ""]
    if result.get("lr_search"):
        lines += [
            "Learning rate per size: each size's smallest budget at every lr, the best kept "
            "(final validation loss):",
            "",
            "| size | " + " | ".join(f"lr {p['lr']:g}" for p in _first_size(result)) + " |",
            "| --- |" + " ---: |" * len(_first_size(result)),
        ]
        sizes = sorted({(p["d_model"], p["n_layers"]) for p in result["lr_search"]})
        for d_model, n_layers in sizes:
            cells = [
                f"**{p['val_loss']:.4f}**" if p["chosen"] else f"{p['val_loss']:.4f}"
                for p in result["lr_search"]
                if (p["d_model"], p["n_layers"]) == (d_model, n_layers)
            ]
            lines.append(f"| {d_model}x{n_layers} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += [
        "| run | N | D | FLOPs | lr | val loss | val bpb | fit | wall s |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for p in result["points"]:
        fitted = law.loss(point_n(p), p["tokens"])
        lr = f"{p['lr']:g}" if "lr" in p else "-"
        lines.append(
            f"| {p['name']} | {point_n(p):,.0f} | {p['tokens']:,.0f} | {p['flops']:.3g} | {lr} "
            f"| {p['val_loss']:.4f} | {p['val_bpb']:.4f} | {fitted:.4f} | {p['wall_s']:.1f} |"
        )
    lines += ["", f"![sweep.png]({image_prefix}sweep.png)", ""]
    return lines
