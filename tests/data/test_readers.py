from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import pytest

from frontierlm.config import DataSource
from frontierlm.data.documents import DataError, Document, SourceStats, read_shards, write_shards
from frontierlm.data.readers import read_source


def read(source: DataSource, workers: int = 1) -> tuple[list[Document], SourceStats]:
    stats = SourceStats(source.name)
    return list(read_source(source, stats, workers)), stats


def test_jsonl_malformed_lines_are_counted_with_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "x.jsonl"
    lines = [
        json.dumps({"text": "first good", "id": "a"}).encode(),
        b'{"text": oops}',
        json.dumps({"body": "no text field", "id": "c"}).encode(),
        b'{"text": "bad \xff byte", "id": "d"}',
        b"[1, 2]",
        b"",
        json.dumps({"text": "last good", "id": "g"}).encode(),
    ]
    path.write_bytes(b"\n".join(lines) + b"\n")
    docs, stats = read(DataSource(name="x", path=str(path), id_field="id"))
    assert [(d.id, d.text) for d in docs] == [("a", "first good"), ("g", "last good")]
    assert docs[0].meta == {"source": "x"}
    assert (stats.docs, stats.malformed) == (2, 4)
    assert stats.messages[0] == f"{path}:2: invalid JSON (Expecting value at column 10)"
    assert stats.messages[1] == f"{path}:3: text field 'text' is missing"
    assert stats.messages[2].startswith(f"{path}:4: invalid UTF-8")
    assert stats.messages[3] == f"{path}:5: not a JSON object (got list)"


