from __future__ import annotations

import itertools
import json
import random
from pathlib import Path

import numpy as np
import pytest
from minhash_corpus import mutate, near_duplicate_corpus, shipped_texts
from pydantic import ValidationError

from frontierlm.config import DataConfig, DataSource
from frontierlm.data import read_shards, run_data_stage, write_shards
from frontierlm.data.documents import Document
from frontierlm.data.minhash import (
    MinHashDedup,
    MinHasher,
    UnionFind,
    candidate_pairs,
    exact_jaccard_pairs,
    jaccard,
)
from frontierlm.data.pipeline import StepStats, TwoPassStep

THRESHOLD = 0.8


@pytest.fixture(scope="module")
def corpus(request: pytest.FixtureRequest) -> list[str]:
    data = Path(request.config.rootpath) / "data"
    return near_duplicate_corpus(data)


def run_step(step: MinHashDedup, texts: list[str]) -> tuple[list[Document], StepStats]:
    stats = StepStats(step.name)
    docs = (Document(f"d{i}", t, {"source": "s"}) for i, t in enumerate(texts))
    return list(step.process(docs, stats)), stats


def precision_recall(pred: set, truth: set) -> tuple[float, float]:
    hits = len(pred & truth)
    return hits / max(len(pred), 1), hits / max(len(truth), 1)


def test_shingles_are_word_ngrams_of_normalized_text() -> None:
    hasher = MinHasher(ngram=5)
    a = "The quick brown fox jumps over the lazy dog again"
    b = "  the QUICK brown   fox jumps over the lazy dog again\n"
    assert np.array_equal(hasher.shingles(a), hasher.shingles(b))
    assert len(hasher.shingles(a)) == 6  # 10 words -> 6 five-grams
    # Shorter than n words: one shingle of all of them; equal texts still match.
    assert len(hasher.shingles("three short words")) == 1
    short = hasher.shingles("three short words")
    assert np.array_equal(short, hasher.shingles("Three  short WORDS"))
    assert len(hasher.shingles("")) == 1
    # The hashed sets give the same Jaccard as the sets of word tuples themselves.
    rng = random.Random(1)
    words = [rng.choice("abcdefgh") for _ in range(300)]
    other = mutate(" ".join(words), 0.05, list("abcdefgh"), rng).split()

    def grams(ws: list[str]) -> set[tuple[str, ...]]:
        return {tuple(ws[i : i + 5]) for i in range(len(ws) - 4)}

    exact = len(grams(words) & grams(other)) / len(grams(words) | grams(other))
    hashed = jaccard(hasher.shingles(" ".join(words)), hasher.shingles(" ".join(other)))
    assert hashed == pytest.approx(exact, abs=1e-12)


def test_exact_jaccard_pairs_matches_brute_force(corpus: list[str]) -> None:
    hasher = MinHasher()
    # The first 400 documents hold some mutated copies (the corpus is shuffled).
    sets = [hasher.shingles(t) for t in corpus[:400]]
    brute = {
        (i, j)
        for i, j in itertools.combinations(range(len(sets)), 2)
        if jaccard(sets[i], sets[j]) >= 0.5
    }
    assert set(exact_jaccard_pairs(sets, 0.5)) == brute and brute


