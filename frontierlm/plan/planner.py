"""`frontierlm plan`: from any two of compute, parameters and tokens, the third; the
compute-optimal split by the 20-tokens-per-parameter rule and both published fits (and a fitted
law from `frontierlm sweep`); batch size and learning rate; the bill on a cluster; and a model
config of that size as a recipe snippet.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from frontierlm.atomic import write_text
from frontierlm.config import ModelConfig
from frontierlm.plan.cost import Hardware, gpu, gpus
from frontierlm.plan.flops import config_for_params, count_model
from frontierlm.plan.scaling import (
    IDENTIFIED_MAX,
    PUBLISHED,
    TOKENS_PER_PARAM,
    ScalingLaw,
    deepseek_batch_lr,
    tokens_per_param_optimum,
)
from frontierlm.plan.sweep import fit_warning


@dataclass
class Rule:
    """How to split compute into N and D when only one of C, N, D is given."""

    name: str
    law: ScalingLaw | None = None  # None: D = ratio * N
    ratio: float = TOKENS_PER_PARAM

    def split(self, compute: float) -> tuple[float, float]:
        if self.law is None:
            return tokens_per_param_optimum(compute, self.ratio)
        return self.law.optimal(compute)

    def compute_for_params(self, n: float) -> float:
        if self.law is None:
            return 6.0 * n * self.ratio * n
        law = self.law  # N = G (C/6)^a  =>  C = 6 (N / G)^(1/a)
        g, a = _g(law), law.beta / (law.alpha + law.beta)
        return 6.0 * (n / g) ** (1.0 / a)

    def compute_for_tokens(self, d: float) -> float:
        if self.law is None:
            return 6.0 * (d / self.ratio) * d
        law = self.law  # D = (C/6)^b / G  =>  C = 6 (D G)^(1/b)
        g, b = _g(law), law.alpha / (law.alpha + law.beta)
        return 6.0 * (d * g) ** (1.0 / b)


def _g(law: ScalingLaw) -> float:
    return (law.alpha * law.A / (law.beta * law.B)) ** (1.0 / (law.alpha + law.beta))


def add_plan_arguments(p: argparse.ArgumentParser) -> None:
    budget = p.add_argument_group("compute budget (one of)")
    budget.add_argument("--flops", type=float, help="training FLOPs, e.g. 5.76e23")
    budget.add_argument("--gpu-hours", type=float, help="GPU-hours on --gpu at --mfu")
    budget.add_argument("--dollars", type=float, help="USD at --price per GPU-hour")
    p.add_argument("--params", type=float, help="model parameters N, e.g. 70e9")
    p.add_argument(
        "--recipe", help="take N (active parameters) from this recipe's model and vocabulary"
    )
    p.add_argument("--tokens", type=float, help="training tokens D, e.g. 1.4e12")
    p.add_argument(
        "--optimum",
        choices=["tokens-per-param", "hoffmann", "epoch", "law"],
        help="how one given quantity is split into N and D (default: the --law when given, "
        "else tokens-per-param)",
    )
    p.add_argument("--tokens-per-param", type=float, default=TOKENS_PER_PARAM)
    p.add_argument("--law", help="a fitted scaling law: sweep.json from `frontierlm sweep`")
    p.add_argument("--gpu", default="H100", help=f"one of {', '.join(gpus())}")
    p.add_argument("--gpus", type=int, default=1024, help="GPUs in the cluster (wall-clock)")
    p.add_argument("--mfu", type=float, default=0.40, help="model FLOPs utilisation assumed")
    p.add_argument("--precision", choices=["bf16", "fp8"], default="bf16")
    p.add_argument("--price", type=float, help="USD per GPU-hour")
    p.add_argument("--pue", type=float, default=1.2, help="data-centre power usage effectiveness")
    p.add_argument("--seq-len", type=int, default=4096, help="training context length")
    p.add_argument("--vocab", type=int, default=131072, help="vocabulary of the matched config")
    p.add_argument("--json", help="also write the plan as JSON here")


def _given_compute(args: argparse.Namespace, hardware: Hardware) -> float | None:
    given = [k for k in ("flops", "gpu_hours", "dollars") if getattr(args, k) is not None]
    if len(given) > 1:
        names = ", ".join("--" + k.replace("_", "-") for k in given)
        raise ValueError(f"give one compute budget, not {names}")
    for key in ("flops", "gpu_hours", "dollars", "params", "tokens"):
        value = getattr(args, key)
        if value is not None and not value > 0:
            raise ValueError(f"--{key.replace('_', '-')} must be positive, got {value}")
    if args.flops is not None:
        return args.flops
    if args.gpu_hours is not None:
        return hardware.flops_from_gpu_hours(args.gpu_hours)
    if args.dollars is not None:
        return hardware.flops_from_dollars(args.dollars)
    return None


def _rule(args: argparse.Namespace, law: ScalingLaw | None) -> Rule:
    choice = args.optimum or ("law" if law else "tokens-per-param")
    if choice == "law":
        if law is None:
            raise ValueError("--optimum law needs --law PATH (a sweep.json)")
        if law.has_optimum and not law.identified:
            raise ValueError(
                f"--law {args.law}: alpha {law.alpha:.3g}, beta {law.beta:.3g}: an exponent past "
                f"{IDENTIFIED_MAX:g} means those runs barely depend on N (or D), so the law's "
                "optimum is an artefact; plan with --optimum epoch/hoffmann/tokens-per-param, "
                "or sweep sizes/budgets where size pays off"
            )
        return Rule(f"fitted law ({args.law})", law)
    if choice in PUBLISHED:
        return Rule(PUBLISHED[choice].name, PUBLISHED[choice])
    if not args.tokens_per_param > 0:
        raise ValueError(f"--tokens-per-param must be positive, got {args.tokens_per_param}")
    return Rule(f"{args.tokens_per_param:g} tokens per parameter", ratio=args.tokens_per_param)


def _recipe_model(path: str) -> tuple[ModelConfig, int, int]:
    from frontierlm.config import load_config

    cfg = load_config(path)
    return cfg.model, cfg.tokenizer.vocab_size, cfg.pretrain.seq_len


def make_plan(args: argparse.Namespace) -> dict[str, Any]:
    hardware = Hardware(
        gpu=gpu(args.gpu),
        count=args.gpus,
        mfu=args.mfu,
        precision=args.precision,
        price_per_gpu_hour=args.price,
        pue=args.pue,
    )
    law = ScalingLaw.load(args.law) if args.law else None
    rule = _rule(args, law)
    compute = _given_compute(args, hardware)
    if args.recipe and args.params is not None:
        raise ValueError("give --params or --recipe, not both")
    model: tuple[ModelConfig, int, int] | None = None
    n = args.params
    if args.recipe:
        model = _recipe_model(args.recipe)
        n = float(count_model(model[0], model[1]).active_params)
    d = args.tokens
    given = {"compute": compute is not None, "params": n is not None, "tokens": d is not None}
    notes = []
    if law is not None and (warning := fit_warning(law)):
        notes.append(f"--law {args.law}: {warning}")
    if not any(given.values()):
        raise ValueError(
            "give a compute budget (--flops, --gpu-hours or --dollars), --params (or --recipe) "
            "or --tokens; any two fix the third"
        )
    if compute is None:
        if n is not None and d is not None:
            compute = 6.0 * n * d
        elif n is not None:
            compute = rule.compute_for_params(n)
            d = compute / (6.0 * n)
            notes.append(f"tokens for {n:.3g} parameters by {rule.name}")
        else:
            compute = rule.compute_for_tokens(d)
            n = compute / (6.0 * d)
            notes.append(f"parameters for {d:.3g} tokens by {rule.name}")
    elif n is None and d is None:
        n, d = rule.split(compute)
        notes.append(f"N and D split by {rule.name}")
    elif n is None:
        n = compute / (6.0 * d)
    elif d is None:
        d = compute / (6.0 * n)
    else:
        notes.append(
            f"all three given: 6ND = {6 * n * d:.4g} is {6 * n * d / compute:.3f}x the budget"
        )

    optima = {"tokens_per_param": _optimum_row(f"{args.tokens_per_param:g} tokens/param", None)}
    tpp_n, tpp_d = tokens_per_param_optimum(compute, args.tokens_per_param)
    optima["tokens_per_param"] |= {"params": tpp_n, "tokens": tpp_d}
    laws = dict(PUBLISHED)
    if law is not None:
        laws["law"] = law
    for key, each in laws.items():
        if not each.has_optimum:
            notes.append(f"{args.law}: alpha or beta is not positive, so it gives no optimum")
            continue
        if not each.identified:
            notes.append(
                f"{args.law}: alpha {each.alpha:.3g} / beta {each.beta:.3g} past "
                f"{IDENTIFIED_MAX:g}: the runs do not identify that term, so no optimum is shown"
            )
            continue
        row = _optimum_row(each.name if key != "law" else f"fitted law ({args.law})", each)
        row["params"], row["tokens"] = each.optimal(compute)
        row["loss"] = float(each.loss(row["params"], row["tokens"]))
        optima[key] = row
    if law is not None:
        notes += law_notes(law, n, d)

    if model is None:
        shape = config_for_params(n, args.vocab, args.seq_len)
        model = (shape.cfg, args.vocab, args.seq_len)
        if abs(shape.count.params / n - 1) > 0.1:
            notes.append(
                f"the nearest dense shape with a {args.vocab}-token vocabulary has "
                f"{shape.count.params:.3g} parameters, not {n:.3g} (--vocab sets the embeddings)"
            )
    cfg, vocab, seq_len = model
    count = count_model(cfg, vocab)
    batch_tokens, lr = deepseek_batch_lr(compute)
    batch_seqs = max(1, round(batch_tokens / seq_len))
    steps = max(1, round(d / (batch_seqs * seq_len)))
    exact = count.train_flops_per_token(seq_len) * d
    return {
        "compute_flops": compute,
        "params": n,
        "tokens": d,
        "tokens_per_param": d / n,
        "given": given,
        "notes": notes,
        "predicted_loss": {k: float(v.loss(n, d)) for k, v in laws.items()},
        "optima": optima,
        "batch_lr": {
            "batch_tokens": batch_tokens,
            "batch_sequences": batch_seqs,
            "lr": lr,
            "rule": "DeepSeek LLM (arXiv 2401.02954, eq. 1): B = 0.2920 C^0.3271 tokens, "
            "lr = 0.3118 C^-0.1250 (AdamW; fitted at 1e17-2e19 FLOPs)",
        },
        "hardware": {
            "gpu": hardware.gpu.name,
            "gpus": hardware.count,
            "mfu": hardware.mfu,
            "precision": hardware.precision,
            "peak_tflops": hardware.gpu.peak_flops(hardware.precision) / 1e12,
            "price_per_gpu_hour": hardware.price_per_gpu_hour,
            "pue": hardware.pue,
            "tdp_w": hardware.gpu.tdp_w,
            "memory_gb": hardware.gpu.memory_gb,
            "source": hardware.gpu.source,
        },
        "bill": hardware.bill(compute),
        "model": {
            "count": count.as_dict(),
            "seq_len": seq_len,
            "vocab_size": vocab,
            "train_flops_per_token": count.train_flops_per_token(seq_len),
            "six_n_flops_per_token": 6.0 * count.active_params,
            "exact_train_flops": exact,
            "inference_flops_per_token": count.inference_flops_per_token(seq_len),
            "kv_cache_bytes_per_sequence": count.kv_cache_bytes_per_token * seq_len,
            "from_recipe": args.recipe,
        },
        "recipe_snippet": recipe_snippet(cfg, vocab, seq_len, batch_seqs, steps, lr),
    }


def law_notes(law: ScalingLaw, n: float, d: float) -> list[str]:
    """What a fitted law can and cannot say at this plan's N and D: which parameters its N
    counts, how well it fits its runs, and how far outside them the plan reaches."""
    x = law.extra
    notes = []
    if x.get("n_count") == "non-embedding":
        notes.append(
            "the fitted law counts N without the embedding and output head (Kaplan et al.) and "
            "its compute as 6 N D with that N: its N and D are non-embedding figures"
        )
    if "r2" in x:
        notes.append(
            f"the fitted law: alpha {law.alpha:.3f}, beta {law.beta:.3f}, R^2 {x['r2']:.4f} "
            f"and RMS log residual {x['rms_log_residual']:.4f} over its {x.get('runs', '?')} runs"
        )
    if "n_range" in x and "d_range" in x:
        (n0, n1), (d0, d1) = x["n_range"], x["d_range"]
        reach = []
        for name, value, low, high in (("N", n, n0, n1), ("D", d, d0, d1)):
            if value > high:
                reach.append(f"{name} {value / high:.2g}x past its largest run")
            elif value < low:
                reach.append(f"{name} {low / value:.2g}x below its smallest run")
        span = f"measured on N {n0:.3g}-{n1:.3g}, D {d0:.3g}-{d1:.3g}"
        if reach:
            notes.append(
                f"the fitted law was {span}; this plan extrapolates it ({', '.join(reach)}): "
                "its exponents are a trend to check against a larger sweep, not a forecast"
            )
        else:
            notes.append(f"the fitted law was {span}; this plan lies inside that range")
    return notes


def _optimum_row(name: str, law: ScalingLaw | None) -> dict[str, Any]:
    source = law.source if law else "Chinchilla (Hoffmann et al. 2022): 70B on 1.4T tokens"
    return {"name": name, "source": source}


def recipe_snippet(
    cfg: ModelConfig, vocab: int, seq_len: int, batch: int, steps: int, lr: float
) -> str:
    """The TOML tables that give a recipe this model and run length (merge into a recipe)."""
    defaults = ModelConfig()
    lines = ["[tokenizer]", f"vocab_size = {vocab}", "", "[model]"]
    for key, value in cfg.model_dump().items():
        if value != getattr(defaults, key) or key in ("d_model", "n_layers", "n_heads"):
            lines.append(f"{key} = {_toml(value)}")
    warmup = min(2000, max(1, steps // 100))
    lines += [
        "",
        "[pretrain]",
        f"steps = {steps}",
        f"batch_size = {batch}                 # sequences per step (global)",
        f"seq_len = {seq_len}",
        f"lr = {lr:.3g}",
        f"warmup_steps = {warmup}",
        'schedule = "wsd"',
        'precision = "auto"',
    ]
    return "\n".join(lines) + "\n"


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    return repr(value)


def _si(x: float, unit: str = "") -> str:
    for scale, prefix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{prefix}{unit}"
    return f"{x:.3g}{unit}"


def print_plan(plan: dict[str, Any]) -> None:
    from rich.table import Table

    from frontierlm.console import console

    given = ", ".join(k for k, v in plan["given"].items() if v)
    console.print(f"[bold]plan[/] (given: {given})")
    for note in plan["notes"]:
        console.print(f"  {note}")
    console.print(
        f"  compute C = {plan['compute_flops']:.4g} FLOPs (6ND), N = {_si(plan['params'])} "
        f"parameters, D = {_si(plan['tokens'])} tokens ({plan['tokens_per_param']:.1f} tokens "
        "per parameter)"
    )
    losses = ", ".join(f"{k} {v:.3f}" for k, v in plan["predicted_loss"].items())
    console.print(f"  predicted loss (nats/token, each law's own corpus): {losses}")

    table = Table(title=f"compute-optimal N and D at C = {plan['compute_flops']:.3g}")
    for col in ("rule", "N", "D", "D/N", "loss", "source"):
        table.add_column(col)
    for row in plan["optima"].values():
        loss = f"{row['loss']:.3f}" if "loss" in row else "-"
        table.add_row(
            row["name"],
            _si(row["params"]),
            _si(row["tokens"]),
            f"{row['tokens'] / row['params']:.1f}",
            loss,
            row["source"],
        )
    console.print(table)

    b = plan["batch_lr"]
    console.print(
        f"batch {_si(b['batch_tokens'])} tokens ({b['batch_sequences']} x "
        f"{plan['model']['seq_len']}), peak lr {b['lr']:.3g} — {b['rule']}"
    )
    h, bill = plan["hardware"], plan["bill"]
    money = (
        f"${bill['dollars']:,.0f} at ${h['price_per_gpu_hour']}/GPU-hour"
        if bill["dollars"] is not None
        else "dollars: pass --price USD per GPU-hour"
    )
    console.print(
        f"on {h['gpus']} x {h['gpu']} ({h['peak_tflops']:.0f} TFLOP/s {h['precision']} dense, "
        f"MFU {h['mfu']:.0%}): {bill['gpu_hours']:,.0f} GPU-hours, "
        f"{bill['wall_clock_days']:,.1f} days, {bill['energy_mwh']:,.1f} MWh "
        f"(TDP {h['tdp_w']:.0f} W x PUE {h['pue']}), {money}"
    )
    m, c = plan["model"], plan["model"]["count"]
    origin = f"recipe {m['from_recipe']}" if m["from_recipe"] else "matched to N"
    console.print(
        f"model ({origin}): {_si(c['params'])} parameters, {_si(c['active_params'])} active, "
        f"training {m['train_flops_per_token']:.4g} FLOPs/token at seq {m['seq_len']} "
        f"({m['train_flops_per_token'] / m['six_n_flops_per_token']:.3f}x 6N; run total "
        f"{m['exact_train_flops']:.4g}), inference {m['inference_flops_per_token']:.4g} "
        f"FLOPs/token at context {m['seq_len']}, KV cache {c['kv_cache_bytes_per_token']:,} "
        f"bytes/token ({m['kv_cache_bytes_per_sequence'] / 2**30:.2f} GiB per sequence, bf16)"
    )
    console.print("[bold]recipe snippet[/] (merge into a recipe):")
    console.print(plan["recipe_snippet"], markup=False, highlight=False)


def plan_command(args: argparse.Namespace) -> int:
    plan = make_plan(args)
    print_plan(plan)
    if args.json:
        write_text(Path(args.json), json.dumps(plan, indent=2))
    return 0
