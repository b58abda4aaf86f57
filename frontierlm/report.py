"""The report stage: `runs/<name>/report.md`, one row per stage, PNG training curves, and the
data stage's steps (documents in/out, drops by reason, seconds) as a table and a figure."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt

from frontierlm.atomic import write_text
from frontierlm.stages import STAGES, StageContext, read_record
from frontierlm.train.metrics import MetricsLog

TRAINING_STAGES = ("pretrain", "sft", "align")


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 1000 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _style(ax: plt.Axes) -> None:
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    ax.legend()


def _save(fig: plt.Figure, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_curves(run_dir: Path, out: Path) -> list[str]:
    """One panel per training stage: train loss every step, validation loss at each eval."""
    fig, axes = plt.subplots(1, len(TRAINING_STAGES), figsize=(5 * len(TRAINING_STAGES), 3.6))
    for ax, stage in zip(axes, TRAINING_STAGES, strict=True):
        records = MetricsLog(run_dir / stage / "metrics.jsonl").read()
        ax.plot(
            [r["step"] for r in records], [r["loss"] for r in records], lw=1, label="train loss"
        )
        evals = [r for r in records if "val_loss" in r]
        ax.plot([r["step"] for r in evals], [r["val_loss"] for r in evals], "o-", label="val loss")
        ax.set_title(stage)
        _style(ax)
    _save(fig, out / "training_curves.png")

    fig, ax = plt.subplots(figsize=(6, 3.6))
    for stage in ("pretrain", "sft"):
        records = MetricsLog(run_dir / stage / "metrics.jsonl").read()
        points = [(r["step"], r["val_bpb"]) for r in records if "val_bpb" in r]
        if stage == "sft":  # where SFT starts from: the pretrained model on the same chats
            points.insert(0, (0, read_record(run_dir / "sft")["metrics"]["pretrained_val_bpb"]))
        label = "pretrain: held-out text" if stage == "pretrain" else "sft: held-out chats"
        ax.plot(*zip(*points, strict=True), "o-", label=label)
    unigram = read_record(run_dir / "pretrain")["metrics"]["unigram_bpb"]
    ax.axhline(unigram, color="gray", ls="--", label="unigram baseline (text)")
    ax.set_ylabel("bits per byte")
    _style(ax)
    _save(fig, out / "validation_bpb.png")
    return ["training_curves.png", "validation_bpb.png"]


def plot_align(run_dir: Path, out: Path) -> str | None:
    """The align stage's metrics: its loss's rewards (chosen, rejected), their margin, and the
    held-out pair accuracies against the SFT model's (dashed), plus KTO's KL estimate."""
    records = MetricsLog(run_dir / "align" / "metrics.jsonl").read()
    if not records or "rewards/chosen" not in records[0]:
        return None  # an align stage from before these metrics
    evals = [r for r in records if "val_rewards/chosen" in r]
    has_kl = "kl" in records[0]
    panels = 4 if has_kl else 3
    fig, axes = plt.subplots(1, panels, figsize=(4.6 * panels, 3.6))
    steps = [r["step"] for r in records]
    eval_steps = [r["step"] for r in evals]

    def curve(ax, key, label, **style):
        # KTO's training batches are unpaired: no reward accuracy there, only held out.
        if key in records[0]:
            ax.plot(steps, [r.get(key) for r in records], lw=1, alpha=0.6, label=f"train {label}")
        if evals and f"val_{key}" in evals[0]:
            values = [r[f"val_{key}"] for r in evals]
            ax.plot(eval_steps, values, "o-", label=f"val {label}", **style)

    rewards, margins, accuracy = axes[:3]
    curve(rewards, "rewards/chosen", "chosen")
    curve(rewards, "rewards/rejected", "rejected")
    rewards.set_title("rewards")
    curve(margins, "rewards/margins", "margin")
    margins.axhline(0, color="gray", lw=0.8)
    margins.set_title("reward margin (chosen - rejected)")
    curve(accuracy, "rewards/accuracies", "reward accuracy")
    for key, label in (("logp_accuracy", "log-prob"), ("ref_accuracy", "vs SFT ref")):
        if evals and f"val_{key}" in evals[0]:
            accuracy.plot(
                eval_steps, [r[f"val_{key}"] for r in evals], "s-", label=f"val {label} accuracy"
            )
    stage = read_record(run_dir / "align")["metrics"]
    if "sft_logp_accuracy" in stage:
        accuracy.axhline(
            stage["sft_logp_accuracy"], color="gray", ls="--", label="SFT log-prob accuracy"
        )
    accuracy.set_title(f"held-out pairs ({stage.get('loss_type', 'sigmoid')})")
    if has_kl:
        curve(axes[3], "kl", "KL")
        axes[3].set_title("KTO reference point (batch KL)")
    for ax in axes:
        _style(ax)
    _save(fig, out / "align_metrics.png")
    return "align_metrics.png"


def plot_rl(run_dir: Path, out: Path) -> str:
    """The rl stage's reward curve (per rollout batch, mean and +-1 std over its completions),
    sampling accuracy, and the held-out evaluations; KL, clip fraction, length and entropy."""
    records = MetricsLog(run_dir / "rl" / "metrics.jsonl").read()
    initial = read_record(run_dir / "rl")["metrics"]
    steps = np.array([r["step"] for r in records])
    fig, (rew, stats) = plt.subplots(1, 2, figsize=(11, 3.6))
    mean = np.array([r["reward_mean"] for r in records])
    std = np.array([r["reward_std"] for r in records])
    rew.plot(steps, mean, lw=1, label="rollout reward mean")
    rew.fill_between(steps, mean - std, mean + std, alpha=0.2)
    rew.plot(steps, [r["accuracy"] for r in records], lw=1, label="rollout accuracy")
    for key, label in (("sampled_reward", "held-out sampled reward"),
                       ("greedy_accuracy", "held-out greedy accuracy")):  # fmt: skip
        points = [(r["step"], r[f"val_{key}"]) for r in records if f"val_{key}" in r]
        if f"initial_val_{key}" in initial:
            points.insert(0, (0, initial[f"initial_val_{key}"]))
        if points:
            rew.plot(*zip(*points, strict=True), "o-", label=label)
    rew.set_title("rl: reward")
    _style(rew)
    for key in ("kl", "clip_fraction", "entropy"):
        if records and key in records[0]:
            stats.plot(steps, [r[key] for r in records], lw=1, label=key)
    stats.plot(
        steps,
        [r["response_length"] / max(1.0, records[0]["response_length"]) for r in records],
        lw=1,
        label="response length (x first)",
    )
    stats.set_title("rl: KL, clipping, entropy, length")
    _style(stats)
    _save(fig, out / "rl_reward.png")
    return "rl_reward.png"


def rl_section(run_dir: Path, out: Path) -> list[str]:
    """The report's RL section, when the run has an rl stage."""
    if not (run_dir / "rl" / "stage.json").is_file():
        return []
    m = read_record(run_dir / "rl")["metrics"]
    png = plot_rl(run_dir, out)
    lines = ["## RL", "", "| held-out metric | before | after |", "| --- | ---: | ---: |"]
    for key in ("greedy_accuracy", "greedy_reward", "sampled_reward"):
        if f"val_{key}" in m:
            lines.append(f"| {key} | {m[f'initial_val_{key}']:.4f} | {m[f'val_{key}']:.4f} |")
    return [*lines, "", f"![{png}](report/{png})", ""]


