"""Readers: raw sources (files, folders, globs) -> a stream of `Document`s.

Formats: JSONL (plain, .gz, .zst), Parquet, plain text, WARC (HTML pages, main text extracted
with trafilatura in worker processes) and WET (text already extracted by Common Crawl).

Readers stream: a source is never loaded whole except a `txt` file (it must be cut by a regex).
Malformed input never stops a run: every bad line, row or record is counted on the source's
`SourceStats` under a short reason, with a message naming file and line (JSONL), row (Parquet)
or byte offset (WARC/WET), and skipped. A truncated or corrupt compressed stream ends its file
there; the documents before the break are kept.

Document ids: the record's `id_field` when set, the page URL for WARC/WET, otherwise
`<source>/<n>` (JSONL line, Parquet row, txt piece), with the file's path relative to the folder
or glob root in between for multi-file sources (`<source>/<relative path>/<n>`); a whole txt file
of a folder is `<source>/<relative path>`.
"""

from __future__ import annotations

import glob
import gzip
import io
import json
import re
import string
import zlib
from collections import deque
from collections.abc import Callable, Generator, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import zstandard

from frontierlm.config import DataSource, format_of, known_suffixes
from frontierlm.data.documents import DataError, Document, SourceStats

# Extraction work is shipped to worker processes in small chunks: small enough that one slow
# page (python-docs' 2.5 MB contents.html takes seconds) does not hold many others hostage,
# large enough that pickling and scheduling stay negligible next to ~10 ms per page.
_CHUNK_PAGES = 4
_CHUNK_BYTES = 1 << 20
_CHUNKS_IN_FLIGHT_PER_WORKER = 4
# Parquet rows converted to Python at a time: bounded memory whatever the row-group size.
_PARQUET_BATCH_ROWS = 1024

_Docs = Generator[Document, None, None]


@dataclass(frozen=True)
class SourceFile:
    """One file of a source, with what its reader needs to name and place what it reads."""

    path: Path
    format: str
    size: int
    # Path relative to the folder or glob root; None for a single-file source, whose ids and
    # messages keep their original, shorter form.
    rel: str | None = None
    # Bytes of the source's earlier files, so progress runs over the whole source.
    offset: int = 0

    def doc_id(self, source: DataSource, n: int | str) -> str:
        return f"{source.name}/{n}" if self.rel is None else f"{source.name}/{self.rel}/{n}"


# ----------------------------------------------------------------------------- resolving paths

_GLOB_CHARS = re.compile(r"[*?[]")


def _is_hidden(rel: Path) -> bool:
    # Editor and OS droppings (.DS_Store, .~lock) and our own temp files are no documents.
    return any(part.startswith(".") for part in rel.parts)


def _source_files(source: DataSource) -> list[SourceFile]:
    """The files of `source` in reading order; DataError (without the source prefix) when there
    are none or an auto-format folder holds a file whose suffix names no format."""
    path = Path(source.path)
    # An existing file wins over glob syntax: "[draft] notes.txt" is a file name.
    if path.is_file():
        return [SourceFile(path, source.resolved_format, path.stat().st_size)]
    if _GLOB_CHARS.search(source.path):
        # The root is the pattern's fixed leading folders; ids are relative to it.
        fixed = []
        for part in path.parts:
            if _GLOB_CHARS.search(part):
                break
            fixed.append(part)
        root = Path(*fixed) if fixed else Path(".")
        found = [Path(p) for p in glob.glob(source.path, recursive=True)]
        found = [p for p in found if p.is_file()]
        if not found:
            raise DataError(
                f"glob pattern {source.path} matches no files (relative patterns are resolved "
                f"from the current directory {Path.cwd()})"
            )
        kind = "glob pattern"
    elif path.is_dir():
        root = path
        found = [p for p in path.rglob("*") if p.is_file() and not _is_hidden(p.relative_to(path))]
        if not found:
            raise DataError(f"folder {source.path} holds no files")
        kind = "folder"
    else:
        raise DataError(
            f"file {source.path} does not exist (relative paths are resolved from the current "
            f"directory {Path.cwd()}); fix the path in the recipe or run from the project root"
        )
    rels = sorted((p.relative_to(root).as_posix(), p) for p in found)
    files = []
    unknown = []
    offset = 0
    for rel, p in rels:
        fmt = source.format if source.format != "auto" else format_of(p.name)
        if fmt is None:
            unknown.append(str(p))
            continue
        size = p.stat().st_size
        files.append(SourceFile(p, fmt, size, rel, offset))
        offset += size
    if unknown:
        more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
        shown = ", ".join(unknown[:5]) + more
        raise DataError(
            f"{kind} {source.path}: cannot tell the format of {shown} from the suffix; known "
            f"suffixes: {known_suffixes()}. Remove such files, narrow path to a glob, or set "
            "format to read every file in one format"
        )
    return files


