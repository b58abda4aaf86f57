"""Documents, what reading a source counts, and the curated shards the data stage writes.

The readers that turn raw sources into documents live in `readers.py`.

Shards: `shard-00000.jsonl.gz`, ... (one JSON object `{"id", "text", "meta"}` a line) or
`shard-00000.parquet` (string columns `id`, `text` and `meta`, the last JSON-encoded because
each step adds its own keys and sources differ in theirs, which a fixed Parquet struct cannot
hold). A shard closes after `shard_docs` documents, or once its text reaches `shard_bytes`.
"""

from __future__ import annotations

import gzip
import json
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, BinaryIO

from frontierlm.atomic import atomic_file

MAX_MESSAGES = 100
SHARD_SUFFIXES = {"jsonl": ".jsonl.gz", "parquet": ".parquet"}
# A Parquet row group is buffered in memory before it is written: this bounds it.
_PARQUET_GROUP_DOCS = 1000
_PARQUET_GROUP_BYTES = 64 << 20


class DataError(ValueError):
    """A data source that cannot be read at all (missing file, no files, unknown format)."""


@dataclass
class Document:
    id: str
    text: str
    meta: dict[str, Any] = field(default_factory=dict)

    @cached_property
    def words(self) -> list[str]:
        """Whitespace words, split once and shared by every filter (str.split runs at ~150 MB/s,
        a linguistic tokenizer at <1 MB/s). Not a field: never written to shards."""
        return self.text.split()

    @cached_property
    def tokens(self) -> list[str]:
        """Words with punctuation split off as its own tokens, as datatrove's web filters count
        them (frontierlm/data/text.py); split once and shared by the Gopher/FineWeb filters."""
        from frontierlm.data.text import word_tokens

        return word_tokens(self.text)


