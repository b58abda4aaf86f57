from __future__ import annotations

import gzip
import json
import os
import random
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from frontierlm.config import DataSource
from frontierlm.data.documents import DataError, Document, SourceStats, read_shards, write_shards
from frontierlm.data.readers import check_sources, read_source


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
    assert stats.malformed_by_reason == {
        "invalid_json": 1,
        "missing_text": 1,
        "invalid_utf8": 1,
        "not_an_object": 1,
    }


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


# ----------------------------------------------------------------------------- compression


def hex_records(n: int, seed: int = 0) -> list[dict[str, str]]:
    """Records of random hex text: barely compressible, so a few hundred KB span many zstd
    blocks and gzip members' deflate blocks, and a cut in the middle leaves whole lines before
    it."""
    rng = random.Random(seed)
    return [{"text": f"{i} " + rng.randbytes(100).hex()} for i in range(n)]


def jsonl_bytes(records: list[dict[str, str]]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in records).encode()


def test_zstd_plain_and_multi_frame(tmp_path: Path) -> None:
    records = hex_records(300)
    cctx = zstandard.ZstdCompressor()
    path = tmp_path / "x.jsonl.zst"
    # Two frames back to back, as pzstd or `cat a.zst b.zst` make them.
    path.write_bytes(
        cctx.compress(jsonl_bytes(records[:100])) + cctx.compress(jsonl_bytes(records[100:]))
    )
    docs, stats = read(DataSource(name="z", path=str(path)))
    assert [d.text for d in docs] == [r["text"] for r in records]
    assert docs[-1].id == "z/300" and stats.malformed == 0
    assert stats.bytes_read == stats.bytes_total == path.stat().st_size