def loss_vs_bytes(
    records: list[dict[str, Any]],
    bytes_per_step: float | None = None,
    islands: int = 1,
    smooth: int = 10,
) -> list[tuple[float, float]]:
    """(bytes communicated by all workers so far, train loss averaged over the last `smooth`
    steps) per step of one metrics log: a DiLoCo island's records carry its own `bytes_sent`
    (times `islands`, as every island sends as much); a data-parallel run sends a fixed
    `bytes_per_step`."""
    points = []
    window: list[float] = []
    for r in records:
        if "loss" not in r:
            continue
        window = [*window[-(smooth - 1) :], float(r["loss"])] if smooth > 1 else [r["loss"]]
        sent = (
            r["step"] * bytes_per_step if bytes_per_step is not None else r["bytes_sent"] * islands
        )
        points.append((float(sent), sum(window) / len(window)))
    return points


def plot_loss_vs_bytes(curves: dict[str, list[tuple[float, float]]], path: Path) -> None:
    """Train loss against bytes communicated (log scale), one line per run: DiLoCo vs. DDP."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, points in curves.items():
        xs = [max(x, 1.0) for x, _ in points]
        ax.plot(xs, [y for _, y in points], label=label, lw=1.2)
    ax.set_xscale("log")
    ax.set_ylabel("train loss (10-step mean)")
    _style(ax)
    ax.set_xlabel("bytes communicated (all workers)")
    _save(fig, path)


def read_data_steps(run_dir: Path) -> list[dict[str, Any]]:
    """The data stage's per-step stats; `seconds` and `counts` default for stats.json files
    written before steps recorded them (None: not measured, which is not 0 seconds)."""
    path = run_dir / "data" / "stats.json"
    if not path.is_file():
        return []
    steps = json.loads(path.read_text()).get("steps", [])
    return [
        {
            "step": s["step"],
            "in": int(s["in"]),
            "out": int(s["out"]),
            "dropped": dict(s.get("dropped", {})),
            "counts": dict(s.get("counts", {})),
            "seconds": s.get("seconds"),
        }
        for s in steps
    ]


def plot_data_steps(steps: list[dict[str, Any]], out: Path) -> str:
    """Three panels of horizontal bars, one row per step in pipeline order: documents in and
    out, documents dropped by reason (stacked; on its own axis, since drops are often a few
    per thousand and would vanish next to the documents in), and seconds."""
    names = [s["step"] for s in steps]
    y = np.arange(len(names))
    height = max(2.4, 0.45 * len(names) + 1.2)
    fig, (docs, drops, secs) = plt.subplots(1, 3, figsize=(15, height), sharey=True)

    docs.barh(y - 0.2, [s["in"] for s in steps], height=0.4, label="in")
    docs.barh(y + 0.2, [s["out"] for s in steps], height=0.4, label="out")
    docs.set_title("documents per step")
    docs.set_yticks(y, names)
    docs.invert_yaxis()  # the first step on top, as the pipeline runs

    reasons = sorted(
        {r for s in steps for r in s["dropped"]},
        key=lambda r: -sum(s["dropped"].get(r, 0) for s in steps),
    )
    left = np.zeros(len(steps))
    for reason in reasons:
        widths = np.array([s["dropped"].get(reason, 0) for s in steps], dtype=float)
        drops.barh(y, widths, left=left, height=0.6, label=reason)
        left += widths
    drops.set_title("dropped, by reason")

    seconds = [s["seconds"] for s in steps]
    if all(t is None for t in seconds):
        note = "not recorded in this stats.json"
        secs.text(0.5, 0.5, note, ha="center", transform=secs.transAxes)
    else:
        secs.barh(y, [t or 0.0 for t in seconds], height=0.6, color="gray")
    secs.set_title("seconds per step")
    for ax in (docs, drops, secs):
        ax.grid(axis="x", alpha=0.3)
    # Legends below their panels: inside, they hide the longest bars, which matter most.
    below = {"loc": "upper center", "bbox_to_anchor": (0.5, -0.12), "fontsize": "small"}
    docs.legend(ncol=2, **below)
    if reasons:
        drops.legend(ncol=min(3, len(reasons)), **below)
    fig.tight_layout()
    fig.savefig(out / "data_steps.png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return "data_steps.png"


def data_steps_table(steps: list[dict[str, Any]], top: int = 3) -> list[str]:
    """Markdown rows: documents in/out, the most frequent drop reasons and seconds per step."""
    lines = [
        "| step | documents in | documents out | top drop reasons | seconds |",
        "| --- | ---: | ---: | --- | ---: |",
    ]
    for s in steps:
        ranked = sorted(s["dropped"].items(), key=lambda kv: -kv[1])
        reasons = ", ".join(f"{r} {n:,}" for r, n in ranked[:top])
        if len(ranked) > top:
            reasons += f", {len(ranked) - top} more"
        seconds = "-" if s["seconds"] is None else f"{s['seconds']:.2f}"
        lines.append(f"| {s['step']} | {s['in']:,} | {s['out']:,} | {reasons or '-'} | {seconds} |")
    return lines


def data_section(run_dir: Path, out: Path) -> list[str]:
    """The report's data-steps section, or nothing when the run has no per-step stats."""
    steps = read_data_steps(run_dir)
    if not steps:
        return []
    png = plot_data_steps(steps, out)
    return ["## Data steps", "", *data_steps_table(steps), "", f"![{png}](report/{png})", ""]


