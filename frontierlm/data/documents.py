"""Documents, the readers that turn raw sources into them, and the shard writer/reader.

Readers stream: a source is never loaded whole except a `txt` file (it must be cut by a regex).
Malformed input never stops a run: every bad line or record is counted on the source's
`SourceStats` with a message naming file and line (or WARC byte offset), and skipped.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import re
import zlib
from collections import deque
from collections.abc import Generator, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import IO, Any

from frontierlm.config import DataSource

MAX_MESSAGES = 100
SHARD_GLOB = "shard-*.jsonl.gz"

# Extraction work is shipped to worker processes in small chunks: small enough that one slow
# page (python-docs' 2.5 MB contents.html takes seconds) does not hold many others hostage,
# large enough that pickling and scheduling stay negligible next to ~10 ms per page.
_CHUNK_PAGES = 4
_CHUNK_BYTES = 1 << 20
_CHUNKS_IN_FLIGHT_PER_WORKER = 4


class DataError(ValueError):
    """A data source that cannot be read at all (missing file, unsupported compression)."""


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
    malformed: int = 0
    skipped_non_html: int = 0
    bytes_total: int = 0
    bytes_read: int = 0
    messages: list[str] = field(default_factory=list)

    def bad(self, where: str, problem: str) -> None:
        self.malformed += 1
        if len(self.messages) < MAX_MESSAGES:
            self.messages.append(f"{where}: {problem}")


# ----------------------------------------------------------------------------- checks


def _zstd_available() -> bool:
    try:
        import zstandard  # noqa: F401
    except ImportError:
        return False
    return True


def check_sources(sources: Iterable[DataSource]) -> None:
    """Raise DataError naming every source that cannot be opened, before any work starts."""
    problems = []
    for i, source in enumerate(sources):
        path = Path(source.path)
        if not path.is_file():
            problems.append(
                f"data.sources[{i}] ({source.name!r}): file {source.path} does not exist "
                f"(relative paths are resolved from the current directory {Path.cwd()}); "
                "fix the path in the recipe or run from the project root"
            )
        elif path.suffix.lower() == ".zst" and not _zstd_available():
            problems.append(
                f"data.sources[{i}] ({source.name!r}): {source.path} is zstd-compressed but the "
                "'zstandard' package is not installed; pip install zstandard or decompress it"
            )
    if problems:
        raise DataError("\n".join(problems))


# ----------------------------------------------------------------------------- readers


def read_source(source: DataSource, stats: SourceStats, workers: int = 1) -> Iterator[Document]:
    """Stream the documents of one source, counting them (and anything malformed) on `stats`.

    Raises DataError immediately (not on first iteration) when the file cannot be opened.
    `workers` is the number of HTML extraction processes for WARC sources.
    """
    check_sources([source])
    path = Path(source.path)
    stats.bytes_total = path.stat().st_size
    fmt = source.resolved_format
    if fmt == "warc":
        docs = _read_warc(source, path, stats, workers)
    elif fmt == "jsonl":
        docs = _read_jsonl(source, path, stats)
    else:
        docs = _read_txt(source, path, stats)
    return _counted(docs, stats, source.max_docs)


def _counted(
    docs: Generator[Document, None, None], stats: SourceStats, limit: int | None
) -> Iterator[Document]:
    try:
        for doc in docs:
            stats.docs += 1
            yield doc
            if limit is not None and stats.docs >= limit:
                break
    finally:
        # Closing now (not at garbage collection) stops a WARC reader's worker pool promptly.
        docs.close()


def _open_stream(raw: IO[bytes], path: Path) -> IO[bytes]:
    suffix = path.suffix.lower()
    if suffix == ".gz":
        return gzip.GzipFile(fileobj=raw, mode="rb")
    if suffix == ".zst":
        import zstandard

        # The zstd reader has no readline; BufferedReader adds line iteration.
        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw))
    return raw


def _read_jsonl(
    source: DataSource, path: Path, stats: SourceStats
) -> Generator[Document, None, None]:
    line_no = 0
    with open(path, "rb") as raw, _open_stream(raw, path) as stream:
        try:
            for line_no, line in enumerate(stream, 1):
                doc = _jsonl_doc(source, line, f"{source.path}:{line_no}", line_no, stats)
                stats.bytes_read = raw.tell()
                if doc is not None:
                    yield doc
        except (EOFError, OSError, zlib.error) as err:
            # gzip raises EOFError for a truncated file, BadGzipFile (OSError) or zlib.error
            # for corrupt bytes; nothing after that point can be decoded, so the file ends here.
            stats.bad(
                f"{source.path}:{line_no + 1}", f"truncated or corrupt compressed data ({err})"
            )
    stats.bytes_read = stats.bytes_total


def _jsonl_doc(
    source: DataSource, line: bytes, where: str, line_no: int, stats: SourceStats
) -> Document | None:
    if not line.strip():
        return None
    try:
        record = json.loads(line.rstrip(b"\r\n").decode("utf-8"))
    except UnicodeDecodeError as err:
        stats.bad(where, f"invalid UTF-8 ({err.reason} at column {err.start + 1})")
        return None
    except json.JSONDecodeError as err:
        stats.bad(where, f"invalid JSON ({err.msg} at column {err.colno})")
        return None
    if not isinstance(record, dict):
        stats.bad(where, f"not a JSON object (got {type(record).__name__})")
        return None
    if source.text_template is not None:
        try:
            text = source.text_template.format(**record)
        except KeyError as err:
            stats.bad(where, f"text_template needs field {err.args[0]!r}, missing in record")
            return None
        except (IndexError, ValueError) as err:
            stats.bad(where, f"text_template cannot be applied ({err})")
            return None
    else:
        text = record.get(source.text_field)
        if not isinstance(text, str):
            problem = "missing" if text is None else f"a {type(text).__name__}, not a string"
            stats.bad(where, f"text field {source.text_field!r} is {problem}")
            return None
    if source.id_field is None:
        doc_id = f"{source.name}/{line_no}"
    else:
        raw_id = record.get(source.id_field)
        if raw_id is None:
            stats.bad(where, f"id field {source.id_field!r} is missing")
            return None
        doc_id = str(raw_id)
    return Document(doc_id, text, {"source": source.name})


def _decode_text(data: bytes, display: str, stats: SourceStats) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        pass
    # Slow path only for broken files: drop the undecodable lines, keep and report the rest.
    good = []
    for line_no, line in enumerate(data.split(b"\n"), 1):
        try:
            good.append(line.decode("utf-8"))
        except UnicodeDecodeError as err:
            stats.bad(
                f"{display}:{line_no}", f"invalid UTF-8 ({err.reason} at column {err.start + 1})"
            )
    return "\n".join(good)


def _read_txt(
    source: DataSource, path: Path, stats: SourceStats
) -> Generator[Document, None, None]:
    text = _decode_text(path.read_bytes(), source.path, stats)
    if not text:
        return
    spans = _grouped_spans(text, source.split_pattern, source.group_chars)
    for index, (start, end) in enumerate(spans):
        stats.bytes_read = stats.bytes_total * end // len(text)
        yield Document(f"{source.name}/{index}", text[start:end], {"source": source.name})


def _grouped_spans(text: str, pattern: str | None, group_chars: int) -> Iterator[tuple[int, int]]:
    """Spans of `text` between matches of `pattern`, merged until each reaches `group_chars`.

    A merged document is the original text from its first to its last piece, separators
    between them included, so grouping never alters the text. Blank pieces are not documents.
    """
    cuts = [m.span() for m in re.finditer(pattern, text)] if pattern else []
    bounds = [0] + [c for span in cuts for c in span] + [len(text)]
    group_start: int | None = None
    group_end = 0
    for start, end in zip(bounds[::2], bounds[1::2], strict=True):
        if not text[start:end].strip():
            continue
        if group_start is None:
            group_start = start
        group_end = end
        if group_end - group_start >= group_chars:
            yield group_start, group_end
            group_start = None
    if group_start is not None:
        yield group_start, group_end


@dataclass
class _Page:
    url: str
    offset: int
    payload: bytes | str  # raw HTML bytes (response) or already extracted text (WET conversion)


def _read_warc(
    source: DataSource, path: Path, stats: SourceStats, workers: int
) -> Generator[Document, None, None]:
    """Pages in file order; HTML extraction runs in `workers` processes, a bounded window of
    chunks in flight so memory stays flat and output order stays the file's order."""
    import trafilatura  # noqa: F401  imported before forking so workers inherit it loaded

    pool = ProcessPoolExecutor(max_workers=workers)
    pending: deque[tuple[list[_Page], Future[list[tuple[str, str | None]]]]] = deque()
    try:
        chunk: list[_Page] = []
        chunk_bytes = 0
        for page in _warc_pages(source, path, stats):
            chunk.append(page)
            chunk_bytes += len(page.payload)
            if len(chunk) >= _CHUNK_PAGES or chunk_bytes >= _CHUNK_BYTES:
                pending.append((chunk, pool.submit(_extract_chunk, [p.payload for p in chunk])))
                chunk, chunk_bytes = [], 0
                if len(pending) >= workers * _CHUNKS_IN_FLIGHT_PER_WORKER:
                    yield from _finish_chunk(*pending.popleft(), source, stats)
        if chunk:
            pending.append((chunk, pool.submit(_extract_chunk, [p.payload for p in chunk])))
        while pending:
            yield from _finish_chunk(*pending.popleft(), source, stats)
    finally:
        # Also reached when the consumer stops early (max_docs): queued chunks are cancelled,
        # only the ones already running are waited for.
        pool.shutdown(wait=True, cancel_futures=True)


