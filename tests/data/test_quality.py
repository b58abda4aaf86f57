from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
from test_stage import tiny_config

from frontierlm.cli import main
from frontierlm.config import load_config
from frontierlm.data import build_steps, run_data_stage
from frontierlm.data.documents import Document
from frontierlm.data.pipeline import run_steps
from frontierlm.data.quality import (
    DEFAULT_NEGATIVES,
    DEFAULT_POSITIVES,
    QualityFilter,
    QualityModel,
    QualityTopFraction,
    TrainResult,
    auc,
    read_texts,
    train_classifier,
    windows,
)
from frontierlm.stages import external_files

REPO = Path(__file__).resolve().parents[2]
SHARED = REPO.parent / "shared" / "data"


@pytest.fixture(scope="module")
def docs() -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    cwd = os.getcwd()
    os.chdir(REPO)  # the defaults are repository-relative, as on the command line
    try:
        return read_texts(DEFAULT_POSITIVES), read_texts(DEFAULT_NEGATIVES)
    finally:
        os.chdir(cwd)


@pytest.fixture(scope="module")
def trained(docs: tuple[list[tuple[str, str]], list[tuple[str, str]]]) -> TrainResult:
    return train_classifier(*docs)


def test_auc_matches_pairwise_definition() -> None:
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 5, 60).astype(float)  # many ties
    labels = rng.integers(0, 2, 60).astype(bool)
    pos, neg = scores[labels], scores[~labels]
    pairs = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    assert auc(scores, labels) == pytest.approx(pairs / (len(pos) * len(neg)))


def test_classifier_separates_wikipedia_from_common_crawl(trained: TrainResult) -> None:
    # Measured: held-out AUC 0.9986 on 446 windows of 12 WikiText articles and 9 Common Crawl
    # pages that training never saw.
    print(f"held-out AUC {trained.heldout_auc:.4f}")
    assert trained.heldout_auc >= 0.9
    assert trained.model.meta["heldout_auc"] == round(trained.heldout_auc, 4)


@pytest.mark.slow  # reads ../shared/data, which a clean clone (CI) does not have
def test_classifier_on_files_it_never_saw(trained: TrainResult) -> None:
    """WikiText-2 *test* articles against another Common Crawl extract (cc_en_head-0174)."""
    pos = read_texts([str(SHARED / "wikitext-2/test.txt")])
    neg = read_texts([str(SHARED / "web/commoncrawl/cc_en_head-0174.jsonl")])
    model = trained.model
    scores = np.array([model.score(t) for _, t in pos + neg])
    labels = np.r_[np.ones(len(pos)), np.zeros(len(neg))]
    doc_auc = auc(scores, labels)
    win_pos = [w for _, t in pos for w in windows(t, 100, 30)]
    win_neg = [w for _, t in neg for w in windows(t, 100, 30)]
    win_auc = auc(
        model.logits(win_pos + win_neg), np.r_[np.ones(len(win_pos)), np.zeros(len(win_neg))]
    )
    print(f"unseen files: document AUC {doc_auc:.4f}, window AUC {win_auc:.4f}")
    # Measured 0.93 (documents) and 0.91 (windows): lower than the in-distribution split, as
    # that extract holds encyclopedic pages of its own.
    assert doc_auc >= 0.85 and win_auc >= 0.85


def test_save_load_round_trip_and_mismatch(trained: TrainResult, tmp_path: Path) -> None:
    out = tmp_path / "model"
    trained.model.save(out)
    loaded = QualityModel.load(out)
    text = "The castle was built in the 12th century and rebuilt after the siege of 1403."
    assert loaded.score(text) == pytest.approx(trained.model.score(text), rel=1e-6)
    assert json.loads((out / "meta.json").read_text())["heldout_auc"] >= 0.9
    assert (out / "weights.npz").stat().st_size < 1_000_000  # only non-zero weights
    other = QualityModel(trained.model.bits, trained.model.weights * 2, 0.0, {})
    other.save(tmp_path / "other")
    (out / "weights.npz").write_bytes((tmp_path / "other/weights.npz").read_bytes())
    with pytest.raises(ValueError, match="does not match"):
        QualityModel.load(out)