def safety_section(run_dir: Path) -> list[str]:
    """The scores `frontierlm safety RUN` wrote, when it was run."""
    path = run_dir / "safety" / "results.json"
    if not path.is_file():
        return []
    results = json.loads(path.read_text())
    hierarchy, refusal = results["instruction_hierarchy"], results["refusal"]

    def row(name: str, r: dict[str, Any]) -> str:
        return f"| {name} | {r['rate']:.3f} | {r['ci95'][0]:.3f}-{r['ci95'][1]:.3f} | {r['n']} |"

    lines = [
        f"## Safety (`frontierlm safety`, model `{results.get('model', '?')}`)",
        "",
        "| evaluation | score | 95% CI (Wilson) | n |",
        "| --- | ---: | --- | ---: |",
        row("instruction hierarchy: followed the higher-privileged instruction", hierarchy),
        *[row(f"&nbsp;&nbsp;{pair}", r) for pair, r in hierarchy["by_pair"].items()],
        row("refusal of HH red-team requests, rule judge", refusal["rule_judge"]),
    ]
    if "model_judge" in refusal:
        lines.append(row("refusal, model judge", refusal["model_judge"]))
    return [*lines, "", "Samples: `safety/samples.md`.", ""]


def sweep_report_section(run_dir: Path) -> list[str]:
    """The scaling-law sweep's section (fitted law, runs, plot) once `frontierlm sweep` has run
    on this recipe, else nothing."""
    path = run_dir / "sweep" / "sweep.json"
    if not path.is_file():
        return []
    from frontierlm.plan.sweep import sweep_section

    return sweep_section(json.loads(path.read_text()), "sweep/")


