from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from frontierlm.config import DataConfig, DataSource
from frontierlm.data import DataError, read_shards, run_data_stage


def tiny_config(repo_data: Path, tmp: Path) -> DataConfig:
    """Small real slices: 12 GSM8K records (one repeated with other spacing, one broken line),
    the first 6000 chars of Shakespeare, 5 pages of a Common Crawl WARC."""
    with gzip.open(repo_data / "gsm8k/train.jsonl.gz", "rt", encoding="utf-8") as f:
        records = [json.loads(next(f)) for _ in range(12)]
    dup = dict(records[0], question=records[0]["question"].upper() + "  ")
    lines = [json.dumps(r) for r in records] + [json.dumps(dup), "{broken"]
    (tmp / "gsm.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    shakespeare = (repo_data / "tinyshakespeare/input.txt").read_text(encoding="utf-8")
    (tmp / "shakespeare.txt").write_text(shakespeare[:6000], encoding="utf-8")
    return DataConfig(
        sources=[
            DataSource(
                name="gsm",
                path=str(tmp / "gsm.jsonl"),
                text_template="Question: {question}\nAnswer: {answer}",
            ),
            DataSource(
                name="play",
                path=str(tmp / "shakespeare.txt"),
                split_pattern="\n\n",
                group_chars=1000,
            ),
            DataSource(
                name="web",
                path=str(repo_data / "web/commoncrawl-sample-0000.warc.gz"),
                max_docs=5,
            ),
        ],
        min_chars=200,
        min_words=30,
        shard_docs=8,
        workers=1,
    )


def test_run_data_stage_writes_shards_and_stats(repo_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    cfg = tiny_config(repo_data, tmp_path)
    metrics = run_data_stage(cfg, out)

    stats = json.loads((out / "stats.json").read_text(encoding="utf-8"))
    sources = stats["sources"]
    assert sources["gsm"]["docs_read"] == 13 and sources["gsm"]["malformed"] == 1
    assert sources["gsm"]["dropped"]["exact_duplicate"] == 1
    assert sources["web"]["docs_read"] == 5
    assert sources["play"]["docs_read"] == 6  # 6000 chars in >=1000-char groups
    assert stats["malformed"]["total"] == 1
    assert stats["malformed"]["messages"] == [
        f"{tmp_path / 'gsm.jsonl'}:14: invalid JSON (Expecting property name enclosed in "
        "double quotes at column 2)"
    ]
    steps = {s["step"]: s for s in stats["steps"]}
    assert list(steps) == ["length", "alpha", "exact_dedup"]
    assert steps["length"]["in"] == 13 + 6 + 5
    assert steps["exact_dedup"]["out"] == metrics["docs_out"]
    assert steps["length"]["in"] - steps["exact_dedup"]["out"] == sum(
        n for s in stats["steps"] for n in s["dropped"].values()
    )

    docs = list(read_shards(out))
    assert len(docs) == metrics["docs_out"] == sum(s["docs_kept"] for s in sources.values())
    assert sum(len(d.text) for d in docs) == metrics["chars_out"]
    assert metrics["docs_in"] == 24 and metrics["malformed"] == 1
    assert stats["shards"] == [p.name for p in sorted(out.glob("shard-*.jsonl.gz"))]
    assert len(stats["shards"]) == -(-len(docs) // 8)
    assert [d.meta["source"] for d in docs] == sorted(
        (d.meta["source"] for d in docs), key=["gsm", "play", "web"].index
    )
    assert all("dedup_hash" in d.meta and "alpha_fraction" in d.meta for d in docs)
    assert any(d.id.startswith("https://") for d in docs)


def test_missing_source_fails_before_any_work(repo_data: Path, tmp_path: Path) -> None:
    cfg = tiny_config(repo_data, tmp_path)
    cfg.sources.append(DataSource(name="lost", path=str(tmp_path / "lost.jsonl")))
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(DataError, match=r"'lost'.*lost\.jsonl does not exist"):
        run_data_stage(cfg, out)
    assert list(out.iterdir()) == []