def resolve_sources(sources: Iterable[DataSource]) -> list[list[SourceFile]]:
    """Each source's files; raise DataError naming every source that cannot be read, before
    any work starts."""
    problems = []
    resolved = []
    for i, source in enumerate(sources):
        try:
            resolved.append(_source_files(source))
        except DataError as err:
            problems.append(f"data.sources[{i}] ({source.name!r}): {err}")
    if problems:
        raise DataError("\n".join(problems))
    return resolved


def check_sources(sources: Iterable[DataSource]) -> None:
    """Raise DataError naming every source that cannot be read."""
    resolve_sources(sources)


# ----------------------------------------------------------------------------- dispatch


def read_source(source: DataSource, stats: SourceStats, workers: int = 1) -> Iterator[Document]:
    """Stream the documents of one source, counting them (and anything malformed) on `stats`.

    Raises DataError immediately (not on first iteration) when the source cannot be opened.
    `workers` is the number of HTML extraction processes for WARC files.
    """
    files = resolve_sources([source])[0]
    stats.bytes_total = sum(f.size for f in files)
    return _counted(_read_files(source, files, stats, workers), stats, source.max_docs)


def read_files(
    source: DataSource, files: list[SourceFile], stats: SourceStats, workers: int = 1
) -> Iterator[Document]:
    """Like `read_source`, over some of the source's files (one task of an executor)."""
    stats.bytes_total = sum(f.size for f in files)
    return _counted(_read_files(source, files, stats, workers), stats, source.max_docs)


def _read_files(
    source: DataSource, files: list[SourceFile], stats: SourceStats, workers: int
) -> _Docs:
    for file in files:
        stats.files += 1
        if file.format == "warc":
            yield from _read_warc(source, file, stats, workers)
        else:
            yield from _READERS[file.format](source, file, stats)
    stats.bytes_read = stats.bytes_total


def _counted(docs: _Docs, stats: SourceStats, limit: int | None) -> Iterator[Document]:
    try:
        for doc in docs:
            stats.docs += 1
            yield doc
            if limit is not None and stats.docs >= limit:
                break
    finally:
        # Closing now (not at garbage collection) stops a WARC reader's worker pool promptly.
        docs.close()


# ----------------------------------------------------------------------------- compression


class _ZstdRaw(io.RawIOBase):
    """zstd-decompressed bytes that raise EOFError when the input ends inside a frame.

    zstandard's own stream_reader returns a short read there, silently, so a cut-off file
    would look complete. Concatenated frames (pzstd, appended files) are read across.
    """

    def __init__(self, raw: IO[bytes]) -> None:
        self._raw = raw
        self._dctx = zstandard.ZstdDecompressor()
        self._obj = self._dctx.decompressobj()
        self._buf = b""
        self._pos = 0
        self._in_frame = False

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        while self._pos >= len(self._buf):
            chunk = self._raw.read(1 << 16)
            if not chunk:
                if self._in_frame:
                    raise EOFError("zstd stream ends inside a frame")
                return 0
            self._buf, self._pos = self._decompress(chunk), 0
        n = min(len(b), len(self._buf) - self._pos)
        b[:n] = self._buf[self._pos : self._pos + n]
        self._pos += n
        return n

    def _decompress(self, chunk: bytes) -> bytes:
        out = []
        while chunk:
            out.append(self._obj.decompress(chunk))
            self._in_frame = not self._obj.eof
            chunk = b""
            if self._obj.eof:
                chunk = self._obj.unused_data
                self._obj = self._dctx.decompressobj()
        return b"".join(out)