def test_filter_scores_and_drops_below_threshold(
    trained: TrainResult, docs: tuple[list[tuple[str, str]], list[tuple[str, str]]]
) -> None:
    pos, neg = docs
    stream = [Document(i, t, {"source": "s"}) for i, t in pos[:5] + neg[:5]]
    kept, stats = run_steps(iter(stream), [QualityFilter(trained.model, threshold=0.5)])
    kept_ids = {d.id for d in kept}
    assert all(0.0 <= d.meta["quality_score"] <= 1.0 for d in stream)
    assert kept_ids == {d.id for d in stream if d.meta["quality_score"] >= 0.5}
    assert stats[0].dropped["low_quality"] == 10 - len(kept_ids)


@pytest.mark.parametrize("n, fraction", [(10, 0.3), (7, 0.5), (1, 0.1), (0, 0.5), (9, 1.0)])
def test_top_fraction_keeps_exact_count_with_ties_in_order(
    n: int, fraction: float, tmp_path: Path
) -> None:
    scores = [0.5, 0.9, 0.5, 0.1, 0.9, 0.5, 0.7, 0.2, 0.5, 0.3][:n]
    stream = [Document(str(i), f"doc {i}", {"quality_score": s}) for i, s in enumerate(scores)]
    step = QualityTopFraction(None, fraction, work_dir=tmp_path)
    kept, stats = run_steps(iter(stream), [step])
    kept_ids = [d.id for d in kept]
    expected = math.floor(fraction * n + 0.5)
    assert len(kept_ids) == expected == stats[0].docs_out
    assert stats[0].dropped.get("below_top_fraction", 0) == n - expected
    by_rank = sorted(range(n), key=lambda i: (-scores[i], i))[:expected]
    assert kept_ids == [str(i) for i in sorted(by_rank)]  # stream order kept
    assert list(tmp_path.iterdir()) == []  # the spill file is gone


def test_data_stage_keeps_top_fraction_and_fingerprints_model(
    trained: TrainResult, repo_data: Path, tmp_path: Path
) -> None:
    model_dir = tmp_path / "model"
    trained.model.save(model_dir)
    cfg = tiny_config(repo_data, tmp_path)
    cfg.quality_model = str(model_dir)
    cfg.quality_top_fraction = 0.5
    assert [s.name for s in build_steps(cfg)][-2:] == ["quality", "quality_top"]
    out = tmp_path / "out"
    out.mkdir()
    run_data_stage(cfg, out)
    steps = {s["step"]: s for s in json.loads((out / "stats.json").read_text())["steps"]}
    top = steps["quality_top"]
    assert top["out"] == math.floor(0.5 * top["in"] + 0.5)
    assert [p.name for p in out.iterdir() if p.name.startswith("quality-")] == []

    recipe = load_config(REPO / "recipes/quickstart.toml", [f"--data.quality_model={model_dir}"])
    files = external_files(recipe, "data")
    assert str(model_dir / "weights.npz") in files and str(model_dir / "meta.json") in files


def test_cli_trains_and_stores_auc(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)
    out = tmp_path / "clf"
    assert main(["train-classifier", str(out), "--bits", "16", "--steps", "60"]) == 0
    meta = json.loads((out / "meta.json").read_text())
    assert meta["bits"] == 16 and meta["heldout_auc"] >= 0.9
    assert main(["train-classifier", str(out), "--positive", "missing.txt"]) == 1
    again = tmp_path / "clf-again"  # the same tool spelled under the data stage
    assert main(["data", "train-classifier", str(again), "--bits", "16", "--steps", "60"]) == 0
    assert (again / "weights.npz").read_bytes() == (out / "weights.npz").read_bytes()
