from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from frontierlm.config import DataConfig, DataSource, load_config
from frontierlm.data import DataError, read_shards, run_data_stage
from frontierlm.stages import run_stage

MICRO = Path(__file__).resolve().parents[2] / "recipes" / "micro.toml"


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


def test_stats_json_breaks_malformed_down_by_reason(repo_data: Path, tmp_path: Path) -> None:
    cfg = tiny_config(repo_data, tmp_path)
    with open(tmp_path / "gsm.jsonl", "ab") as f:
        f.write(b'{"question": "no answer"}\n\xff\xfe\n')
    out = tmp_path / "out"
    out.mkdir()
    run_data_stage(cfg, out)
    stats = json.loads((out / "stats.json").read_text(encoding="utf-8"))
    gsm = stats["sources"]["gsm"]
    assert gsm["malformed"] == 3 and gsm["files"] == 1 and gsm["format"] == "jsonl"
    assert gsm["malformed_by_reason"] == {"invalid_json": 1, "missing_text": 1, "invalid_utf8": 1}
    assert stats["sources"]["web"]["malformed_by_reason"] == {}
    assert stats["malformed"]["by_reason"] == gsm["malformed_by_reason"]


def test_parquet_shards_from_a_folder_feed_the_tokenizer_stages(
    repo_data: Path, tmp_path: Path
) -> None:
    """data (a folder of .jsonl.zst, .txt and .wet.gz plus a Parquet file, written as Parquet
    shards of ~20 KB) -> tokenizer -> tokenize, through the stage runner."""
    with gzip.open(repo_data / "gsm8k/train.jsonl.gz", "rb") as f:
        lines = [next(f) for _ in range(300)]
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "gsm.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(b"".join(lines)))
    shakespeare = (repo_data / "tinyshakespeare/input.txt").read_text(encoding="utf-8")
    (corpus / "play.txt").write_text(shakespeare[:60000], encoding="utf-8")
    shutil.copy(repo_data / "web/whirlwind.warc.wet.gz", corpus / "page.wet.gz")
    records = [json.loads(line) for line in lines[:150]]
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "more.parquet")

    cfg = load_config(MICRO, [f"--run.out_dir={tmp_path / 'runs'}"])
    data = cfg.data.model_copy(
        update={
            "sources": [
                DataSource(
                    name="folder",
                    path=str(corpus),
                    text_template="Question: {question}\nAnswer: {answer}",
                ),
                DataSource(name="pq", path=str(tmp_path / "more.parquet"), text_field="answer"),
            ],
            "shard_format": "parquet",
            "shard_bytes": 20_000,
            "dedup": False,
        }
    )
    # The template applies to the folder's JSONL; its txt and WET files are read as text.
    cfg = cfg.model_copy(update={"data": data})
    run_stage(cfg, "data")
    out = cfg.run.run_dir / "data"
    stats = json.loads((out / "stats.json").read_text(encoding="utf-8"))
    assert stats["sources"]["folder"]["files"] == 3
    assert stats["sources"]["folder"]["format"] == "jsonl+txt+wet"
    assert stats["sources"]["folder"]["docs_read"] == 300 + 1 + 1
    assert stats["sources"]["pq"]["docs_read"] == 150
    shards = sorted(out.glob("shard-*.parquet"))
    assert stats["shards"] == [p.name for p in shards] and len(shards) > 3
    docs = list(read_shards(out))
    assert len(docs) == stats["totals"]["docs_out"]
    assert any(d.meta.get("url") == "https://an.wikipedia.org/wiki/Escopete" for d in docs)

    run_stage(cfg, "tokenizer")
    record = run_stage(cfg, "tokenize")
    metrics = record["metrics"]
    assert (cfg.run.run_dir / "tokenize" / "train.bin").stat().st_size > 0
    assert metrics["train_docs"] + metrics["val_docs"] == len(docs)
    assert set(metrics["train_tokens_by_source"]) == {"folder", "pq"}
