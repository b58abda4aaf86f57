"""Token utility: per-source and per-document losses of two models of a pretraining run, which
add up to the whole and rank a learnable source above noise."""

from __future__ import annotations

import functools
import json
import random
import string
from pathlib import Path

import pytest
import torch

from frontierlm.cli import main
from frontierlm.config import load_config
from frontierlm.eval.utility import mixture_weights, utility_report
from frontierlm.model import Transformer
from frontierlm.tokenizer.shards import TokenSplit, write_token_shards
from frontierlm.tokenizer.train import save_tokenizer
from frontierlm.train.loop import TrainTask, train
from frontierlm.train.pretrain import ShuffledWindows, lm_loss

ROOT = Path(__file__).resolve().parents[2]


def _docs() -> list[tuple[str, str, str]]:
    rng = random.Random(0)
    verse = "the cat sat on the mat and the dog lay by the door . "
    docs = [(f"p{i}", verse * 12, "pattern") for i in range(20)]
    letters = string.ascii_letters + string.digits + string.punctuation
    docs += [
        (f"n{i}", "".join(rng.choice(letters) for _ in range(600)), "noise") for i in range(30)
    ]
    return docs


# Both tests score a 40-step run trained by the fixture (~10 s on an idle 2-core machine).
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run_dir(small_tokenizer, tmp_path_factory):
    tok, _ = small_tokenizer
    run = tmp_path_factory.mktemp("runs") / "util"
    save_tokenizer(tok, run / "tokenizer")
    write_token_shards(_docs(), tok, run / "tokenize", val_fraction=0.05)
    cfg = load_config(
        ROOT / "recipes" / "quickstart.toml",
        [
            "--run.name=util",
            "--model.d_model=32",
            "--model.n_layers=2",
            "--model.n_heads=2",
            "--model.max_seq_len=64",
            "--pretrain.seq_len=64",
            "--pretrain.batch_size=8",
            "--pretrain.steps=40",
            "--pretrain.warmup_steps=5",
            "--pretrain.checkpoint_every=20",
            "--pretrain.eval_every=40",
            "--pretrain.precision=fp32",
            "--pretrain.prefetch=0",
            "--sft.seq_len=64",
            "--align.seq_len=64",
        ],
    )
    (run / "config.json").write_text(cfg.model_dump_json())
    torch.manual_seed(cfg.run.seed)
    model = Transformer(cfg.model, tok.get_vocab_size())
    split = TokenSplit.open(run / "tokenize", "train")
    windows = ShuffledWindows(split.tokens, 64, 8, cfg.run.seed, sources=split)
    loss = functools.partial(lm_loss, source_names=split.source_names)
    task = TrainTask("pretrain", windows, loss, lambda m: {"loss": 0.0})
    train(model, cfg.pretrain, task, run / "pretrain", torch.device("cpu"), cfg.run)
    return run


def test_sources_add_up_and_rank_the_learnable_one_first(run_dir):
    report = utility_report(run_dir, "init", "final", max_tokens=None)
    by_name = {r["source"]: r for r in report["sources"]}
    assert [r["source"] for r in report["sources"]] == ["pattern", "noise"]
    total = sum(r["tokens"] for r in report["sources"])
    assert total == report["tokens_scored"]
    # Every predicted token of the training split is scored once (windows cut as the stage cuts).
    split = TokenSplit.open(run_dir / "tokenize", "train")
    assert total == (len(split.tokens) - 1) // 64 * 64
    for key in ("loss_from", "loss_to"):
        weighted = sum(r["tokens"] * r[key] for r in report["sources"]) / total
        assert weighted == pytest.approx(report[key], rel=1e-9)
    # The init model is near uniform: ln(vocab) for every source.
    assert by_name["noise"]["loss_from"] == pytest.approx(torch.log(torch.tensor(1024.0)), abs=0.1)
    # Noise text still teaches its character statistics, the pattern far more.
    assert by_name["pattern"]["reduction"] > 1.3 * by_name["noise"]["reduction"]
    # Scored with the final model, the training tokens' loss is the one the run logged at its end.
    assert report["loss_to"] == pytest.approx(report["logged_train_loss"], rel=0.1)
    weights = mixture_weights(report)
    assert sum(weights.values()) == pytest.approx(1.0, abs=1e-3)
    # Each source weighted by the loss it took off in all (tokens x reduction per token).
    took_off = {n: r["tokens"] * r["reduction"] for n, r in by_name.items()}
    ratio = took_off["pattern"] / took_off["noise"]
    assert weights["pattern"] / weights["noise"] == pytest.approx(ratio, rel=1e-3)
    # The training log's per-source losses (steps 1-20 -> 21-40) add up to the logged loss
    # exactly and rank the same way.
    logged = report["logged"]
    assert logged["steps_from"] == [1, 20] and logged["steps_to"] == [21, 40]
    assert abs(logged["difference"]) < 1e-5 and logged["max_step_difference"] < 1e-5
    assert [r["source"] for r in logged["sources"]] == ["pattern", "noise"]
    # Documents: the top ones are pattern documents, the bottom ones noise.
    assert {d["source"] for d in report["top_documents"][:5]} == {"pattern"}
    assert {d["source"] for d in report["bottom_documents"][:5]} == {"noise"}


def test_cli_prints_and_writes_a_mixture_fragment(run_dir, tmp_path):
    out, frag = tmp_path / "u.json", tmp_path / "mix.toml"
    args = ["data", "utility", str(run_dir), "--from", "20", "--to", "final"]
    args += ["--json", str(out), "--mixture-out", str(frag), "--recipe", "quickstart.toml"]
    assert main(args) == 0
    report = json.loads(out.read_text())
    assert report["from"] == "step_0000020"
    text = frag.read_text()
    assert text.startswith('base = "quickstart.toml"') and "[[pretrain.mixture]]" in text
    assert main(["data", "utility", str(run_dir), "--from", "7"]) == 1  # no such checkpoint