def _open_stream(raw: IO[bytes], path: Path) -> IO[bytes]:
    suffix = path.suffix.lower()
    if suffix == ".gz":
        return gzip.GzipFile(fileobj=raw, mode="rb")
    if suffix == ".zst":
        # The raw stream has no readline; BufferedReader adds line iteration.
        return io.BufferedReader(_ZstdRaw(raw), buffer_size=1 << 16)
    return raw


# gzip raises EOFError for a truncated file, BadGzipFile (OSError) or zlib.error for corrupt
# bytes; _ZstdRaw raises EOFError, zstandard ZstdError for corrupt frames.
_COMPRESSION_ERRORS = (EOFError, OSError, zlib.error, zstandard.ZstdError)


# ----------------------------------------------------------------------------- JSONL, Parquet


def _read_jsonl(source: DataSource, file: SourceFile, stats: SourceStats) -> _Docs:
    line_no = 0
    with open(file.path, "rb") as raw, _open_stream(raw, file.path) as stream:
        try:
            for line_no, line in enumerate(stream, 1):
                doc = _jsonl_doc(source, file, line, line_no, stats)
                stats.bytes_read = file.offset + raw.tell()
                if doc is not None:
                    yield doc
        except _COMPRESSION_ERRORS as err:
            # Nothing after the break can be decoded, so the file ends here.
            stats.bad(
                f"{file.path}:{line_no + 1}",
                f"truncated or corrupt compressed data ({type(err).__name__}: {err}); "
                "rest of file skipped",
                reason="truncated_or_corrupt",
            )


def _jsonl_doc(
    source: DataSource, file: SourceFile, line: bytes, line_no: int, stats: SourceStats
) -> Document | None:
    if not line.strip():
        return None
    where = f"{file.path}:{line_no}"
    try:
        record = json.loads(line.rstrip(b"\r\n").decode("utf-8"))
    except UnicodeDecodeError as err:
        stats.bad(where, f"invalid UTF-8 ({err.reason} at column {err.start + 1})", "invalid_utf8")
        return None
    except json.JSONDecodeError as err:
        stats.bad(where, f"invalid JSON ({err.msg} at column {err.colno})", "invalid_json")
        return None
    if not isinstance(record, dict):
        stats.bad(where, f"not a JSON object (got {type(record).__name__})", "not_an_object")
        return None
    return _record_doc(source, record, where, file.doc_id(source, line_no), stats)


def _record_doc(
    source: DataSource, record: dict[str, Any], where: str, default_id: str, stats: SourceStats
) -> Document | None:
    """A JSONL object or Parquet row as a Document (text by field or template), or None after
    counting why it cannot be one."""
    if source.text_template is not None:
        try:
            text = source.text_template.format(**record)
        except KeyError as err:
            stats.bad(
                where,
                f"text_template needs field {err.args[0]!r}, missing in record",
                "missing_text",
            )
            return None
        except (IndexError, ValueError, AttributeError, TypeError) as err:
            stats.bad(where, f"text_template cannot be applied ({err})", "missing_text")
            return None
    else:
        text = record.get(source.text_field)
        if isinstance(text, bytes):
            # Parquet binary columns (a writer that did not mark the column as UTF-8 text).
            try:
                text = text.decode("utf-8")
            except UnicodeDecodeError as err:
                stats.bad(
                    where,
                    f"invalid UTF-8 in field {source.text_field!r} ({err.reason} at byte "
                    f"{err.start})",
                    "invalid_utf8",
                )
                return None
        if not isinstance(text, str):
            problem = "missing" if text is None else f"a {type(text).__name__}, not a string"
            stats.bad(where, f"text field {source.text_field!r} is {problem}", "missing_text")
            return None
    if source.id_field is None:
        doc_id = default_id
    else:
        raw_id = record.get(source.id_field)
        if raw_id is None:
            stats.bad(where, f"id field {source.id_field!r} is missing", "missing_id")
            return None
        doc_id = str(raw_id)
    return Document(doc_id, text, {"source": source.name})


