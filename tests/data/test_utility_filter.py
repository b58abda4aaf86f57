"""The per-document utility filter: a reference run's models score documents, and the data
steps keep or drop them by loss, loss reduction or top fraction, counting the reasons."""

from __future__ import annotations

import random
import string
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from frontierlm.config import DataConfig, UtilityFilterConfig, load_config
from frontierlm.data import build_steps
from frontierlm.data.documents import Document
from frontierlm.data.pipeline import run_steps
from frontierlm.data.utility_filter import (
    ReferenceScorer,
    UtilityFilter,
    UtilityTopFraction,
    model_files,
)
from frontierlm.model import Transformer
from frontierlm.stages import external_files
from frontierlm.tokenizer.train import BOS, save_tokenizer
from frontierlm.train.checkpoint import save_model_dir

ROOT = Path(__file__).resolve().parents[2]
SEQ = 64
VERSE = "the cat sat on the mat and the dog lay by the door . "


def noise(seed: int, n: int = 300) -> str:
    rng = random.Random(seed)
    letters = string.ascii_letters + string.digits + string.punctuation
    return "".join(rng.choice(letters) for _ in range(n))


@pytest.fixture(scope="module")
def reference_run(small_tokenizer, tmp_path_factory) -> Path:
    """A run whose final model has learned the verse (plain Adam on its windows, ~2 s) and
    whose init model is the run's seeded initialisation."""
    tok, _ = small_tokenizer
    run = tmp_path_factory.mktemp("runs") / "ref"
    save_tokenizer(tok, run / "tokenizer")
    overrides = ["--model.d_model=32", "--model.n_layers=2", "--model.n_heads=2"]
    overrides += [f"--model.max_seq_len={SEQ}", f"--pretrain.seq_len={SEQ}"]
    overrides += [f"--sft.seq_len={SEQ}", f"--align.seq_len={SEQ}"]
    cfg = load_config(ROOT / "recipes" / "quickstart.toml", overrides)
    (run / "config.json").write_text(cfg.model_dump_json())
    torch.manual_seed(cfg.run.seed)
    model = Transformer(cfg.model, tok.get_vocab_size())
    ids = [tok.token_to_id(BOS), *tok.encode(VERSE * 40).ids]
    rows = torch.tensor([ids[i : i + SEQ + 1] for i in range(0, 4 * SEQ, SEQ)])
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(60):
        logits = model(rows[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), rows[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5
    save_model_dir(run / "pretrain" / "model", model)
    return run


def docs() -> list[Document]:
    return [
        Document("verse-a", VERSE * 8, {"source": "pattern"}),
        Document("noise-a", noise(1), {"source": "noise"}),
        Document("verse-b", VERSE * 3, {"source": "pattern"}),
        Document("noise-b", noise(2), {"source": "noise"}),
        Document("prose", "A short note on the history of the cat and the door.", {"source": "x"}),
    ]


def test_scorer_losses_are_the_reference_models_mean_token_loss(reference_run, small_tokenizer):
    tok, _ = small_tokenizer
    scorer = ReferenceScorer(UtilityFilterConfig(run=str(reference_run), from_model="init"))
    text = VERSE * 2  # fits one window: one forward pass gives the same mean
    ids = torch.tensor([[tok.token_to_id(BOS), *tok.encode(text).ids]])
    assert ids.shape[1] <= SEQ + 1
    with torch.no_grad():
        want = [
            F.cross_entropy(m(ids[:, :-1])[0], ids[0, 1:]).item()
            for m in (scorer.to_model, scorer.from_model)
        ]
    loss_to, loss_from = scorer.losses(text)
    assert loss_to == pytest.approx(want[0], rel=1e-5)
    assert loss_from == pytest.approx(want[1], rel=1e-5)
    # The init model is near uniform over the 1024-token vocabulary.
    assert loss_from == pytest.approx(torch.log(torch.tensor(1024.0)).item(), abs=0.15)
    # A long document is scored over several windows, capped at max_tokens.
    long_to, _ = scorer.losses(VERSE * 40)
    assert long_to < 0.5
    capped = ReferenceScorer(UtilityFilterConfig(run=str(reference_run), max_tokens=10))
    short_ids = torch.tensor([[tok.token_to_id(BOS), *tok.encode(VERSE * 40).ids[:10]]])
    with torch.no_grad():
        first10 = F.cross_entropy(capped.to_model(short_ids[:, :-1])[0], short_ids[0, 1:])
    assert capped.losses(VERSE * 40)[0] == pytest.approx(first10.item(), rel=1e-5)


def test_filter_keeps_and_drops_by_loss_and_reduction_with_reasons(reference_run):
    cfg = UtilityFilterConfig(run=str(reference_run), from_model="init")
    scorer = ReferenceScorer(cfg)
    # The reference model learned the verse, never saw random characters, and reads other
    # English in between (measured: verse 0.35-0.48, prose 7.2, noise 11.0 nats/token).
    stream, stats = run_steps(docs(), [UtilityFilter(scorer, max_loss=9.0)])
    kept = list(stream)
    assert [d.id for d in kept] == ["verse-a", "verse-b", "prose"]
    assert stats[0].dropped == {"too_hard": 2}
    assert stats[0].dropped_by_source == {("noise", "too_hard"): 2}
    verse, prose = kept[0].meta, kept[2].meta
    assert verse["utility_loss"] < 1.0 < prose["utility_loss"] < 9.0
    assert verse["utility_reduction"] > 6.0  # from ~ln 1024 to under 0.5
    assert verse["utility_score"] == verse["utility_reduction"]

    # The verse is learned by heart: a floor on the loss drops it, a floor on the
    # reduction keeps it and drops what the training between the models taught less.
    # (Training on the verse alone taught other text nothing: prose's loss went up a little.)
    assert prose["utility_reduction"] < 1.0
    filt = UtilityFilter(scorer, min_loss=1.0, min_reduction=None)
    stream, stats = run_steps(docs(), [filt])
    assert [d.id for d in stream] == ["noise-a", "noise-b", "prose"]
    assert stats[0].dropped == {"already_learned": 2}
    stream, stats = run_steps(docs(), [UtilityFilter(scorer, min_reduction=1.0)])
    assert [d.id for d in stream] == ["verse-a", "verse-b"]
    assert stats[0].dropped == {"teaches_little": 3}
    assert stats[0].dropped_by_source[("noise", "teaches_little")] == 2
    assert (stats[0].docs_in, stats[0].docs_out) == (5, 2)

    # Top fraction: 0.4 of 5 documents keeps the two with the largest reduction, in stream order.
    stream, stats = run_steps(docs(), [UtilityFilter(scorer), UtilityTopFraction(scorer, 0.4)])
    assert [d.id for d in stream] == ["verse-a", "verse-b"]
    assert stats[1].dropped == {"below_top_utility": 3}
    with pytest.raises(ValueError, match="needs from_model"):
        UtilityFilterConfig(run=str(reference_run), min_reduction=0.1)


def test_data_stage_builds_the_steps_and_fingerprints_the_reference_models(reference_run):
    data = DataConfig(
        sources=[{"name": "x", "path": "data/tinyshakespeare/input.txt"}],
        utility_filter={"run": str(reference_run), "max_loss": 4.0, "top_fraction": 0.5},
    )
    names = [s.name for s in build_steps(data)]
    assert names[-2:] == ["utility", "utility_top"]
    filt = build_steps(data)[-2]
    assert isinstance(filt, UtilityFilter) and filt.max_loss == 4.0
    files = model_files(data.utility_filter)
    assert reference_run / "pretrain" / "model" / "model.safetensors" in files
    assert all(f.is_file() for f in files)
    cfg = load_config(ROOT / "recipes" / "quickstart.toml")
    cfg.data = data
    assert set(map(str, files)) <= set(external_files(cfg, "data"))