def test_minhash_pairs_agree_with_exact_jaccard(corpus: list[str]) -> None:
    """The done-when figure: near-duplicate pairs found vs exact Jaccard >= 0.8 on the same
    5-gram shingle sets, over ~2,800 shipped documents plus 400 mutated copies."""
    hasher = MinHasher(bands=14, rows=8, ngram=5)
    sets = [hasher.shingles(t) for t in corpus]
    sigs = np.stack([hasher.signature(s) for s in sets])
    truth = exact_jaccard_pairs(sets, THRESHOLD)
    assert len(truth) > 150  # enough pairs to measure, spread around the threshold
    lsh = candidate_pairs(hasher, sigs)
    by_signature = candidate_pairs(hasher, sigs, threshold=THRESHOLD)
    exact = {p for p in lsh if jaccard(sets[p[0]], sets[p[1]]) >= THRESHOLD}
    figures = {
        name: precision_recall(pred, set(truth))
        for name, pred in (("none", lsh), ("signature", by_signature), ("exact", exact))
    }
    print(f"\n{len(corpus)} docs, {len(truth)} true pairs at J >= {THRESHOLD}")
    for name, (p, r) in figures.items():
        print(f"verify={name:9s} precision {p:.3f} recall {r:.3f}")
    # LSH finds the true pairs; exact verification removes the S-curve's false positives.
    assert figures["none"][1] >= 0.95
    assert figures["exact"][0] >= 0.95 and figures["exact"][1] >= 0.95


def test_step_drops_agree_with_exact_clusters(corpus: list[str]) -> None:
    """Document level: what the step drops vs what clustering the exact pairs would drop."""
    hasher = MinHasher()
    truth = exact_jaccard_pairs([hasher.shingles(t) for t in corpus], THRESHOLD)
    uf = UnionFind(len(corpus))
    for i, j in truth:
        uf.union(i, j)
    truth_dropped = set(np.flatnonzero(uf.roots() != np.arange(len(corpus))).tolist())
    step = MinHashDedup(verify="exact", threshold=THRESHOLD, spill_docs=500)
    kept, stats = run_step(step, corpus)
    dropped = {i for i in range(len(corpus)) if step.cluster_root[i] != i}
    precision, recall = precision_recall(dropped, truth_dropped)
    print(f"\ndocuments dropped {len(dropped)}: precision {precision:.3f} recall {recall:.3f}")
    assert precision >= 0.95 and recall >= 0.95
    assert stats.docs_in == len(corpus) and stats.docs_out == len(kept)
    assert stats.dropped["near_duplicate"] == len(dropped)


def test_each_cluster_keeps_exactly_its_first_document(corpus: list[str]) -> None:
    texts = corpus[:1500]
    step = MinHashDedup(spill_docs=300)
    kept, _ = run_step(step, texts)
    roots = step.cluster_root
    kept_idx = [int(d.id[1:]) for d in kept]
    assert kept_idx == sorted(set(roots.tolist()))  # one per cluster, in stream order
    for root in set(roots.tolist()):
        assert root == np.flatnonzero(roots == root).min()
    sizes = np.bincount(roots)
    for doc, i in zip(kept, kept_idx, strict=True):
        if sizes[i] > 1:
            assert doc.meta["minhash_cluster"] == i
        else:
            assert "minhash_cluster" not in doc.meta
    assert (sizes > 1).sum() > 20


@pytest.mark.parametrize("verify", ["none", "exact"])
def test_result_independent_of_runs_chunks_and_memory(corpus: list[str], verify: str) -> None:
    texts = corpus[:800]
    reference = MinHashDedup(verify=verify, in_memory=True)
    ref_kept, _ = run_step(reference, texts)
    assert len(ref_kept) < len(texts)
    for spill_docs, merge_entries in ((800, 1 << 22), (7, 100), (1000, 1), (64, 37)):
        step = MinHashDedup(verify=verify, spill_docs=spill_docs, merge_entries=merge_entries)
        kept, _ = run_step(step, texts)
        assert np.array_equal(step.cluster_root, reference.cluster_root), spill_docs
        assert [d.id for d in kept] == [d.id for d in ref_kept]
    # The same step object run again gives the same answer.
    again, _ = run_step(reference, texts)
    assert [d.id for d in again] == [d.id for d in ref_kept]


