"""Per-source training losses: the loaders tag every target with its token source, the loop
logs each source's share of the loss, and the shares add up to the logged loss.

Synthetic shards (as in test_mixture.py): every token of source s lies in [100 s + 1,
100 s + 99] and BOS is 0, so a target shows which source it came from."""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch

from frontierlm.cli import main
from frontierlm.config import ModelConfig, PretrainConfig, load_config
from frontierlm.eval.utility import logged_utility
from frontierlm.model import Transformer
from frontierlm.tokenizer.shards import TokenSplit
from frontierlm.train.loop import TrainTask, train
from frontierlm.train.losses import model_token_losses
from frontierlm.train.mixture import MixtureWindows
from frontierlm.train.pretrain import ShuffledWindows, lm_loss

ROOT = Path(__file__).resolve().parents[2]
BOS = 0
NAMES = ["web", "wiki", "math"]
SEQ, BATCH, ACCUM = 16, 4, 2


def make_split(seed: int = 0) -> TokenSplit:
    """90 documents of 5-60 tokens from three sources, shuffled together in file order."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(3), (40, 30, 20))
    rng.shuffle(labels)
    docs = [
        np.concatenate([[BOS], rng.integers(100 * s + 1, 100 * s + 100, rng.integers(5, 60))])
        for s in labels
    ]
    starts = np.concatenate([[0], np.cumsum([len(d) for d in docs])[:-1]]).astype(np.int64)
    return TokenSplit(
        np.concatenate(docs).astype(np.uint16), starts, labels.astype(np.uint16), NAMES
    )


def expected_sources(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Each target's source from its value; a BOS target opens the document of the token
    after it (the next target), -1 where the window ends on a BOS."""
    targets = batch["targets"]
    out = torch.where(targets == BOS, -1, targets // 100)
    for r, c in (targets == BOS).nonzero().tolist():
        if c + 1 < targets.shape[1]:
            out[r, c] = targets[r, c + 1] // 100
    return out


def test_windows_tag_every_target_with_its_source_across_document_boundaries():
    split = make_split()
    windows = ShuffledWindows(split.tokens, SEQ, BATCH, seed=3, sources=split)
    crossings = 0
    for index in range(20):
        batch = windows(index)
        want = expected_sources(batch)
        known = want >= 0
        assert torch.equal(batch["token_sources"][known], want[known])
        # Rows that hold the end of one document and the start of the next, of two sources.
        crossings += sum(len(set(row[row >= 0].tolist())) > 1 for row in want)
    assert crossings > 10
    # Untracked: the batch carries nothing more than before.
    plain = ShuffledWindows(split.tokens, SEQ, BATCH, seed=3)(0)
    assert set(plain) == {"input_ids", "targets"}


def test_mixture_batches_tag_each_row_with_the_source_it_was_drawn_from():
    split = make_split()
    cfg = PretrainConfig(
        steps=10,
        batch_size=BATCH,
        grad_accum=ACCUM,
        seq_len=SEQ,
        eval_every=5,
        mixture=[{"name": "all", "weights": {"web": 1, "wiki": 1, "math": 2}}],
    )
    windows = MixtureWindows(split, cfg, seed=5, tag_sources=True)
    seen = set()
    for index in range(10):
        batch = windows(index)
        tags = batch["token_sources"]
        assert tags.shape == batch["targets"].shape
        values = batch["targets"]
        assert torch.equal(tags[values != BOS], (values // 100)[values != BOS])
        seen |= set(tags.unique().tolist())
    assert seen == {0, 1, 2}


def _run(tmp_path, z_loss: float = 0.0, steps: int = 8):
    split = make_split()
    cfg = PretrainConfig(
        steps=steps,
        batch_size=BATCH,
        grad_accum=ACCUM,
        seq_len=SEQ,
        eval_every=steps,
        warmup_steps=2,
        lr=3e-3,
        precision="fp32",
        prefetch=0,
        checkpoint_every=0,
        spike_loss_factor=0,
    )
    model_cfg = ModelConfig(d_model=32, n_layers=2, n_heads=2, max_seq_len=SEQ)
    torch.manual_seed(0)
    model = Transformer(model_cfg, 400)
    windows = ShuffledWindows(split.tokens, SEQ, BATCH, seed=1, sources=split)

    def loss(m, b):
        return lm_loss(m, b, z_weight=z_loss, chunked=False, source_names=NAMES)

    task = TrainTask("pretrain", windows, loss, lambda m: {"x": 0.0})
    train(model, cfg, task, tmp_path / "pretrain", torch.device("cpu"), export=False)
    records = [
        json.loads(x) for x in (tmp_path / "pretrain" / "metrics.jsonl").read_text().splitlines()
    ]
    return records, windows, model_cfg


def test_source_shares_add_up_to_the_logged_loss_and_match_an_independent_count(tmp_path):
    records, windows, model_cfg = _run(tmp_path)
    assert len(records) == 8
    for r in records:
        shares = [r[f"loss_share.{n}"] for n in NAMES]
        assert math.fsum(shares) == pytest.approx(r["loss"], abs=1e-5)
        assert math.fsum(r[f"token_share.{n}"] for n in NAMES) == pytest.approx(1.0, abs=1e-6)
    # Step 1 was the initial model on micro-batches 0 and 1: recount it a token at a time.
    torch.manual_seed(0)
    model = Transformer(model_cfg, 400)
    sums, counts = defaultdict(float), defaultdict(int)
    with torch.no_grad():
        for index in range(ACCUM):
            batch = windows(index)
            losses = model_token_losses(model, batch, chunked=False)
            tags = batch["token_sources"].flatten().tolist()
            for loss, tag in zip(losses.flatten().tolist(), tags, strict=True):
                sums[NAMES[int(tag)]] += loss
                counts[NAMES[int(tag)]] += 1
    total = ACCUM * BATCH * SEQ
    first = records[0]
    for name in NAMES:
        assert first[f"token_share.{name}"] == pytest.approx(counts[name] / total, abs=1e-7)
        assert first[f"loss_share.{name}"] == pytest.approx(sums[name] / total, abs=1e-5)
    # The initial model is near uniform over 400 tokens: every source's mean is ln 400.
    for name in NAMES:
        mean = first[f"loss_share.{name}"] / first[f"token_share.{name}"]
        assert mean == pytest.approx(math.log(400), abs=0.15)

    table = logged_utility(tmp_path, 0, None, window=3, tokens_per_step=total)
    assert table["steps_from"] == [1, 3] and table["steps_to"] == [6, 8]
    assert table["logged_loss"] == pytest.approx(np.mean([r["loss"] for r in records[-3:]]))
    assert abs(table["difference"]) < 1e-5 and table["max_step_difference"] < 1e-5
    assert sum(r["tokens"] for r in table["sources"]) == 3 * total
    for row in table["sources"]:
        assert row["contribution"] == pytest.approx(row["share"] * row["loss_to"], rel=1e-9)
        assert row["reduction"] > 0  # 8 steps at lr 3e-3 learn each source's token range
    reductions = [row["reduction"] for row in table["sources"]]
    assert reductions == sorted(reductions, reverse=True)

    # The CLI reads the same table from the run directory (its config gives tokens per step).
    overrides = [f"--pretrain.{k}={v}" for k, v in (("batch_size", BATCH), ("seq_len", SEQ))]
    cfg = load_config(
        ROOT / "recipes" / "quickstart.toml", [*overrides, f"--pretrain.grad_accum={ACCUM}"]
    )
    (tmp_path / "config.json").write_text(cfg.model_dump_json())
    out = tmp_path / "utility.json"
    args = ["data", "utility", str(tmp_path), "--from", "init", "--window", "3", "--no-rescore"]
    assert main([*args, "--json", str(out)]) == 0
    assert json.loads(out.read_text())["logged"] == pytest.approx(table)


def test_with_z_loss_the_shares_add_up_to_the_cross_entropy(tmp_path):
    records, _, _ = _run(tmp_path, z_loss=1e-2, steps=4)
    for r in records:
        assert r["loss"] > r["ce"] + 1e-3  # the z-loss is in the loss, not in the shares
        assert math.fsum(r[f"loss_share.{n}"] for n in NAMES) == pytest.approx(r["ce"], abs=1e-5)
    table = logged_utility(tmp_path, 0, None, window=2, tokens_per_step=ACCUM * BATCH * SEQ)
    assert abs(table["difference"]) < 1e-5