@dataclass
class SourceStats:
    """What reading one source produced; readers update it while they stream."""

    name: str
    docs: int = 0
    files: int = 0
    malformed: int = 0
    # Short, stable keys (invalid_json, invalid_utf8, missing_text, truncated_or_corrupt, ...)
    # so a report can say what kind of damage a source has without parsing messages.
    malformed_by_reason: Counter[str] = field(default_factory=Counter)
    skipped_non_html: int = 0
    bytes_total: int = 0
    bytes_read: int = 0
    messages: list[str] = field(default_factory=list)

    def merge(self, other: SourceStats) -> None:
        """Add the counts of another part of the same source (another file, another task)."""
        for name in ("docs", "files", "malformed", "skipped_non_html", "bytes_total", "bytes_read"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.malformed_by_reason.update(other.malformed_by_reason)
        self.messages.extend(other.messages[: MAX_MESSAGES - len(self.messages)])

    def bad(self, where: str, problem: str, reason: str = "other") -> None:
        """Count one malformed record at `where` (file:line, file:row N, file:byte N) under
        `reason`; the message keeps the detail."""
        self.malformed += 1
        self.malformed_by_reason[reason] += 1
        if len(self.messages) < MAX_MESSAGES:
            self.messages.append(f"{where}: {problem}")


# ----------------------------------------------------------------------------- shards


class JsonlShard:
    """Gzipped JSONL documents written to an open binary file (a shard, or a task's output)."""

    def __init__(self, f: BinaryIO, level: int = 6) -> None:
        # mtime=0 and no embedded file name: identical documents give identical bytes.
        self._gz = gzip.GzipFile("", "wb", level, f, mtime=0)

    def add(self, doc: Document) -> None:
        record = {"id": doc.id, "text": doc.text, "meta": doc.meta}
        self._gz.write(json.dumps(record, ensure_ascii=False).encode("utf-8") + b"\n")

    def close(self) -> None:
        self._gz.close()


class _ParquetShard:
    def __init__(self, f: BinaryIO) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        self._schema = pa.schema([(name, pa.string()) for name in ("id", "text", "meta")])
        self._writer = pq.ParquetWriter(f, self._schema, compression="zstd")
        self._rows: dict[str, list[str]] = {"id": [], "text": [], "meta": []}
        self._bytes = 0

    def add(self, doc: Document) -> None:
        self._rows["id"].append(doc.id)
        self._rows["text"].append(doc.text)
        self._rows["meta"].append(json.dumps(doc.meta, ensure_ascii=False))
        self._bytes += len(doc.text)
        if len(self._rows["id"]) >= _PARQUET_GROUP_DOCS or self._bytes >= _PARQUET_GROUP_BYTES:
            self._flush()

    def _flush(self) -> None:
        import pyarrow as pa

        if self._rows["id"]:
            self._writer.write_table(pa.Table.from_pydict(self._rows, schema=self._schema))
        self._rows = {"id": [], "text": [], "meta": []}
        self._bytes = 0

    def close(self) -> None:
        self._flush()
        self._writer.close()


def write_shards(
    docs: Iterable[Document],
    out_dir: Path,
    shard_docs: int,
    *,
    shard_bytes: int = 0,
    shard_format: str = "jsonl",
) -> list[Path]:
    """Write `shard-00000<suffix>`, ... and return their paths.

    A shard closes after `shard_docs` documents, or, when `shard_bytes` > 0, once the UTF-8
    bytes of its texts reach `shard_bytes` (so shards are about that size whatever the
    documents' lengths). Each shard appears complete or not at all (temp file + rename).
    Shards left in `out_dir` by an earlier run (larger, or in the other format) are removed so
    `read_shards` sees exactly this run's output.
    """
    out_dir = Path(out_dir)
    suffix = SHARD_SUFFIXES[shard_format]
    shard_class = _ParquetShard if shard_format == "parquet" else JsonlShard
    paths: list[Path] = []
    it = iter(docs)
    doc = next(it, None)
    while doc is not None:
        path = out_dir / f"shard-{len(paths):05d}{suffix}"
        # A failing upstream step leaves no half shard behind (atomic_file).
        with atomic_file(path) as f:
            shard = shard_class(f)
            n_docs = n_bytes = 0
            try:
                while doc is not None:
                    shard.add(doc)
                    n_docs += 1
                    n_bytes += len(doc.text.encode("utf-8")) if shard_bytes else 0
                    doc = next(it, None)
                    if (n_bytes >= shard_bytes) if shard_bytes else (n_docs >= shard_docs):
                        break
            finally:
                # Also on failure: a writer left open would write into the closed file
                # when garbage collected.
                shard.close()
        paths.append(path)
    for stale in set(shard_paths(out_dir)) - set(paths):
        stale.unlink()
    return paths


def shard_paths(directory: Path) -> list[Path]:
    """The shards in `directory` (either format), in order."""
    directory = Path(directory)
    found = [p for s in SHARD_SUFFIXES.values() for p in directory.glob(f"shard-*{s}")]
    return sorted(found, key=lambda p: p.name)


def read_shards(directory: Path) -> Iterator[Document]:
    """Documents from the shards in `directory`, in shard order then line (row) order."""
    for path in shard_paths(directory):
        yield from read_shard(path)


def read_shard(path: Path) -> Iterator[Document]:
    """The documents of one shard written by `write_shards`, in order."""
    if path.name.endswith(SHARD_SUFFIXES["parquet"]):
        yield from _read_parquet_shard(path)
        return
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            record = json.loads(line)
            yield Document(record["id"], record["text"], record["meta"])


def _read_parquet_shard(path: Path) -> Iterator[Document]:
    import pyarrow.parquet as pq

    with pq.ParquetFile(path) as parquet:
        for batch in parquet.iter_batches(batch_size=1024, columns=["id", "text", "meta"]):
            columns = batch.to_pydict()
            for doc_id, text, meta in zip(
                columns["id"], columns["text"], columns["meta"], strict=True
            ):
                yield Document(doc_id, text, json.loads(meta))
