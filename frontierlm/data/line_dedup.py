"""Line- or paragraph-level dedup across documents (datatrove's line dedup, Dolma's paragraphs).

Boilerplate (cookie banners, navigation menus, footers) repeats across pages of a crawl while
the pages themselves differ, so document-level dedup keeps it. This step removes, from every
document, the lines (or paragraphs: text between blank lines) whose normalised text already
appeared in an EARLIER document of the stream; the first document keeps its copy. A span
repeated only within one document is kept: that is the document's own structure (a refrain,
a table), not boilerplate, and the Gopher repetition filter judges it. Only spans whose
normalised text has at least `min_chars` characters count, so "Home" or "}" stay everywhere.
A document left with nothing but whitespace is dropped (reason `line_dedup_empty`).

Memory: pass 1 hashes each qualifying span's normalised text to 64 bits and writes, per chunk
of `spill_docs` documents, the documents (JSONL) and the chunk's distinct (hash, document index)
pairs sorted by hash. `finish()` merges the chunks one hash range at a time (about
`merge_entries` pairs in memory at once), finds each hash's first document and marks, per
chunk, the pairs whose document comes later. Pass 2 replays the documents chunk by chunk with
only that chunk's marked pairs in memory. Two distinct spans share a 64-bit hash with
probability ~2^-64 per pair: negligible even for billions of distinct lines.
"""

from __future__ import annotations

import itertools
import json
import math
import re
import shutil
import tempfile
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import xxhash

from frontierlm.data.dedup import normalize
from frontierlm.data.documents import Document
from frontierlm.data.pipeline import TwoPassStep

LINE_DEDUP_MODES = ("line", "paragraph")
# The separators are captured, so re.split returns [span, sep, span, sep, ..., span] and
# joining the pieces gives the text back unchanged. A paragraph separator is a run of
# whitespace holding at least two newlines (one blank line or more, spaces on it allowed).
_SEPARATORS = {"line": re.compile(r"(\n)"), "paragraph": re.compile(r"(\n\s*\n)")}
# A fixed xxhash seed: the hashes only need to agree within one run, but a fixed one keeps
# scratch files and any debugging output reproducible.
_SEED = 0x6C696E65