def task_section(tasks: dict[str, dict[str, dict[str, Any]]]) -> list[str]:
    """One row per (task, model) of `eval.tasks`: items scored and every metric."""
    if not tasks:
        return []
    lines = [
        "## Evaluation tasks",
        "",
        "| task | model | items | metrics | seconds |",
        "| --- | --- | ---: | --- | ---: |",
    ]
    for task, per_model in tasks.items():
        for model, m in per_model.items():
            shown = ", ".join(
                f"{k} {_fmt(v)}" for k, v in m.items() if k not in ("n", "seconds", "tokens")
            )
            lines.append(f"| {task} | {model} | {m['n']:,} | {shown} | {m['seconds']:.1f} |")
    return [*lines, "", "Per-item records: `eval/<task>.json`.", ""]


def synth_section(record: dict[str, Any] | None) -> list[str]:
    """Kept and dropped items of the synth stage, when the recipe ran it."""
    if record is None:
        return []
    m = record["metrics"]
    dropped = ", ".join(f"{k} {v:,}" for k, v in m["dropped"].items()) or "none"
    return [
        "## Synthetic data",
        "",
        f"{m['mode']} with the {m['model']} model, scored by {m['scorer']}: kept "
        f"{m['kept']:,} of {m['items']:,} items ({100 * m['acceptance_rate']:.1f}%), "
        f"{m['samples_accepted']:,} of {m['samples']:,} samples accepted; dropped: {dropped}. "
        "Output: `synth/synth.jsonl`, counts: `synth/stats.json`.",
        "",
    ]


def synth_sft_section(record: dict[str, Any] | None) -> list[str]:
    """Held-out exact match before and after SFT on the synthetic data, when the recipe ran it."""
    if record is None:
        return []
    m = record["metrics"]
    return [
        "## SFT on the synthetic data",
        "",
        f"The SFT model fine-tuned on {m['synth_chats']:,} verified synthetic chats. Greedy exact "
        f"match on {m['heldout_n']:,} held-out `{m['heldout_task']}` problems: "
        f"{m['heldout_exact_match_before']:.3f} before, {m['heldout_exact_match_after']:.3f} "
        f"after; right only after {m['heldout_only_after']:,}, only before "
        f"{m['heldout_only_before']:,} (McNemar p = {m['heldout_mcnemar_p']:.2g}). Per item, "
        "with Wilson intervals: `synth_sft/heldout.json`.",
        "",
    ]


