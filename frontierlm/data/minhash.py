"""Fuzzy deduplication: MinHash signatures over word n-gram shingles, LSH bands, union-find.

Semantics follow FineWeb / datatrove: shingles are word 5-grams of the normalised text (the
same `normalize` as exact dedup), 112 hash functions as 14 bands x 8 rows, 64-bit values. Two
documents whose signatures agree on every row of any band share that band's bucket and are
duplicates; duplicates are clustered transitively (union-find) and each cluster keeps its first
document in stream order. With 14 x 8 the chance that a pair of Jaccard similarity s collides
is 1 - (1 - s^8)^14: 0.57 at s = 0.7, 0.92 at 0.8, 0.9996 at 0.9.

Memory: documents, signatures and per-band sorted bucket keys go to scratch files on disk in
chunks of `spill_docs`; buckets are found by merging the sorted chunks one key range at a time
(about `merge_entries` keys in memory at once). Only the union-find parent array (8 bytes per
document) lives in memory for the whole corpus.
"""

from __future__ import annotations

import bisect
import json
import math
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import xxhash

from frontierlm.data.dedup import normalize
from frontierlm.data.documents import Document
from frontierlm.data.pipeline import TwoPassStep

U64 = np.uint64
MAX_U64 = np.iinfo(np.uint64).max
# splitmix64's finalizer constants: a bijection on 64-bit words whose every output bit depends
# on every input bit, so xor-ing a per-function seed in before it gives independent-looking
# permutations (a plain a*x+b mod 2^64 has weak low bits, and min-hashing reads all of them).
_MIX1 = U64(0xBF58476D1CE4E5B9)
_MIX2 = U64(0x94D049BB133111EB)
# Odd multiplier (2^64 / golden ratio) for the polynomial that folds n word hashes into one
# shingle hash: odd, so each word position changes the result bijectively.
_FOLD = U64(0x9E3779B97F4A7C15)
# Shingles are hashed against all permutations this many at a time: bounds the (chunk, perms)
# temporary at 8 MiB for 112 permutations however long the document is.
_SHINGLE_CHUNK = 8192


def mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finalizer, in place on a uint64 array (wrapping arithmetic is intended)."""
    x ^= x >> U64(30)
    x *= _MIX1
    x ^= x >> U64(27)
    x *= _MIX2
    x ^= x >> U64(31)
    return x


class MinHasher:
    """Signatures and band keys; deterministic for a given (bands, rows, ngram, seed)."""

    def __init__(self, bands: int = 14, rows: int = 8, ngram: int = 5, seed: int = 1) -> None:
        if bands < 1 or rows < 1 or ngram < 1:
            raise ValueError(
                f"MinHash needs bands, rows and ngram >= 1 (got bands={bands}, rows={rows}, "
                f"ngram={ngram})"
            )
        self.bands, self.rows, self.ngram, self.seed = bands, rows, ngram, seed
        self.num_perm = bands * rows
        rng = np.random.Generator(np.random.PCG64(seed))
        self._perm_seeds = rng.integers(
            0, MAX_U64, size=self.num_perm, dtype=np.uint64, endpoint=True
        )
        self._band_seeds = rng.integers(0, MAX_U64, size=bands, dtype=np.uint64, endpoint=True)
        # xxhash takes a 64-bit seed; derive it from the same generator so one seed fixes all.
        self._word_seed = int(rng.integers(0, 1 << 63))

    def shingles(self, text: str) -> np.ndarray:
        """Distinct 64-bit hashes of the word n-grams of `normalize(text)`.

        A document shorter than n words is one shingle of all its words (an empty document is
        the shingle of no words), so short texts still match their exact copies.
        """
        # Encode once and split the bytes: normalize leaves single spaces as the only
        # whitespace, so this cuts exactly where str.split would, without a per-word encode.
        words = normalize(text).encode("utf-8").split()
        seed = self._word_seed
        h = np.fromiter(
            (xxhash.xxh3_64_intdigest(w, seed) for w in words), dtype=np.uint64, count=len(words)
        )
        n = min(self.ngram, len(h))
        count = len(h) - n + 1
        # Polynomial fold over the n-word window, vectorised over every window at once.
        acc = np.full(count, U64(len(words) if n < self.ngram else self.ngram), dtype=np.uint64)
        for k in range(n):
            acc *= _FOLD
            acc += h[k : k + count]
        return np.unique(mix64(acc))

    def signature(self, shingles: np.ndarray) -> np.ndarray:
        """(num_perm,) uint64: per hash function, the minimum over the shingles."""
        sig = np.full(self.num_perm, MAX_U64, dtype=np.uint64)
        for start in range(0, len(shingles), _SHINGLE_CHUNK):
            block = shingles[start : start + _SHINGLE_CHUNK, None] ^ self._perm_seeds[None, :]
            np.minimum(sig, mix64(block).min(axis=0), out=sig)
        return sig

    def band_keys(self, signatures: np.ndarray) -> np.ndarray:
        """(docs, bands) uint64 bucket keys from (docs, num_perm) signatures.

        A key is a 64-bit hash of a band's rows: equal bands give equal keys; unequal bands
        collide with probability ~2^-64 per pair and band, negligible next to MinHash's own
        error even for billions of documents.
        """
        sigs = signatures.reshape(len(signatures), self.bands, self.rows)
        keys = np.broadcast_to(self._band_seeds, (len(signatures), self.bands)).copy()
        for r in range(self.rows):
            keys ^= sigs[:, :, r]
            mix64(keys)
        return keys

    def signature_of(self, text: str) -> np.ndarray:
        return self.signature(self.shingles(text))


class UnionFind:
    """Union-find over document indices whose root is always the set's smallest index, so the
    representative of a cluster is its first document in stream order."""

    def __init__(self, n: int) -> None:
        self.parent = np.arange(n, dtype=np.int64)

    def find(self, i: int) -> int:
        parent = self.parent
        root = i
        while parent[root] != root:
            root = int(parent[root])
        while parent[i] != root:  # path compression
            parent[i], i = root, int(parent[i])
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            lo, hi = (ra, rb) if ra < rb else (rb, ra)
            self.parent[hi] = lo

    def roots(self) -> np.ndarray:
        """Every index's root, vectorised: pointer jumping until nothing changes (parents only
        ever point to smaller indices, so this converges in O(log depth) rounds)."""
        parent = self.parent
        while True:
            grand = parent[parent]
            if np.array_equal(grand, parent):
                return parent.copy()
            parent[:] = grand


def bucket_groups(keys: np.ndarray, idx: np.ndarray) -> list[np.ndarray]:
    """The buckets holding two or more documents, each as its ascending document indices, in
    ascending key order. `keys`, `idx`: one band's keys and document indices, in any order."""
    order = np.lexsort((idx, keys))
    k, i = keys[order], idx[order]
    if len(k) < 2:
        return []
    starts = np.flatnonzero(np.concatenate(([True], k[1:] != k[:-1])))
    ends = np.append(starts[1:], len(k))
    big = ends - starts >= 2
    return [i[a:b] for a, b in zip(starts[big].tolist(), ends[big].tolist(), strict=True)]


VERIFY_MODES = ("none", "signature", "exact")
# With verification, each document of a bucket is checked against at most this many earlier
# bucket members (those already in its cluster are skipped unchecked). Bounds the work of a
# bucket full of false candidates (templated pages) at the cost of possibly missing a true
# pair deep inside it; the true pair usually meets again in another band.
MAX_CHECKS_PER_DOC = 64