class LineDedup(TwoPassStep):
    """Remove lines (`mode="line"`) or paragraphs (`mode="paragraph"`) seen in an earlier
    document; see the module docstring.

    Counts `lines_removed` (or `paragraphs_removed`), plus the base class's `rewritten` and
    `chars_removed`; a rewritten document gets `meta["line_dedup_removed"]`, the number of
    spans removed from it. `in_memory=True` keeps everything in RAM (a reference for tests,
    faster for small corpora); otherwise documents and hashes spill to a fresh subdirectory of
    `work_dir` (the system temp dir when None), removed when the step closes. The result does
    not depend on either choice nor on `spill_docs`.
    """

    name = "line_dedup"

    def __init__(
        self,
        mode: str = "line",
        min_chars: int = 30,
        work_dir: Path | None = None,
        in_memory: bool = False,
        spill_docs: int = 2000,
        merge_entries: int = 1 << 22,
    ) -> None:
        if mode not in LINE_DEDUP_MODES:
            raise ValueError(f"line dedup mode must be one of {LINE_DEDUP_MODES}, got {mode!r}")
        if min_chars < 1 or spill_docs < 1 or merge_entries < 1:
            raise ValueError("line dedup min_chars, spill_docs and merge_entries must be >= 1")
        self.mode = mode
        self.min_chars = min_chars
        self.work_dir = work_dir
        self.in_memory = in_memory
        self.spill_docs = spill_docs
        self.merge_entries = merge_entries
        self._count_name = f"{mode}s_removed"
        self._separator = _SEPARATORS[mode]
        self._reset()

    def _reset(self) -> None:
        self._scratch: Path | None = None
        self._count = 0
        # The chunk being filled: documents, and per document its distinct span hashes.
        self._docs: list[Document] = []
        self._hashes: list[np.ndarray] = []
        self._chunk_starts: list[int] = []
        # In memory only: every chunk's sorted (hash, index) arrays and documents.
        self._mem_chunks: list[tuple[np.ndarray, np.ndarray]] = []
        self._mem_docs: list[list[Document]] = []
        # Per chunk, after finish(): True where the pair's document is not the hash's first.
        self._later: list[np.ndarray] = []
        # Pass 2: the current chunk's {document index: hashes to remove from it}.
        self._remove: dict[int, set[int]] = {}
        self._emptied = -1  # index of the last document revise() left without text

    def spans(self, text: str) -> list[str]:
        """[span, separator, span, ..., span]: the pieces that join back to `text`."""
        return self._separator.split(text)

    def span_hash(self, span: str) -> int | None:
        """The span's 64-bit hash, or None when it is too short to count."""
        norm = normalize(span)
        if len(norm) < self.min_chars:
            return None
        return xxhash.xxh3_64_intdigest(norm.encode("utf-8"), _SEED)

    # ---------------------------------------------------------------- pass 1

    def observe(self, index: int, doc: Document) -> None:
        if index == 0:  # a step object run a second time starts from nothing
            self.close()
            self._reset()
        pieces = self.spans(doc.text)
        hashes = {h for h in map(self.span_hash, pieces[::2]) if h is not None}
        self._docs.append(doc)
        self._hashes.append(np.fromiter(hashes, dtype=np.uint64, count=len(hashes)))
        self._count = index + 1
        if len(self._docs) >= self.spill_docs:
            self._end_chunk()

    def _end_chunk(self) -> None:
        """Close the chunk being filled: its pairs sorted by hash (then index), in memory or on
        disk with its documents."""
        if not self._docs:
            return
        start = self._count - len(self._docs)
        idx = np.repeat(
            np.arange(start, self._count, dtype=np.int64), [len(h) for h in self._hashes]
        )
        keys = np.concatenate(self._hashes) if self._hashes else np.empty(0, dtype=np.uint64)
        order = np.lexsort((idx, keys))
        keys, idx = keys[order], idx[order]
        chunk = len(self._chunk_starts)
        self._chunk_starts.append(start)
        if self.in_memory:
            self._mem_chunks.append((keys, idx))
            self._mem_docs.append(self._docs)
        else:
            stem = self._chunk_stem(chunk, create=True)
            with open(stem.with_suffix(".jsonl"), "w", encoding="utf-8") as f:
                for doc in self._docs:
                    record = {"id": doc.id, "text": doc.text, "meta": doc.meta}
                    f.write(json.dumps(record, ensure_ascii=False) + "\n")
            np.save(stem.with_suffix(".keys.npy"), keys)
            np.save(stem.with_suffix(".idx.npy"), idx)
        self._docs, self._hashes = [], []

    def _chunk_stem(self, chunk: int, create: bool = False) -> Path:
        if self._scratch is None:
            if not create:
                raise RuntimeError("LineDedup has no scratch directory: no chunk was spilled")
            if self.work_dir is not None:
                Path(self.work_dir).mkdir(parents=True, exist_ok=True)
            self._scratch = Path(tempfile.mkdtemp(prefix="linededup-", dir=self.work_dir))
        return self._scratch / f"chunk-{chunk:06d}"

    def _chunk_pairs(self, chunk: int) -> tuple[np.ndarray, np.ndarray]:
        """(sorted hashes, their document indices) of one chunk; memory maps when spilled."""
        if self.in_memory:
            return self._mem_chunks[chunk]
        stem = self._chunk_stem(chunk)
        return (
            np.load(stem.with_suffix(".keys.npy"), mmap_mode="r"),
            np.load(stem.with_suffix(".idx.npy"), mmap_mode="r"),
        )

    # ---------------------------------------------------------------- between the passes

    def finish(self) -> None:
        self._end_chunk()
        chunks = [self._chunk_pairs(c) for c in range(len(self._chunk_starts))]
        self._later = [np.zeros(len(keys), dtype=bool) for keys, _ in chunks]
        total = sum(len(keys) for keys, _ in chunks)
        # Cut the 64-bit hash space into equal ranges of ~merge_entries pairs (hashes are
        # uniform) and cut each range out of every chunk by bisection: a hash's pairs from all
        # chunks meet in one range, so its first document is found there.
        ranges = max(1, math.ceil(total / self.merge_entries))
        bounds = [(r << 64) // ranges for r in range(ranges + 1)]
        for lo, hi in itertools.pairwise(bounds):
            cuts, part_k, part_i = [], [], []
            for keys, idx in chunks:
                a = int(np.searchsorted(keys, np.uint64(lo)))
                # The last bound, 2^64, is past every uint64 (and not one itself).
                b = len(keys) if hi == 1 << 64 else int(np.searchsorted(keys, np.uint64(hi)))
                cuts.append((a, b))
                part_k.append(np.asarray(keys[a:b]))
                part_i.append(np.asarray(idx[a:b]))
            if not any(len(k) for k in part_k):
                continue
            k, i = np.concatenate(part_k), np.concatenate(part_i)
            uniq, inverse = np.unique(k, return_inverse=True)
            first = np.full(len(uniq), np.iinfo(np.int64).max, dtype=np.int64)
            np.minimum.at(first, inverse, i)
            later = i > first[inverse]
            offset = 0
            for mask, (a, b) in zip(self._later, cuts, strict=True):
                mask[a:b] = later[offset : offset + b - a]
                offset += b - a

    # ---------------------------------------------------------------- pass 2

    def replay(self) -> Iterator[tuple[int, Document]]:
        for c, start in enumerate(self._chunk_starts):
            keys, idx = self._chunk_pairs(c)
            later = self._later[c]
            remove: dict[int, set[int]] = defaultdict(set)
            for h, i in zip(
                np.asarray(keys[later]).tolist(), np.asarray(idx[later]).tolist(), strict=True
            ):
                remove[i].add(h)
            self._remove = remove
            for offset, doc in enumerate(self._chunk_docs(c)):
                yield start + offset, doc
        self._remove = {}

    def _chunk_docs(self, chunk: int) -> Iterator[Document]:
        if self.in_memory:
            yield from self._mem_docs[chunk]
            return
        with open(self._chunk_stem(chunk).with_suffix(".jsonl"), encoding="utf-8") as f:
            for line in f:
                record = json.loads(line)
                yield Document(record["id"], record["text"], record["meta"])

    def revise(self, index: int, doc: Document, counts: Counter[str]) -> str | None:
        remove = self._remove.get(index)
        if not remove:
            return None
        pieces = self.spans(doc.text)
        kept: list[int] = []  # positions in `pieces` of the spans kept
        for pos in range(0, len(pieces), 2):
            if self.span_hash(pieces[pos]) not in remove:
                kept.append(pos)
        removed = len(pieces) // 2 + 1 - len(kept)
        counts[self._count_name] += removed
        doc.meta["line_dedup_removed"] = removed
        # Between two kept spans goes the separator that preceded the later one, so what is
        # removed takes its preceding separator along (the first kept span its following one).
        out = [pieces[kept[0]]] if kept else []
        for pos in kept[1:]:
            out.append(pieces[pos - 1])
            out.append(pieces[pos])
        text = "".join(out)
        if not text.strip():
            self._emptied = index
        return text

    def decide(self, index: int, doc: Document) -> str | None:
        # Only a document this step emptied: one that came in empty is another step's business.
        return "line_dedup_empty" if index == self._emptied else None

    def close(self) -> None:
        if self._scratch is not None:
            shutil.rmtree(self._scratch, ignore_errors=True)
        # Forget the run too, so a later run over an empty stream finds no stale chunks.
        self._reset()