def build_report(run_dir: Path, out: Path) -> str:
    records = {
        name: read_record(run_dir / name)
        for name, stage in STAGES.items()
        if name != "report"
        and stage.in_pipeline
        and (not stage.optional or (run_dir / name / "stage.json").is_file())
    }
    pre, ev = records["pretrain"]["metrics"], records["eval"]["metrics"]
    loss_type = records["align"]["metrics"].get("loss_type", "sigmoid")
    lines = [
        f"# FrontierLM run `{run_dir.name}`",
        "",
        "| stage | what it did | wall time (s) | key metric | value |",
        "| --- | --- | ---: | --- | ---: |",
    ]
    for name, rec in records.items():
        key = rec["key_metric"]
        lines.append(
            f"| {name} | {STAGES[name].summary} | {rec['wall_s']:.1f} | {key} "
            f"| {_fmt(rec['metrics'].get(key, ''))} |"
        )
    total = sum(rec["wall_s"] for rec in records.values())
    lines += [
        f"| **total** | | {total:.1f} | | |",
        "",
        "## Headline checks",
        "",
        "| check | measured | baseline | result |",
        "| --- | ---: | ---: | --- |",
        f"| pretrain val bpb vs unigram model on the same tokens | {pre['val_bpb']:.4f} | "
        f"{pre['unigram_bpb']:.4f} | {100 * pre['bpb_reduction_vs_unigram']:.1f}% lower |",
        f"| SFT held-out chat bpb vs pretrained model | {ev['sft_chat_bpb']:.4f} | "
        f"{ev['pretrain_chat_bpb']:.4f} | "
        f"{100 * (1 - ev['sft_chat_bpb'] / ev['pretrain_chat_bpb']):.1f}% lower |",
        f"| align ({loss_type}) mean implicit reward margin, held-out pairs "
        f"(n={ev['val_pairs']}) | {ev['align_val_margin']:+.4f} | 0 (SFT) | "
        f"accuracy {ev['align_val_accuracy']:.3f} |",
        *(
            [
                f"| held-out pairs with log p(chosen) > log p(rejected) | "
                f"{ev['align_val_logp_accuracy']:.3f} | {ev['sft_val_logp_accuracy']:.3f} (SFT) "
                f"| {ev['align_val_logp_accuracy'] - ev['sft_val_logp_accuracy']:+.3f} |"
            ]
            if "sft_val_logp_accuracy" in ev
            else []
        ),
        "",
        "## Bits per byte of every model",
        "",
        "| model | held-out text | held-out chats |",
        "| --- | ---: | ---: |",
    ]
    for name in TRAINING_STAGES:
        lines.append(f"| {name} | {ev[f'{name}_text_bpb']:.4f} | {ev[f'{name}_chat_bpb']:.4f} |")
    lines += [
        "",
        f"Model: {_fmt(pre['params'])} parameters, {_fmt(pre['tokens_seen'])} pretraining tokens.",
        "",
        *task_section(ev.get("tasks", {})),
        *synth_section(records.get("synth")),
        *synth_sft_section(records.get("synth_sft")),
        *data_section(run_dir, out),
        *rl_section(run_dir, out),
        *sweep_report_section(run_dir),
    ]
    lines += safety_section(run_dir)
    for png in plot_curves(run_dir, out):
        lines.append(f"![{png}](report/{png})")
    if png := plot_align(run_dir, out):
        lines.append(f"![{png}](report/{png})")
    lines += [
        "",
        "Samples: `eval/samples.md`. Config: `config.json`. Per-stage records: `*/stage.json`.",
        "",
    ]
    return "\n".join(lines)


def run_report_stage(ctx: StageContext) -> dict[str, Any]:
    text = build_report(ctx.run_dir, ctx.work_dir)
    (ctx.work_dir / "report.md").write_text(text)
    write_text(ctx.run_dir / "report.md", text)
    return {"report": str(ctx.run_dir / "report.md")}