class MinHashDedup(TwoPassStep):
    """Drop near-duplicates (reason `near_duplicate`), keeping each cluster's first document.

    Every document in a cluster of two or more gets `meta["minhash_cluster"]`: the stream index
    of the cluster's kept representative (the same for all of them, and independent of how the
    stream was cut into shards).

    `verify` decides what a bucket collision means (the default, "exact", is also
    `DataConfig.minhash_verify`'s). "none" (datatrove/FineWeb): every collision
    joins the two documents, so pairs below the S-curve's knee join too (57% of pairs at
    Jaccard 0.7 with 14 x 8). "signature": the two signatures must also agree on >= `threshold`
    of their values (an estimate of Jaccard with ~0.04 standard error at 112 functions).
    "exact": the exact Jaccard similarity of the two shingle sets must be >= `threshold`; LSH
    is then only the index that finds candidates, and costs 8 bytes per shingle of scratch disk.

    `in_memory=True` keeps documents, signatures and shingles in RAM: a reference for tests,
    and faster for small corpora. The default spills them to `work_dir` in chunks of
    `spill_docs` (a fresh subdirectory, removed when the step closes; the system temp dir
    when None). The clustering does not depend on either choice.
    """

    name = "minhash"

    def __init__(
        self,
        bands: int = 14,
        rows: int = 8,
        ngram: int = 5,
        seed: int = 1,
        verify: str = "exact",
        threshold: float = 0.8,
        work_dir: Path | None = None,
        in_memory: bool = False,
        spill_docs: int = 2000,
        merge_entries: int = 1 << 22,
    ) -> None:
        if verify not in VERIFY_MODES:
            raise ValueError(f"MinHash verify must be one of {VERIFY_MODES}, got {verify!r}")
        if not 0.0 < threshold <= 1.0:
            raise ValueError(f"MinHash threshold must be in (0, 1], got {threshold}")
        if spill_docs < 1 or merge_entries < 1:
            raise ValueError("MinHash spill_docs and merge_entries must be >= 1")
        self.hasher = MinHasher(bands, rows, ngram, seed)
        self.verify = verify
        self.threshold = threshold
        self.work_dir = work_dir
        self.in_memory = in_memory
        self.spill_docs = spill_docs
        self.merge_entries = merge_entries
        self.checks = 0  # verifications run, for the benchmark
        self._reset()

    def _reset(self) -> None:
        self._scratch: Path | None = None
        self._docs: list[Document] = []
        self._sigs: list[np.ndarray] = []
        self._shingles: list[np.ndarray] = []
        self._chunk_starts: list[int] = []
        self._count = 0
        self.checks = 0
        self.cluster_root: np.ndarray = np.empty(0, dtype=np.int64)
        self._cluster_size: np.ndarray = np.empty(0, dtype=np.int64)
        # Per chunk (on disk: memory maps): signatures, shingle arrays and their offsets.
        self._sig_store: list[np.ndarray] = []
        self._shingle_store: list[tuple[np.ndarray, np.ndarray]] = []

    # ---------------------------------------------------------------- pass 1

    def observe(self, index: int, doc: Document) -> None:
        if index == 0:  # a step object run a second time starts from nothing
            self.close()
            self._reset()
        shingles = self.hasher.shingles(doc.text)
        self._docs.append(doc)
        self._sigs.append(self.hasher.signature(shingles))
        if self.verify == "exact":
            self._shingles.append(shingles)
        self._count = index + 1
        if not self.in_memory and len(self._docs) >= self.spill_docs:
            self._spill()

    def _spill(self) -> None:
        """Write the buffered documents, signatures, shingles and per-band sorted bucket keys
        (with their document indices) as the next chunk."""
        if not self._docs:
            return
        if self._scratch is None:
            if self.work_dir is not None:
                Path(self.work_dir).mkdir(parents=True, exist_ok=True)
            self._scratch = Path(tempfile.mkdtemp(prefix="minhash-", dir=self.work_dir))
        start = self._count - len(self._docs)
        stem = self._chunk_stem(len(self._chunk_starts))
        self._chunk_starts.append(start)
        with open(stem.with_suffix(".jsonl"), "w", encoding="utf-8") as f:
            for doc in self._docs:
                record = {"id": doc.id, "text": doc.text, "meta": doc.meta}
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
        sigs = np.stack(self._sigs)
        np.save(stem.with_suffix(".sig.npy"), sigs)
        if self.verify == "exact":
            np.save(stem.with_suffix(".shingles.npy"), np.concatenate(self._shingles))
            np.save(stem.with_suffix(".offsets.npy"), _offsets(self._shingles))
        keys = self.hasher.band_keys(sigs).T  # (bands, docs)
        idx = np.arange(start, start + len(sigs), dtype=np.int64)
        # Sorted by key per band (stable: equal keys stay in index order), so finish() can cut
        # any key range out of every chunk by bisection.
        order = np.argsort(keys, axis=1, kind="stable")
        np.save(stem.with_suffix(".keys.npy"), np.take_along_axis(keys, order, axis=1))
        np.save(stem.with_suffix(".idx.npy"), idx[order])
        self._docs, self._sigs, self._shingles = [], [], []

    def _chunk_stem(self, chunk: int) -> Path:
        if self._scratch is None:
            raise RuntimeError("MinHashDedup has no scratch directory: no chunk was spilled")
        return self._scratch / f"chunk-{chunk:06d}"

    # ---------------------------------------------------------------- between the passes

    def finish(self) -> None:
        uf = UnionFind(self._count)
        if self.in_memory:
            self._chunk_starts = [0]
            sigs = np.stack(self._sigs) if self._sigs else np.empty((0, self.hasher.num_perm))
            self._sig_store = [sigs.astype(np.uint64)]
            if self.verify == "exact":
                flat = np.concatenate(self._shingles) if self._shingles else np.empty(0)
                self._shingle_store = [(flat.astype(np.uint64), _offsets(self._shingles))]
            keys = self.hasher.band_keys(self._sig_store[0])
            for band in range(self.hasher.bands):
                idx = np.arange(self._count, dtype=np.int64)
                self._join_buckets(uf, bucket_groups(keys[:, band], idx))
        else:
            self._spill()
            self._union_on_disk(uf)
        self.cluster_root = uf.roots()
        self._cluster_size = np.bincount(self.cluster_root, minlength=self._count)
        self._sig_store, self._shingle_store = [], []

    def _union_on_disk(self, uf: UnionFind) -> None:
        if not self._chunk_starts:  # an empty stream: nothing was spilled
            return
        stems = [self._chunk_stem(c) for c in range(len(self._chunk_starts))]
        self._sig_store = [np.load(s.with_suffix(".sig.npy"), mmap_mode="r") for s in stems]
        if self.verify == "exact":
            self._shingle_store = [
                (
                    np.load(s.with_suffix(".shingles.npy"), mmap_mode="r"),
                    np.load(s.with_suffix(".offsets.npy")),
                )
                for s in stems
            ]
        keys = [np.load(s.with_suffix(".keys.npy"), mmap_mode="r") for s in stems]
        idx = [np.load(s.with_suffix(".idx.npy"), mmap_mode="r") for s in stems]
        # Cut the 64-bit key space into equal ranges of ~merge_entries keys each (keys are
        # uniform hashes) and handle them in ascending order: each range is cut out of every
        # chunk by bisection and sorted in memory. Ascending key order over the whole band is
        # what the in-memory path does too, so both take the same union steps.
        ranges = max(1, math.ceil(self._count / self.merge_entries))
        bounds = [(r << 64) // ranges for r in range(ranges)]
        for band in range(self.hasher.bands):
            for r, lo in enumerate(bounds):
                part_k, part_i = [], []
                for ck, ci in zip(keys, idx, strict=True):
                    col = ck[band]
                    a = int(np.searchsorted(col, U64(lo)))
                    b = int(np.searchsorted(col, U64(bounds[r + 1]))) if r + 1 < ranges else None
                    part_k.append(np.asarray(col[a:b]))
                    part_i.append(np.asarray(ci[band, a:b]))
                groups = bucket_groups(np.concatenate(part_k), np.concatenate(part_i))
                self._join_buckets(uf, groups)

    def _join_buckets(self, uf: UnionFind, groups: list[np.ndarray]) -> None:
        for members in groups:
            ids = members.tolist()
            if self.verify == "none":
                for other in ids[1:]:
                    uf.union(ids[0], other)
                continue
            # Each document against earlier members, skipping those already in its cluster:
            # the result is the connected components of all verified pairs met, whatever the
            # order, as long as no document hits the MAX_CHECKS_PER_DOC cap.
            for pos in range(1, len(ids)):
                doc = ids[pos]
                for prev in ids[max(0, pos - MAX_CHECKS_PER_DOC) : pos]:
                    if uf.find(prev) != uf.find(doc) and self._similar(prev, doc):
                        uf.union(prev, doc)

    def _similar(self, i: int, j: int) -> bool:
        self.checks += 1
        if self.verify == "signature":
            return float(np.mean(self._row_sig(i) == self._row_sig(j))) >= self.threshold
        a, b = self._row_shingles(i), self._row_shingles(j)
        return jaccard(a, b) >= self.threshold

    def _chunk_of(self, index: int) -> tuple[int, int]:
        chunk = bisect.bisect_right(self._chunk_starts, index) - 1
        return chunk, index - self._chunk_starts[chunk]

    def _row_sig(self, index: int) -> np.ndarray:
        chunk, local = self._chunk_of(index)
        return np.asarray(self._sig_store[chunk][local])

    def _row_shingles(self, index: int) -> np.ndarray:
        chunk, local = self._chunk_of(index)
        flat, offsets = self._shingle_store[chunk]
        return np.asarray(flat[offsets[local] : offsets[local + 1]])

    # ---------------------------------------------------------------- pass 2

    def replay(self) -> Iterator[tuple[int, Document]]:
        if self.in_memory:
            yield from enumerate(self._docs)
            return
        for c, start in enumerate(self._chunk_starts):
            path = self._chunk_stem(c).with_suffix(".jsonl")
            with open(path, encoding="utf-8") as f:
                for offset, line in enumerate(f):
                    record = json.loads(line)
                    yield start + offset, Document(record["id"], record["text"], record["meta"])

    def decide(self, index: int, doc: Document) -> str | None:
        root = int(self.cluster_root[index])
        if self._cluster_size[root] > 1:
            doc.meta["minhash_cluster"] = root
        return None if root == index else "near_duplicate"

    def close(self) -> None:
        self._sig_store, self._shingle_store = [], []  # drop memory maps before deleting
        if self._scratch is not None:
            shutil.rmtree(self._scratch, ignore_errors=True)
        self._scratch = None
        self._docs, self._sigs, self._shingles = [], [], []


def _offsets(arrays: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(([0], np.cumsum([len(a) for a in arrays]))).astype(np.int64)


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """Exact Jaccard similarity of two sorted, duplicate-free uint64 arrays."""
    if len(a) > len(b):
        a, b = b, a
    if len(a) == 0:
        return 1.0 if len(b) == 0 else 0.0
    pos = np.searchsorted(b, a)
    inter = int(np.count_nonzero(b[np.minimum(pos, len(b) - 1)] == a))
    return inter / (len(a) + len(b) - inter)


# ----------------------------------------------------------------------------- measurement


def candidate_pairs(
    hasher: MinHasher, signatures: np.ndarray, threshold: float | None = None
) -> set[tuple[int, int]]:
    """Every pair (i < j) of rows sharing a band bucket (and, with `threshold`, agreeing on at
    least that share of signature values): the pairs MinHash calls duplicates, before the
    transitive closure. In memory and quadratic in bucket size: for measuring, not for a
    corpus."""
    pairs: set[tuple[int, int]] = set()
    keys = hasher.band_keys(signatures)
    for band in range(hasher.bands):
        buckets: dict[int, list[int]] = {}
        for i, key in enumerate(keys[:, band].tolist()):
            buckets.setdefault(key, []).append(i)
        for members in buckets.values():
            for a, i in enumerate(members):
                for j in members[a + 1 :]:
                    if (i, j) in pairs:
                        continue
                    if threshold is None or np.mean(signatures[i] == signatures[j]) >= threshold:
                        pairs.add((i, j))
    return pairs


def exact_jaccard_pairs(sets: list[np.ndarray], threshold: float) -> dict[tuple[int, int], float]:
    """All pairs (i < j) of shingle sets (sorted unique uint64 arrays, as `MinHasher.shingles`
    returns) whose exact Jaccard similarity is >= `threshold`, with that similarity.

    Exact without comparing all pairs (prefix filtering, Bayardo et al. 2007): if J(x, y) >= t
    then |x & y| >= t |x|, so under any fixed order of shingles (here: by hash value) x and y
    share one of the first |x| - ceil(t |x|) + 1 elements of each set. Only pairs sharing such
    a prefix element are compared, exactly.
    """
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    index: dict[int, list[int]] = {}
    candidates: set[tuple[int, int]] = set()
    for j, s in enumerate(sets):
        prefix = len(s) - math.ceil(threshold * len(s) - 1e-9) + 1
        for token in s[:prefix].tolist():
            seen = index.setdefault(token, [])
            candidates.update((i, j) for i in seen)
            seen.append(j)
    out: dict[tuple[int, int], float] = {}
    for i, j in sorted(candidates):
        jac = jaccard(sets[i], sets[j])
        if jac >= threshold:
            out[i, j] = jac
    return out
