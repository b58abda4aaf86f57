"""The whole pipeline on the micro recipe: every stage real, then skipped, then partly rerun."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from frontierlm.cli import main
from frontierlm.stages import STAGES

# `frontierlm run` runs these; diloco is pretrain's alternative, run on its own, and the micro
# recipe has no [rl] table, so the optional rl stage is not part of its pipeline.
PIPELINE = [name for name, stage in STAGES.items() if stage.in_pipeline and not stage.optional]

ROOT = Path(__file__).resolve().parents[1]
MICRO = str(ROOT / "recipes" / "micro.toml")


def stage_record(run_dir: Path, stage: str) -> dict:
    return json.loads((run_dir / stage / "stage.json").read_text())


@pytest.fixture(scope="module")
def micro_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    cwd = os.getcwd()
    os.chdir(ROOT)  # recipe paths are relative to the repository root
    try:
        assert main(["run", MICRO, f"--run.out_dir={out}"]) == 0
    finally:
        os.chdir(cwd)
    return out / "micro"


def test_every_stage_finishes_with_real_outputs(micro_run):
    for stage in PIPELINE:
        assert (micro_run / stage / "stage.json").is_file(), stage
    assert not list(micro_run.glob("*.partial"))
    stats = json.loads((micro_run / "data" / "stats.json").read_text())
    assert stats["totals"]["docs_out"] > 400
    assert (micro_run / "tokenizer" / "tokenizer.json").is_file()
    assert (micro_run / "tokenize" / "train.bin").stat().st_size > 0
    for stage in ("pretrain", "sft", "align"):
        assert (micro_run / stage / "model" / "model.safetensors").is_file()
        records = [
            json.loads(x) for x in (micro_run / stage / "metrics.jsonl").read_text().splitlines()
        ]
        assert "val_loss" in records[-1] and records[-1]["step"] == len(records)
    pre = stage_record(micro_run, "pretrain")["metrics"]
    # Even 120 steps of a micro model beat a unigram model on held-out text.
    assert pre["val_bpb"] < pre["unigram_bpb"]
    results = json.loads((micro_run / "eval" / "results.json").read_text())
    assert set(results) >= {"pretrain_text_bpb", "sft_chat_bpb", "align_val_margin"}
    assert results["sft_chat_bpb"] < results["pretrain_chat_bpb"]
    # eval.tasks: every task on the sft model, 4 items each, a file per task
    assert {t: m["sft"]["n"] for t, m in results["tasks"].items()} == {
        "mmlu_cloze": 4,
        "gsm8k_chat": 4,
    }
    mc = json.loads((micro_run / "eval" / "mmlu_cloze.json").read_text())
    assert 0 <= mc["sft"]["metrics"]["acc_norm"] <= 1 and len(mc["sft"]["items"]) == 4
    report = (micro_run / "report.md").read_text()
    assert "| pretrain |" in report and "unigram" in report
    assert "## Data steps" in report
    for png in ("training_curves.png", "validation_bpb.png", "data_steps.png"):
        assert (micro_run / "report" / png).read_bytes()[:4] == b"\x89PNG"


def test_second_run_skips_everything_and_changed_config_reruns_downstream(micro_run):
    out = str(micro_run.parent)
    before = {
        s: stage_record(micro_run, s)["started"] + stage_record(micro_run, s)["fingerprint"]
        for s in PIPELINE
    }
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        t0 = time.perf_counter()
        assert main(["run", MICRO, f"--run.out_dir={out}"]) == 0
        assert time.perf_counter() - t0 < 10
        after = {
            s: stage_record(micro_run, s)["started"] + stage_record(micro_run, s)["fingerprint"]
            for s in PIPELINE
        }
        assert after == before
        # Change only SFT's learning rate: SFT and everything after it rerun, nothing before.
        assert main(["run", MICRO, f"--run.out_dir={out}", "--sft.lr=1e-3"]) == 0
        changed = {
            s for s in PIPELINE if stage_record(micro_run, s)["fingerprint"] != before[s][-16:]
        }
        assert changed == {"sft", "align", "eval", "report"}
    finally:
        os.chdir(cwd)


def test_bad_override_fails_before_any_work(tmp_path, capsys):
    assert main(["run", MICRO, f"--run.out_dir={tmp_path}", "--model.n_heads=3"]) == 2
    assert "n_heads=3 must divide d_model=64" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_sigkill_during_pretrain_then_resume_matches_uninterrupted(micro_run, tmp_path):
    """Kill -9 `frontierlm pretrain` mid-run; the rerun resumes from the last checkpoint and ends
    at the same loss as the uninterrupted run of the fixture (fp32 on CPU: to 1e-5)."""
    killed = tmp_path / "micro"
    killed.mkdir()
    for stage in ("data", "tokenizer", "tokenize"):
        shutil.copytree(micro_run / stage, killed / stage)
    cmd = [sys.executable, "-m", "frontierlm.cli", "pretrain", MICRO, f"--run.out_dir={tmp_path}"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = killed / "pretrain.partial" / "checkpoints" / "step_0000010"
    deadline = time.time() + 120
    while not ckpt.is_dir() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert ckpt.is_dir() and not (killed / "pretrain").exists(), "killed before the stage finished"
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "resuming from" in done.stderr
    ours = stage_record(killed, "pretrain")["metrics"]
    reference = stage_record(micro_run, "pretrain")["metrics"]
    assert ours["train_loss"] == pytest.approx(reference["train_loss"], abs=1e-5)
    assert ours["val_bpb"] == pytest.approx(reference["val_bpb"], abs=1e-5)


def test_torchrun_two_processes_run_the_training_stages(micro_run, tmp_path):
    """`torchrun --nproc_per_node=2 -m frontierlm.cli run`: the data stages are current and
    skipped; pretrain, sft and align train over 2 gloo processes (FSDP2) with sharded
    checkpoints and single-file models; eval and report run on rank 0 alone. The pretrain
    curve is that of one process (`frontierlm pretrain`) on the same recipe."""
    overrides = [
        "--run.device=cpu",
        "--run.threads=1",
        "--pretrain.steps=12",
        "--pretrain.checkpoint_every=6",
        "--pretrain.eval_every=6",
        "--sft.steps=4",
        "--sft.checkpoint_every=2",
        "--align.steps=4",
        "--align.checkpoint_every=2",
    ]
    for name in ("two", "one"):
        (tmp_path / name / "micro").mkdir(parents=True)
        for stage in ("data", "tokenizer", "tokenize"):
            shutil.copytree(micro_run / stage, tmp_path / name / "micro" / stage)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    cli = ["-m", "frontierlm.cli", "run", MICRO, f"--run.out_dir={tmp_path / 'two'}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [*torchrun, "--nproc_per_node=2", *cli, *overrides],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stderr.count("up to date, skipped") == 3, "one console speaks for the job"
    run_dir = tmp_path / "two" / "micro"
    for stage in PIPELINE:
        assert (run_dir / stage / "stage.json").is_file(), stage
    for stage, steps in (("pretrain", 12), ("sft", 4), ("align", 4)):
        records = [
            json.loads(x) for x in (run_dir / stage / "metrics.jsonl").read_text().splitlines()
        ]
        assert [r["step"] for r in records] == list(range(1, steps + 1)), stage
        last = sorted((run_dir / stage / "checkpoints").iterdir())[-1]
        assert (last / ".metadata").is_file() and len(list(last.glob("*.distcp"))) == 2
        assert (run_dir / stage / "model" / "model.safetensors").is_file()
    assert (run_dir / "report.md").is_file()

    single = [sys.executable, "-m", "frontierlm.cli", "pretrain", MICRO]
    single += [f"--run.out_dir={tmp_path / 'one'}", *overrides]
    done = subprocess.run(single, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]

    def losses(out: str) -> list[float]:
        path = tmp_path / out / "micro" / "pretrain" / "metrics.jsonl"
        return [json.loads(x)["loss"] for x in path.read_text().splitlines()]

    difference = max(abs(a - b) for a, b in zip(losses("two"), losses("one"), strict=True))
    assert difference < 1e-4
    print(f"\ntorchrun pretrain, 2 processes vs 1: max |loss diff| {difference:.2e}")