def test_result_independent_of_input_shards(corpus: list[str], tmp_path: Path) -> None:
    docs = [Document(f"d{i}", t, {"source": "s"}) for i, t in enumerate(corpus[:600])]
    results = []
    for shard_docs in (13, 600):
        shard_dir = tmp_path / f"in-{shard_docs}"
        shard_dir.mkdir()
        write_shards(docs, shard_dir, shard_docs)
        step = MinHashDedup(work_dir=tmp_path / "scratch")
        results.append([d.id for d in step.process(read_shards(shard_dir), StepStats("m"))])
    assert results[0] == results[1] and len(results[0]) < 600
    assert list((tmp_path / "scratch").iterdir()) == []  # scratch removed after each run


def test_abandoned_stream_removes_scratch(corpus: list[str], tmp_path: Path) -> None:
    step = MinHashDedup(work_dir=tmp_path, spill_docs=50)
    docs = (Document(str(i), t) for i, t in enumerate(corpus[:200]))
    stream = step.process(docs, StepStats("m"))
    next(stream)
    assert len(list(tmp_path.iterdir())) == 1
    stream.close()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("in_memory", [True, False])
def test_empty_and_short_streams(in_memory: bool) -> None:
    assert run_step(MinHashDedup(in_memory=in_memory), [])[0] == []
    texts = ["", "", "two words", "Two  WORDS", "other words here", "ünïcode téxt ✓ and more"]
    kept, stats = run_step(MinHashDedup(in_memory=in_memory, spill_docs=2), texts)
    assert [d.text for d in kept] == ["", "two words", "other words here", texts[5]]
    assert stats.dropped == {"near_duplicate": 2}


def test_two_pass_step_refuses_single_document_calls() -> None:
    with pytest.raises(TypeError, match="two-pass"):
        MinHashDedup().drop_reason(Document("x", "text"))
    assert isinstance(MinHashDedup(), TwoPassStep)


def test_data_stage_drops_near_duplicates(repo_data: Path, tmp_path: Path) -> None:
    texts = shipped_texts(repo_data, gsm=0, shakespeare_chars=0)[:40]
    # Two edits in 100+ words: Jaccard >= 0.8 on 5-grams, and not an exact duplicate.
    copies = []
    for text in texts[:6]:
        words = text.split()
        if len(words) > 100:
            copies.append(" ".join([*words[:10], "edited", *words[11:50], *words[51:]]))
    lines = [json.dumps({"text": t}) for t in texts + copies]
    (tmp_path / "web.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    out = tmp_path / "out"
    out.mkdir()
    cfg = DataConfig(
        sources=[DataSource(name="web", path=str(tmp_path / "web.jsonl"))],
        min_chars=0,
        min_words=0,
        minhash=True,
        shard_docs=16,
        workers=1,
    )
    run_data_stage(cfg, out)
    stats = json.loads((out / "stats.json").read_text(encoding="utf-8"))
    assert [s["step"] for s in stats["steps"]][-2:] == ["exact_dedup", "minhash"]
    assert stats["steps"][-1]["dropped"] == {"near_duplicate": len(copies)} and copies
    assert stats["sources"]["web"]["dropped"]["near_duplicate"] == len(copies)
    kept = list(read_shards(out))
    assert len(kept) == len(texts)
    assert sum("minhash_cluster" in d.meta for d in kept) == len(copies)
    assert not list(out.glob("minhash-*"))  # scratch removed


def test_minhash_config_validation() -> None:
    source = DataSource(name="a", path="a.jsonl")
    cfg = DataConfig(sources=[source])
    assert not cfg.minhash and (cfg.minhash_bands, cfg.minhash_rows) == (14, 8)
    with pytest.raises(ValidationError, match=r"minhash_bands x data\.minhash_rows"):
        DataConfig(sources=[source], minhash_bands=100, minhash_rows=64)
    with pytest.raises(ValidationError, match="minhash_verify"):
        DataConfig(sources=[source], minhash_verify="maybe")
    with pytest.raises(ValidationError, match="minhash_threshold"):
        DataConfig(sources=[source], minhash_threshold=1.5)