def _finish_chunk(
    pages: list[_Page],
    future: Future[list[tuple[str, str | None]]],
    source: DataSource,
    stats: SourceStats,
) -> Iterator[Document]:
    for page, (text, error) in zip(pages, future.result(), strict=True):
        if error is not None:
            stats.bad(f"{source.path}:byte {page.offset}", error)
            continue
        yield Document(page.url, text, {"source": source.name, "url": page.url})


def _extract_chunk(payloads: list[bytes | str]) -> list[tuple[str, str | None]]:
    """Worker side: (text, error) per page. Empty text when trafilatura finds no main content,
    so the empty filter counts such pages instead of them vanishing."""
    from trafilatura import extract

    out: list[tuple[str, str | None]] = []
    for payload in payloads:
        if isinstance(payload, str):
            out.append((payload, None))
            continue
        try:
            # FineWeb's settings, plus fast=True (no readability/justext fallback: ~25% faster;
            # on the python-docs sample the fallback turned index and contents pages, i.e. link
            # lists, into text) and deduplicate=False: trafilatura's dedup cache is per process,
            # so with a pool the output would depend on which worker saw which page first;
            # ExactDedup handles duplicates deterministically.
            text = extract(
                payload,
                favor_precision=True,
                include_comments=False,
                fast=True,
                deduplicate=False,
            )
        # One hostile page must not lose the whole chunk.
        except Exception as err:
            out.append(("", f"HTML extraction failed ({type(err).__name__}: {err})"))
            continue
        out.append((text or "", None))
    return out