def test_jsonl_template_ids_and_truncated_gzip(tmp_path: Path) -> None:
    records = [{"question": f"q{i}", "answer": f"a{i}"} for i in range(200)]
    records[3] = {"question": "only a question"}
    blob = gzip.compress("".join(json.dumps(r) + "\n" for r in records).encode())
    path = tmp_path / "qa.jsonl.gz"
    path.write_bytes(blob[: len(blob) // 2])
    source = DataSource(name="qa", path=str(path), text_template="Q: {question}\nA: {answer}")
    docs, stats = read(source)
    assert docs[0].id == "qa/1" and docs[0].text == "Q: q0\nA: a0"
    assert docs[3].id == "qa/5"  # line 4 was skipped, ids keep the file's line numbers
    assert stats.malformed == 2
    assert stats.messages[0] == f"{path}:4: text_template needs field 'answer', missing in record"
    last_line = int(docs[-1].id.split("/")[1])
    assert stats.messages[1].startswith(f"{path}:{last_line + 1}: truncated or corrupt compressed")
    assert 0 < len(docs) < 199


def test_jsonl_max_docs(repo_data: Path) -> None:
    source = DataSource(
        name="gsm8k",
        path=str(repo_data / "gsm8k/train.jsonl.gz"),
        text_template="{question} {answer}",
        max_docs=7,
    )
    docs, stats = read(source)
    assert len(docs) == stats.docs == 7
    assert [d.id for d in docs] == [f"gsm8k/{i}" for i in range(1, 8)]


def test_txt_split_and_group(tmp_path: Path) -> None:
    path = tmp_path / "t.txt"
    path.write_text("aaaa\n\nbb\n\n\n\ncc\n\ndddddd\n\n", encoding="utf-8")
    whole, _ = read(DataSource(name="t", path=str(path)))
    assert [d.text for d in whole] == ["aaaa\n\nbb\n\n\n\ncc\n\ndddddd\n\n"]
    pieces, _ = read(DataSource(name="t", path=str(path), split_pattern=r"\n\n"))
    assert [d.text for d in pieces] == ["aaaa", "bb", "cc", "dddddd"]  # blank piece skipped
    assert [d.id for d in pieces] == ["t/0", "t/1", "t/2", "t/3"]
    grouped, _ = read(DataSource(name="t", path=str(path), split_pattern=r"\n\n", group_chars=7))
    # merged text is the original span, separators included
    assert [d.text for d in grouped] == ["aaaa\n\nbb", "cc\n\ndddddd"]


def test_txt_wikitext_headings_and_bad_utf8(repo_data: Path, tmp_path: Path) -> None:
    head = (repo_data / "wikitext-2/valid.txt").read_bytes()[:20000]
    path = tmp_path / "wiki.txt"
    path.write_bytes(head + b"\n zqxbad \xc3\x28 line \n = Next = \n text\n")
    source = DataSource(name="w", path=str(path), split_pattern=r"\n(?= = [^=].* = \n)")
    docs, stats = read(source)
    # the file opens with a blank piece " " (not a document); the lookahead keeps headings
    assert docs[0].text.startswith(" = Homarus gammarus = \n")
    assert docs[-1].text == " = Next = \n text\n"
    bad_line = head.count(b"\n") + 2
    assert stats.messages == [
        f"{path}:{bad_line}: invalid UTF-8 (invalid continuation byte at column 9)"
    ]
    assert "zqxbad" not in "".join(d.text for d in docs)


def test_shakespeare_grouping_covers_file(repo_data: Path) -> None:
    path = repo_data / "tinyshakespeare/input.txt"
    docs, _ = read(DataSource(name="s", path=str(path), split_pattern="\n\n", group_chars=2000))
    assert all(len(d.text) >= 2000 for d in docs[:-1])
    assert sum(len(d.text) for d in docs) > 0.99 * path.stat().st_size
    assert docs[0].text.startswith("First Citizen:")


def test_warc_real_pages(repo_data: Path) -> None:
    source = DataSource(name="cc", path=str(repo_data / "web/commoncrawl-sample-0000.warc.gz"))
    docs, stats = read(source, workers=1)
    assert stats.docs == len(docs) == 22 and stats.malformed == 0
    assert all(d.id.startswith("http") and d.meta == {"source": "cc", "url": d.id} for d in docs)
    english = [d for d in docs if " the " in d.text and len(d.text) > 500]
    assert len(english) >= 10
    assert "Semantic Scholar" in docs[0].text


def test_warc_truncated_copy_is_counted(repo_data: Path, tmp_path: Path) -> None:
    data = (repo_data / "web/commoncrawl-sample-0000.warc.gz").read_bytes()
    path = tmp_path / "cut.warc.gz"
    path.write_bytes(data[: len(data) // 2])
    docs, stats = read(DataSource(name="cut", path=str(path)), workers=1)
    assert 0 < len(docs) < 22
    assert stats.malformed == 1
    assert stats.messages[0].startswith(f"{path}:byte ")
    assert "truncated or corrupt record" in stats.messages[0]


def test_warc_max_docs_and_garbage(repo_data: Path, tmp_path: Path) -> None:
    source = DataSource(
        name="cc", path=str(repo_data / "web/commoncrawl-sample-0001.warc.gz"), max_docs=3
    )
    docs, _ = read(source, workers=2)
    assert len(docs) == 3
    path = tmp_path / "junk.warc"
    path.write_text("not a warc\n" * 10)
    docs, stats = read(DataSource(name="junk", path=str(path)))
    assert docs == [] and stats.malformed == 1
    assert "unreadable WARC data" in stats.messages[0]


def test_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(DataError) as err:
        read_source(DataSource(name="gone", path="nope/missing.jsonl"), SourceStats("gone"))
    msg = str(err.value)
    assert "'gone'" in msg and "nope/missing.jsonl" in msg and os.getcwd() in msg


def test_shards_round_trip_and_stale_removal(tmp_path: Path) -> None:
    docs = [Document(f"d{i}", f"text {i} ünïcode", {"source": "s", "n": i}) for i in range(7)]
    (tmp_path / "shard-00009.jsonl.gz").write_bytes(b"stale")
    paths = write_shards(iter(docs), tmp_path, shard_docs=3)
    assert [p.name for p in paths] == [f"shard-0000{i}.jsonl.gz" for i in range(3)]
    assert sorted(tmp_path.iterdir()) == paths
    assert list(read_shards(tmp_path)) == docs
    first = json.loads(gzip.decompress(paths[0].read_bytes()).splitlines()[0])
    assert first == {"id": "d0", "text": "text 0 ünïcode", "meta": {"source": "s", "n": 0}}
    assert write_shards([], tmp_path, 3) == [] and list(tmp_path.iterdir()) == []