def _record_fields(source: DataSource) -> set[str]:
    """The top-level fields a record must provide, so Parquet reads only those columns."""
    if source.text_template is None:
        fields = {source.text_field}
    else:
        fields = set()
        for _, name, _, _ in string.Formatter().parse(source.text_template):
            # "{a.b}" and "{a[0]}" need column a.
            if name:
                fields.add(re.split(r"[.\[]", name, maxsplit=1)[0])
    if source.id_field is not None:
        fields.add(source.id_field)
    return fields


def _read_parquet(source: DataSource, file: SourceFile, stats: SourceStats) -> _Docs:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(file.path)
    except (OSError, pa.ArrowException) as err:
        # A cut-off Parquet file loses its footer, and with it every row group's location.
        stats.bad(
            str(file.path),
            f"not a readable Parquet file ({type(err).__name__}: {err})",
            "truncated_or_corrupt",
        )
        return
    wanted = _record_fields(source)
    columns = [name for name in parquet.schema_arrow.names if name in wanted]
    rows = max(parquet.metadata.num_rows, 1)
    row = 0
    try:
        with parquet:
            for batch in parquet.iter_batches(batch_size=_PARQUET_BATCH_ROWS, columns=columns):
                # No wanted column at all: every row is a record missing its fields.
                records = batch.to_pylist() if columns else [{}] * batch.num_rows
                for record in records:
                    where = f"{file.path}:row {row}"
                    doc = _record_doc(source, record, where, file.doc_id(source, row), stats)
                    row += 1
                    if doc is not None:
                        yield doc
                stats.bytes_read = file.offset + file.size * row // rows
    except (OSError, pa.ArrowException, UnicodeDecodeError) as err:
        stats.bad(
            f"{file.path}:row {row}",
            f"unreadable Parquet data ({type(err).__name__}: {err}); rest of file skipped",
            "truncated_or_corrupt",
        )


# ----------------------------------------------------------------------------- plain text


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
                f"{display}:{line_no}",
                f"invalid UTF-8 ({err.reason} at column {err.start + 1})",
                "invalid_utf8",
            )
    return "\n".join(good)


def _read_bytes(file: SourceFile, stats: SourceStats) -> bytes:
    """The whole (decompressed) file; a truncated or corrupt stream keeps what came before."""
    chunks: list[bytes] = []
    with open(file.path, "rb") as raw, _open_stream(raw, file.path) as stream:
        try:
            # read1: a short read per decompressed block, so a break loses only the block
            # it happens in, not a whole large read's worth.
            while chunk := stream.read1(1 << 16):  # type: ignore[attr-defined]
                chunks.append(chunk)
        except _COMPRESSION_ERRORS as err:
            line = sum(c.count(b"\n") for c in chunks) + 1
            stats.bad(
                f"{file.path}:{line}",
                f"truncated or corrupt compressed data ({type(err).__name__}: {err}); "
                "rest of file skipped",
                reason="truncated_or_corrupt",
            )
    return b"".join(chunks)


def _read_txt(source: DataSource, file: SourceFile, stats: SourceStats) -> _Docs:
    text = _decode_text(_read_bytes(file, stats), str(file.path), stats)
    if not text:
        return
    if file.rel is not None and source.split_pattern is None:
        # A folder of text files: each file is one document, named by its path.
        stats.bytes_read = file.offset + file.size
        yield Document(f"{source.name}/{file.rel}", text, {"source": source.name})
        return
    spans = _grouped_spans(text, source.split_pattern, source.group_chars)
    for index, (start, end) in enumerate(spans):
        stats.bytes_read = file.offset + file.size * end // len(text)
        yield Document(file.doc_id(source, index), text[start:end], {"source": source.name})


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


# ----------------------------------------------------------------------------- WARC, WET


@dataclass
class _Page:
    url: str
    offset: int
    payload: bytes | str  # raw HTML bytes (response) or already extracted text (WET conversion)


def _read_wet(source: DataSource, file: SourceFile, stats: SourceStats) -> _Docs:
    """WET `conversion` records: text already extracted, so no worker pool is needed."""
    for page in _warc_pages(source, file, stats, ("conversion",)):
        assert isinstance(page.payload, str)
        yield Document(page.url, page.payload, {"source": source.name, "url": page.url})