def _is_html(record: Any) -> bool:
    mime = record.rec_headers.get_header("WARC-Identified-Payload-Type")
    if mime is None and record.http_headers is not None:
        mime = record.http_headers.get_header("Content-Type")
    # No declared type at all: let trafilatura decide rather than lose a page.
    return mime is None or "html" in mime.lower()


def _warc_pages(source: DataSource, path: Path, stats: SourceStats) -> Iterator[_Page]:
    from warcio.archiveiterator import ArchiveIterator

    with open(path, "rb") as fh:
        records = ArchiveIterator(fh)
        offset = 0
        try:
            for record in records:
                # Not get_record_offset(): it reads the record to its end, losing the payload.
                offset = records.offset
                stats.bytes_read = fh.tell()
                if record.rec_type not in ("response", "conversion"):
                    continue
                where = f"{source.path}:byte {offset}"
                if record.rec_type == "response" and not _is_html(record):
                    stats.skipped_non_html += 1
                    continue
                url = record.rec_headers.get_header("WARC-Target-URI")
                try:
                    payload = record.content_stream().read()
                # Any decoding failure inside one record (chunked, gzip) spoils that record only.
                except Exception as err:
                    stats.bad(where, f"unreadable record payload ({type(err).__name__}: {err})")
                    continue
                # warcio does not raise on a cut-off or corrupt gzip member: the record just
                # comes back short (and later records may be lost), so check the declared length.
                missing = record.raw_stream.limit
                if missing > 0:
                    stats.bad(
                        where,
                        f"truncated or corrupt record ({missing} of {record.length} declared "
                        "bytes missing; records after it may be lost)",
                    )
                    continue
                if not url:
                    stats.bad(where, "record has no WARC-Target-URI")
                    continue
                if record.rec_type == "conversion":
                    try:
                        payload = payload.decode("utf-8")
                    except UnicodeDecodeError as err:
                        stats.bad(where, f"invalid UTF-8 in WET text ({err.reason})")
                        continue
                yield _Page(url, offset, payload)
        # warcio's errors on non-WARC bytes vary (ArchiveLoadFailed, ValueError, ...).
        except Exception as err:
            stats.bad(
                f"{source.path}:byte {offset}",
                f"unreadable WARC data ({type(err).__name__}: {err}); rest of file skipped",
            )
    stats.bytes_read = stats.bytes_total


# ----------------------------------------------------------------------------- shards


def write_shards(docs: Iterable[Document], out_dir: Path, shard_docs: int) -> list[Path]:
    """Write `shard-00000.jsonl.gz`, ... with `shard_docs` documents each; return their paths.

    Each shard appears complete or not at all (temp file + rename). Shards left in `out_dir`
    by an earlier, larger run are removed so `read_shards` sees exactly this run's output.
    """
    out_dir = Path(out_dir)
    it = iter(docs)
    paths: list[Path] = []
    while batch := [doc for _, doc in zip(range(shard_docs), it, strict=False)]:
        path = out_dir / f"shard-{len(paths):05d}.jsonl.gz"
        tmp = path.with_name(f".{path.name}.tmp")
        # mtime=0 and no embedded file name: identical documents give identical bytes.
        with open(tmp, "wb") as f, gzip.GzipFile("", "wb", 6, f, mtime=0) as gz:
            for doc in batch:
                record = {"id": doc.id, "text": doc.text, "meta": doc.meta}
                gz.write(json.dumps(record, ensure_ascii=False).encode("utf-8") + b"\n")
        os.replace(tmp, path)
        paths.append(path)
    for stale in set(out_dir.glob(SHARD_GLOB)) - set(paths):
        stale.unlink()
    return paths


def read_shards(directory: Path) -> Iterator[Document]:
    """Documents from the shards in `directory`, in shard order then line order."""
    for path in sorted(Path(directory).glob(SHARD_GLOB)):
        with gzip.open(path, "rt", encoding="utf-8") as f:
            for line in f:
                record = json.loads(line)
                yield Document(record["id"], record["text"], record["meta"])