def test_truncated_zstd_keeps_documents_before_the_break(tmp_path: Path) -> None:
    records = hex_records(3000)
    blob = zstandard.ZstdCompressor().compress(jsonl_bytes(records))
    path = tmp_path / "cut.jsonl.zst"
    path.write_bytes(blob[: len(blob) // 2])
    docs, stats = read(DataSource(name="z", path=str(path)))
    assert 0 < len(docs) < 3000
    assert [d.text for d in docs] == [r["text"] for r in records[: len(docs)]]
    assert stats.malformed == 1 and stats.malformed_by_reason == {"truncated_or_corrupt": 1}
    assert stats.messages == [
        f"{path}:{len(docs) + 1}: truncated or corrupt compressed data (EOFError: zstd stream "
        "ends inside a frame); rest of file skipped"
    ]


def test_corrupt_zstd_and_gzip_are_counted(tmp_path: Path) -> None:
    data = jsonl_bytes(hex_records(3000))
    for suffix, blob in (
        # Without a checksum zstd may decode flipped bytes into wrong text silently.
        ("zst", zstandard.ZstdCompressor(write_checksum=True).compress(data)),
        ("gz", gzip.compress(data)),
    ):
        middle = len(blob) // 2
        path = tmp_path / f"bad.jsonl.{suffix}"
        path.write_bytes(
            blob[:middle]
            + bytes(b ^ 0xFF for b in blob[middle : middle + 64])
            + blob[middle + 64 :]
        )
        docs, stats = read(DataSource(name="b", path=str(path)))
        # Lines before the damage are kept; the decoder may turn the damage itself into
        # garbage lines (counted as invalid JSON) before its checksum catches it.
        texts = [r["text"] for r in hex_records(3000)]
        assert [d.text for d in docs[:1000]] == texts[:1000], suffix
        assert stats.malformed_by_reason["truncated_or_corrupt"] == 1, suffix
        assert set(stats.malformed_by_reason) <= {
            "truncated_or_corrupt",
            "invalid_json",
            "invalid_utf8",
            "missing_text",
        }, suffix


def test_truncated_gzip_exact_message(tmp_path: Path) -> None:
    records = hex_records(3000)
    blob = gzip.compress(jsonl_bytes(records))
    path = tmp_path / "cut.jsonl.gz"
    path.write_bytes(blob[: len(blob) // 2])
    docs, stats = read(DataSource(name="g", path=str(path)))
    assert [d.text for d in docs] == [r["text"] for r in records[: len(docs)]]
    assert stats.messages == [
        f"{path}:{len(docs) + 1}: truncated or corrupt compressed data (EOFError: Compressed "
        "file ended before the end-of-stream marker was reached); rest of file skipped"
    ]
    assert stats.malformed_by_reason == {"truncated_or_corrupt": 1}


# ----------------------------------------------------------------------------- parquet


def test_parquet_rows_batches_and_malformed_rows(tmp_path: Path) -> None:
    path = tmp_path / "p.parquet"
    table = pa.table(
        {
            "doc_id": ["a", "b", None, "d", "e", "f"],
            "text": ["alpha", None, "gamma", "delta", "epsilon", "zeta"],
            "extra": [1, 2, 3, 4, 5, 6],
        }
    )
    pq.write_table(table, path, row_group_size=2)  # three row groups
    docs, stats = read(DataSource(name="p", path=str(path), id_field="doc_id"))
    assert [(d.id, d.text) for d in docs] == [
        ("a", "alpha"),
        ("d", "delta"),
        ("e", "epsilon"),
        ("f", "zeta"),
    ]
    assert docs[0].meta == {"source": "p"}
    assert stats.messages == [
        f"{path}:row 1: text field 'text' is missing",
        f"{path}:row 2: id field 'doc_id' is missing",
    ]
    assert stats.malformed_by_reason == {"missing_text": 1, "missing_id": 1}
    assert stats.bytes_read == stats.bytes_total

    # Default ids are row numbers; a template reads only the columns it names.
    docs, stats = read(DataSource(name="p", path=str(path), text_template="{doc_id}: {extra}"))
    assert [(d.id, d.text) for d in docs][:3] == [
        ("p/0", "a: 1"),
        ("p/1", "b: 2"),
        ("p/2", "None: 3"),
    ]
    assert stats.malformed == 0
    docs, stats = read(DataSource(name="p", path=str(path), text_template="{nope}"))
    assert docs == [] and stats.malformed == 6
    assert stats.messages[5] == f"{path}:row 5: text_template needs field 'nope', missing in record"


def test_parquet_missing_column_binary_text_and_truncated_file(tmp_path: Path) -> None:
    path = tmp_path / "b.parquet"
    pq.write_table(pa.table({"body": pa.array([b"ok \xc3\xa9", b"bad \xff"], pa.binary())}), path)
    docs, stats = read(DataSource(name="b", path=str(path), text_field="body"))
    assert [d.text for d in docs] == ["ok é"]
    assert stats.messages == [
        f"{path}:row 1: invalid UTF-8 in field 'body' (invalid start byte at byte 4)"
    ]
    docs, stats = read(DataSource(name="b", path=str(path)))  # no "text" column at all
    assert docs == [] and stats.malformed_by_reason == {"missing_text": 2}
    assert stats.messages[1] == f"{path}:row 1: text field 'text' is missing"

    cut = tmp_path / "cut.parquet"
    cut.write_bytes(path.read_bytes()[:-20])
    docs, stats = read(DataSource(name="c", path=str(cut)))
    assert docs == [] and stats.malformed_by_reason == {"truncated_or_corrupt": 1}
    assert stats.messages[0].startswith(f"{cut}: not a readable Parquet file (ArrowInvalid: ")


# ----------------------------------------------------------------------------- folders, globs


def make_corpus(root: Path) -> None:
    (root / "a").mkdir(parents=True)
    (root / "b.txt").write_text("bee file\n\nsecond part", encoding="utf-8")
    (root / "a" / "d.txt").write_text("dee file", encoding="utf-8")
    (root / "a" / "c.jsonl.zst").write_bytes(
        zstandard.ZstdCompressor().compress(b'{"text": "c one"}\n{"text": "c two"}\n')
    )
    pq.write_table(pa.table({"text": ["zed row"]}), root / "z.parquet")
    (root / ".DS_Store").write_bytes(b"\x00\x01 not a document")


def test_folder_reads_every_file_sorted_by_format(tmp_path: Path) -> None:
    make_corpus(tmp_path / "corpus")
    source = DataSource(name="f", path=str(tmp_path / "corpus"))
    docs, stats = read(source)
    assert [(d.id, d.text) for d in docs] == [
        ("f/a/c.jsonl.zst/1", "c one"),
        ("f/a/c.jsonl.zst/2", "c two"),
        ("f/a/d.txt", "dee file"),
        ("f/b.txt", "bee file\n\nsecond part"),
        ("f/z.parquet/0", "zed row"),
    ]
    assert stats.files == 4 and stats.malformed == 0
    assert (
        stats.bytes_read
        == stats.bytes_total
        == sum(
            p.stat().st_size
            for p in (tmp_path / "corpus").rglob("*")
            if p.is_file() and p.name[0] != "."
        )
    )
    split, _ = read(DataSource(name="f", path=str(tmp_path / "corpus"), split_pattern=r"\n\n"))
    assert [d.id for d in split if d.meta["source"] == "f"][2:5] == [
        "f/a/d.txt/0",
        "f/b.txt/0",
        "f/b.txt/1",
    ]
    limited, stats = read(DataSource(name="f", path=str(tmp_path / "corpus"), max_docs=3))
    assert len(limited) == 3 and stats.files == 2


def test_glob_pattern_sorted_with_ids_relative_to_its_root(tmp_path: Path) -> None:
    make_corpus(tmp_path / "corpus")
    docs, stats = read(DataSource(name="g", path=str(tmp_path / "corpus" / "**" / "*.txt")))
    assert [d.id for d in docs] == ["g/a/d.txt", "g/b.txt"] and stats.files == 2
    docs, _ = read(DataSource(name="g", path=str(tmp_path / "corpus" / "*.parquet")))
    assert [d.text for d in docs] == ["zed row"]


def test_folder_and_glob_errors_name_source_and_file(tmp_path: Path) -> None:
    make_corpus(tmp_path / "corpus")
    (tmp_path / "corpus" / "a" / "notes.md").write_text("# not a known suffix")
    with pytest.raises(DataError) as err:
        read_source(DataSource(name="f", path=str(tmp_path / "corpus")), SourceStats("f"))
    msg = str(err.value)
    assert msg.startswith(f"data.sources[0] ('f'): folder {tmp_path / 'corpus'}: cannot tell ")
    assert str(tmp_path / "corpus" / "a" / "notes.md") in msg
    assert ".jsonl/.json (jsonl)" in msg and ".parquet (parquet)" in msg and ".wet (wet)" in msg
    # An explicit format reads every file in it: the .md file becomes one more text document.
    docs, _ = read(DataSource(name="f", path=str(tmp_path / "corpus" / "a"), format="txt"))
    assert [d.id for d in docs] == ["f/c.jsonl.zst", "f/d.txt", "f/notes.md"]

    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"'e'.*folder .*empty holds no files"):
        read_source(DataSource(name="e", path=str(tmp_path / "empty")), SourceStats("e"))
    with pytest.raises(DataError, match=r"'g'.*glob pattern .*\*\.nothing matches no files"):
        read_source(DataSource(name="g", path=str(tmp_path / "*.nothing")), SourceStats("g"))
    cfg = [
        DataSource(name="ok", path=str(tmp_path / "corpus" / "b.txt")),
        DataSource(name="x", path="nope"),
    ]
    with pytest.raises(DataError, match=r"data.sources\[1\] \('x'\): file nope does not exist"):
        check_sources(cfg)


# ----------------------------------------------------------------------------- WET


def wet_record(url: str | None, payload: bytes) -> bytes:
    headers = ["WARC/1.0", "WARC-Type: conversion", "WARC-Record-ID: <urn:uuid:0>"]
    if url is not None:
        headers.append(f"WARC-Target-URI: {url}")
    headers += ["Content-Type: text/plain", f"Content-Length: {len(payload)}"]
    return ("\r\n".join(headers) + "\r\n\r\n").encode() + payload + b"\r\n\r\n"


def test_wet_fixture(repo_data: Path) -> None:
    source = DataSource(name="wet", path=str(repo_data / "web/whirlwind.warc.wet.gz"))
    assert source.resolved_format == "wet"
    docs, stats = read(source)
    assert stats.docs == len(docs) == 1 and stats.malformed == 0
    url = "https://an.wikipedia.org/wiki/Escopete"
    assert docs[0].id == url and docs[0].meta == {"source": "wet", "url": url}
    assert docs[0].text.startswith("Escopete - Biquipedia") and len(docs[0].text) > 4000


def test_wet_bad_records_by_offset_and_truncated_copy(repo_data: Path, tmp_path: Path) -> None:
    records = [
        wet_record("https://a.example/", "première page".encode()),
        wet_record("https://b.example/", b"broken \xff text"),
        wet_record(None, b"no url"),
        wet_record("https://d.example/", b"last page"),
    ]
    path = tmp_path / "x.wet"
    path.write_bytes(b"".join(records))
    docs, stats = read(DataSource(name="w", path=str(path)))
    assert [(d.id, d.text) for d in docs] == [
        ("https://a.example/", "première page"),
        ("https://d.example/", "last page"),
    ]
    second, third = len(records[0]), len(records[0]) + len(records[1])
    assert stats.messages == [
        f"{path}:byte {second}: invalid UTF-8 in WET text (invalid start byte at byte 7)",
        f"{path}:byte {third}: record has no WARC-Target-URI",
    ]
    assert stats.malformed_by_reason == {"invalid_utf8": 1, "missing_url": 1}

    data = (repo_data / "web/whirlwind.warc.wet.gz").read_bytes()
    cut = tmp_path / "cut.wet.gz"
    cut.write_bytes(data[: len(data) // 2])
    docs, stats = read(DataSource(name="c", path=str(cut)))
    assert docs == [] and stats.malformed_by_reason == {"truncated_or_corrupt": 1}
    assert stats.messages[0].startswith(f"{cut}:byte ")


# ----------------------------------------------------------------------------- shards


def test_shards_close_at_byte_target(tmp_path: Path) -> None:
    docs = [Document(f"d{i}", "é" * 50, {"source": "s"}) for i in range(7)]  # 100 bytes each
    paths = write_shards(docs, tmp_path, shard_docs=1000, shard_bytes=250)
    # a shard closes on the document that takes it past the target: 300, 300, 100 bytes
    counts = [len(gzip.decompress(p.read_bytes()).splitlines()) for p in paths]
    assert counts == [3, 3, 1]
    assert list(read_shards(tmp_path)) == docs
    paths = write_shards(docs, tmp_path, shard_docs=1000, shard_bytes=100)
    assert len(paths) == 7 and len(list(tmp_path.iterdir())) == 7


@pytest.mark.parametrize("shard_bytes", [0, 300])
def test_parquet_shards_round_trip(tmp_path: Path, shard_bytes: int) -> None:
    docs = [
        Document(
            f"d{i}", f"text {i} ünïcode " * 10, {"source": "s" if i % 2 else "t", "n": i, "x": [i]}
        )
        for i in range(9)
    ]
    (tmp_path / "shard-00000.jsonl.gz").write_bytes(b"stale, other format")
    paths = write_shards(
        docs, tmp_path, shard_docs=4, shard_bytes=shard_bytes, shard_format="parquet"
    )
    expected = 3 if shard_bytes == 0 else 5  # 4+4+1 docs, or 2 docs (340 bytes) a shard
    assert [p.name for p in paths] == [f"shard-{i:05d}.parquet" for i in range(expected)]
    assert sorted(tmp_path.iterdir()) == paths
    assert list(read_shards(tmp_path)) == docs
    table = pq.read_table(paths[0])
    assert table.column_names == ["id", "text", "meta"]
    assert json.loads(table.column("meta")[1].as_py()) == {"source": "s", "n": 1, "x": [1]}


def test_failed_stream_leaves_no_partial_shard(tmp_path: Path) -> None:
    def docs() -> Iterator[Document]:
        yield Document("a", "text", {})
        raise RuntimeError("upstream step failed")

    for fmt in ("jsonl", "parquet"):
        with pytest.raises(RuntimeError):
            write_shards(docs(), tmp_path, 10, shard_format=fmt)
        assert list(tmp_path.iterdir()) == []


def test_compressed_txt_and_its_truncation(tmp_path: Path) -> None:
    text = "".join(f"line {i} " + "word " * 20 + "\n" for i in range(5000))
    path = tmp_path / "t.txt.zst"
    path.write_bytes(zstandard.ZstdCompressor().compress(text.encode()))
    docs, stats = read(DataSource(name="t", path=str(path)))
    assert [d.text for d in docs] == [text] and stats.malformed == 0
    blob = gzip.compress(text.encode())
    cut = tmp_path / "cut.txt.gz"
    cut.write_bytes(blob[: len(blob) // 2])
    docs, stats = read(DataSource(name="t", path=str(cut)))
    kept = docs[0].text
    assert 0 < len(kept) < len(text) and text.startswith(kept)
    assert stats.messages == [
        f"{cut}:{kept.count(chr(10)) + 1}: truncated or corrupt compressed data (EOFError: "
        "Compressed file ended before the end-of-stream marker was reached); rest of file skipped"
    ]