def _read_warc(source: DataSource, file: SourceFile, stats: SourceStats, workers: int) -> _Docs:
    """Pages in file order; HTML extraction runs in `workers` processes, a bounded window of
    chunks in flight so memory stays flat and output order stays the file's order."""
    import trafilatura  # noqa: F401  imported before forking so workers inherit it loaded

    pool = ProcessPoolExecutor(max_workers=workers)
    pending: deque[tuple[list[_Page], Future[list[tuple[str, str | None]]]]] = deque()
    try:
        chunk: list[_Page] = []
        chunk_bytes = 0
        for page in _warc_pages(source, file, stats, ("response", "conversion")):
            chunk.append(page)
            chunk_bytes += len(page.payload)
            if len(chunk) >= _CHUNK_PAGES or chunk_bytes >= _CHUNK_BYTES:
                pending.append((chunk, pool.submit(_extract_chunk, [p.payload for p in chunk])))
                chunk, chunk_bytes = [], 0
                if len(pending) >= workers * _CHUNKS_IN_FLIGHT_PER_WORKER:
                    yield from _finish_chunk(*pending.popleft(), source, file, stats)
        if chunk:
            pending.append((chunk, pool.submit(_extract_chunk, [p.payload for p in chunk])))
        while pending:
            yield from _finish_chunk(*pending.popleft(), source, file, stats)
    finally:
        # Also reached when the consumer stops early (max_docs): queued chunks are cancelled,
        # only the ones already running are waited for.
        pool.shutdown(wait=True, cancel_futures=True)


def _finish_chunk(
    pages: list[_Page],
    future: Future[list[tuple[str, str | None]]],
    source: DataSource,
    file: SourceFile,
    stats: SourceStats,
) -> Iterator[Document]:
    for page, (text, error) in zip(pages, future.result(), strict=True):
        if error is not None:
            stats.bad(f"{file.path}:byte {page.offset}", error, "extraction_failed")
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


def _warc_pages(
    source: DataSource, file: SourceFile, stats: SourceStats, kinds: tuple[str, ...]
) -> Iterator[_Page]:
    from warcio.archiveiterator import ArchiveIterator

    with open(file.path, "rb") as fh:
        records = ArchiveIterator(fh)
        offset = 0
        try:
            for record in records:
                # Not get_record_offset(): it reads the record to its end, losing the payload.
                offset = records.offset
                stats.bytes_read = file.offset + fh.tell()
                if record.rec_type not in kinds:
                    continue
                where = f"{file.path}:byte {offset}"
                if record.rec_type == "response" and not _is_html(record):
                    stats.skipped_non_html += 1
                    continue
                url = record.rec_headers.get_header("WARC-Target-URI")
                try:
                    payload = record.content_stream().read()
                # Any decoding failure inside one record (chunked, gzip) spoils that record only.
                except Exception as err:
                    stats.bad(
                        where,
                        f"unreadable record payload ({type(err).__name__}: {err})",
                        "truncated_or_corrupt",
                    )
                    continue
                # warcio does not raise on a cut-off or corrupt gzip member: the record just
                # comes back short (and later records may be lost), so check the declared length.
                missing = record.raw_stream.limit
                if missing > 0:
                    stats.bad(
                        where,
                        f"truncated or corrupt record ({missing} of {record.length} declared "
                        "bytes missing; records after it may be lost)",
                        "truncated_or_corrupt",
                    )
                    continue
                if not url:
                    stats.bad(where, "record has no WARC-Target-URI", "missing_url")
                    continue
                if record.rec_type == "conversion":
                    try:
                        payload = payload.decode("utf-8")
                    except UnicodeDecodeError as err:
                        stats.bad(
                            where,
                            f"invalid UTF-8 in WET text ({err.reason} at byte {err.start})",
                            "invalid_utf8",
                        )
                        continue
                yield _Page(url, offset, payload)
        # warcio's errors on non-WARC bytes vary (ArchiveLoadFailed, ValueError, ...).
        except Exception as err:
            stats.bad(
                f"{file.path}:byte {offset}",
                f"unreadable WARC data ({type(err).__name__}: {err}); rest of file skipped",
                "truncated_or_corrupt",
            )


_READERS: dict[str, Callable[[DataSource, SourceFile, SourceStats], _Docs]] = {
    "jsonl": _read_jsonl,
    "parquet": _read_parquet,
    "txt": _read_txt,
    "wet": _read_wet,
}
