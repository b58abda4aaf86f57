"""The report stage from hand-written stage records: the data-steps figure and table."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from frontierlm.report import build_report, read_data_steps
from frontierlm.stages import STAGES

STEPS = [
    {
        "step": "length",
        "in": 1000,
        "out": 940,
        "dropped": {"too_short_chars": 45, "empty": 15},
        "counts": {},
        "seconds": 0.25,
    },
    {
        "step": "alpha",
        "in": 940,
        "out": 900,
        "dropped": {"mostly_non_text": 30, "bad_ratio": 6, "symbols": 3, "lines": 1},
        "counts": {},
        "seconds": 1.5,
    },
    {
        "step": "pii",
        "in": 900,
        "out": 900,
        "dropped": {},
        "counts": {"email": 12, "ipv4": 2},
        "seconds": 0.75,
    },
]


def fake_run(run_dir: Path, steps: list[dict]) -> None:
    """The minimum of every stage's record that build_report reads, plus data/stats.json."""
    ev = {
        "sft_chat_bpb": 1.5,
        "pretrain_chat_bpb": 2.0,
        "val_pairs": 10,
        "align_val_margin": 0.1,
        "align_val_accuracy": 0.6,
    }
    for name in ("pretrain", "sft", "align"):
        ev |= {f"{name}_text_bpb": 2.0, f"{name}_chat_bpb": 1.8}
    metrics = {
        "pretrain": {
            "val_bpb": 2.0,
            "unigram_bpb": 3.0,
            "bpb_reduction_vs_unigram": 1 / 3,
            "params": 1000,
            "tokens_seen": 5000,
        },
        "sft": {"pretrained_val_bpb": 2.2},
        "eval": ev,
    }
    for name, stage in STAGES.items():
        if name == "report" or stage.optional:  # no [rl] or [synth] table in this run
            continue
        (run_dir / name).mkdir(parents=True)
        record = {"key_metric": stage.key_metric, "wall_s": 1.0, "metrics": metrics.get(name, {})}
        (run_dir / name / "stage.json").write_text(json.dumps(record))
    for name in ("pretrain", "sft", "align"):
        rows = [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.5, "val_loss": 2.6, "val_bpb": 2.1}]
        (run_dir / name / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run_dir / "data" / "stats.json").write_text(json.dumps({"steps": steps}))


def test_report_plots_and_tabulates_the_data_steps(tmp_path):
    run_dir, out = tmp_path / "run", tmp_path / "out"
    out.mkdir()
    fake_run(run_dir, STEPS)
    text = build_report(run_dir, out)
    assert (out / "data_steps.png").stat().st_size > 10_000
    assert "![data_steps.png](report/data_steps.png)" in text
    assert "| step | documents in | documents out | top drop reasons | seconds |" in text
    assert "| length | 1,000 | 940 | too_short_chars 45, empty 15 | 0.25 |" in text
    # The top three reasons by count, then how many more there are.
    assert (
        "| alpha | 940 | 900 | mostly_non_text 30, bad_ratio 6, symbols 3, 1 more | 1.50 |" in text
    )
    assert "| pii | 900 | 900 | - | 0.75 |" in text


def test_report_survives_stats_without_seconds_or_counts(tmp_path):
    run_dir, out = tmp_path / "run", tmp_path / "out"
    out.mkdir()
    # What the data stage wrote before steps were timed and counted.
    old = [{k: s[k] for k in ("step", "in", "out", "dropped")} for s in STEPS]
    fake_run(run_dir, old)
    text = build_report(run_dir, out)
    assert (out / "data_steps.png").is_file()
    assert "| length | 1,000 | 940 | too_short_chars 45, empty 15 | - |" in text
    assert [s["seconds"] for s in read_data_steps(run_dir)] == [None, None, None]
    # And a run without stats.json at all has no data section.
    (run_dir / "data" / "stats.json").unlink()
    assert "## Data steps" not in build_report(run_dir, out)


@pytest.mark.parametrize("steps", [[], [{"step": "length", "in": 0, "out": 0}]])
def test_report_with_no_or_empty_steps(tmp_path, steps):
    run_dir, out = tmp_path / "run", tmp_path / "out"
    out.mkdir()
    fake_run(run_dir, steps)
    text = build_report(run_dir, out)
    assert ("## Data steps" in text) == bool(steps)


def test_report_plots_the_align_metrics(tmp_path):
    """KTO-style align metrics (rewards, margins, accuracies, KL) make the align figure, and
    the held-out log-prob accuracy row compares against the SFT model."""
    run_dir, out = tmp_path / "run", tmp_path / "out"
    out.mkdir()
    fake_run(run_dir, STEPS)
    rows = []
    for step in (1, 2, 3, 4):
        row = {"step": step, "loss": 0.5 - 0.05 * step, "kl": 0.01 * step}
        row |= {"rewards/chosen": 0.1 * step, "rewards/rejected": -0.1 * step}
        row |= {"rewards/margins": 0.2 * step}
        if step % 2 == 0:
            row |= {f"val_{k}": v for k, v in row.items() if k not in ("step",)}
            row["val_rewards/accuracies"] = 0.5 + 0.1 * step  # KTO: held-out pairs only
            row |= {"val_logp_accuracy": 0.55, "val_ref_accuracy": 0.6, "val_bpb": 2.0}
        rows.append(row)
    (run_dir / "align" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    record = json.loads((run_dir / "align" / "stage.json").read_text())
    record["metrics"] = {"loss_type": "kto", "sft_logp_accuracy": 0.5}
    (run_dir / "align" / "stage.json").write_text(json.dumps(record))
    ev_record = json.loads((run_dir / "eval" / "stage.json").read_text())
    ev_record["metrics"] |= {"align_val_logp_accuracy": 0.55, "sft_val_logp_accuracy": 0.5}
    (run_dir / "eval" / "stage.json").write_text(json.dumps(ev_record))
    text = build_report(run_dir, out)
    assert (out / "align_metrics.png").stat().st_size > 10_000
    assert "![align_metrics.png](report/align_metrics.png)" in text
    assert "| align (kto) mean implicit reward margin" in text
    assert (
        "| held-out pairs with log p(chosen) > log p(rejected) | 0.550 | 0.500 (SFT) | +0.050 |"
        in text
    )
    # An align stage from before these metrics: no figure, no failure.
    fake_run(tmp_path / "old", STEPS)
    assert "align_metrics.png" not in build_report(tmp_path / "old", out)


def test_report_shows_eval_tasks_and_synth(tmp_path):
    run_dir, out = tmp_path / "run", tmp_path / "out"
    out.mkdir()
    fake_run(run_dir, STEPS)
    record = json.loads((run_dir / "eval" / "stage.json").read_text())
    record["metrics"]["tasks"] = {
        "mmlu": {"sft": {"n": 40, "seconds": 3.5, "acc": 0.3, "acc_norm": 0.275, "chance": 0.25}}
    }
    (run_dir / "eval" / "stage.json").write_text(json.dumps(record))
    assert "## Synthetic data" not in build_report(run_dir, out)
    (run_dir / "synth").mkdir()
    synth = {
        "mode": "verify",
        "model": "sft",
        "scorer": "exact_match",
        "items": 50,
        "kept": 4,
        "acceptance_rate": 0.08,
        "samples": 560,
        "samples_accepted": 5,
        "dropped": {"wrong_answer": 45, "duplicate_of_existing": 1},
    }
    (run_dir / "synth" / "stage.json").write_text(
        json.dumps({"key_metric": "kept", "wall_s": 2.0, "metrics": synth})
    )
    text = build_report(run_dir, out)
    assert "| mmlu | sft | 40 | acc 0.3000, acc_norm 0.2750, chance 0.2500 | 3.5 |" in text
    assert "kept 4 of 50 items (8.0%), 5 of 560 samples accepted" in text
    assert "dropped: wrong_answer 45, duplicate_of_existing 1" in text
    assert "| synth |" in text
