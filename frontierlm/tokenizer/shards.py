"""Token shards: documents encoded into one flat array per split, read back as a memmap.

Layout of `tokens/`:
  train.bin / val.bin    flat uint16 (vocab < 65536) or uint32 token ids; each document is
                         BOS followed by its tokens, so BOS marks every document boundary
  train.idx / val.idx    int64 offsets of each document's first token (its BOS)
  train.src / val.src    uint16 per document, aligned with .idx: the index of its token source in
                         meta.json's "sources" (what multi-stage mixtures sample by); a token
                         source is a data source's `mixture` name, else its own name
  meta.json              dtype, vocab size, token and document counts per split (also per token
                         source), the token source names, the split rule, and per token source
                         the training documents and tokens before and after epochs
Documents are assigned to val by a salted hash of their id, so the split is stable across runs
and independent of file order. Per-source epochs then repeat or subsample the train split only
(`SourcePlan`, `epoch_copies`).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from itertools import chain, islice
from pathlib import Path
from queue import Queue
from threading import Thread
from typing import Any, TypeVar

import numpy as np
import torch
from tokenizers import Tokenizer

from frontierlm.tokenizer.codec import ByteCodec, to_bytes
from frontierlm.tokenizer.train import BOS

SPLIT_SALT = "frontierlm-split-v1"
EPOCH_SALT = "frontierlm-epochs-v1"
UNKNOWN_SOURCE = "?"  # documents given without a source (the tokenizer stage's report says "?" too)
SOURCE_DTYPE = np.dtype(np.uint16)
T = TypeVar("T")


def hash_fraction(key: str, salt: str = SPLIT_SALT) -> float:
    """A uniform number in [0, 1) fixed by `key`: the basis of every held-out split."""
    digest = hashlib.blake2b(f"{salt}:{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64


def batched(items: Iterable[T], n: int) -> Iterator[list[T]]:
    """Lists of `n` consecutive items (the last may be shorter): itertools.batched is 3.12+."""
    it = iter(items)
    while chunk := list(islice(it, n)):
        yield chunk


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


@dataclass
class TokenSplit:
    tokens: np.ndarray  # memmap of token ids
    doc_starts: np.ndarray  # int64 offsets of each document's BOS
    # Per document, an index into `source_names`; None for shards written before sources were
    # recorded (they still train without a mixture).
    doc_sources: np.ndarray | None = None
    source_names: list[str] = field(default_factory=list)

    @classmethod
    def open(cls, directory: Path, split: str) -> TokenSplit:
        meta = json.loads((directory / "meta.json").read_text())
        tokens = np.memmap(directory / f"{split}.bin", dtype=meta["dtype"], mode="r")
        starts = np.fromfile(directory / f"{split}.idx", dtype=np.int64)
        src_path = directory / f"{split}.src"
        if "sources" not in meta or not src_path.is_file():
            return cls(tokens=tokens, doc_starts=starts)
        sources = np.fromfile(src_path, dtype=SOURCE_DTYPE)
        if len(sources) != len(starts):
            raise ValueError(
                f"{src_path} holds {len(sources)} entries for {len(starts)} documents: the token "
                "shards are inconsistent; rerun the tokenize stage with --force"
            )
        return cls(tokens, starts, sources, list(meta["sources"]))

    def __len__(self) -> int:
        return len(self.tokens)

    def source_spans(self, source: int) -> np.ndarray:
        """(n, 2) [start, end) token ranges holding `source`'s documents, in file order, with
        neighbouring documents of the source merged into one range."""
        if self.doc_sources is None:
            raise ValueError("these token shards record no document sources")
        ends = np.append(self.doc_starts[1:], len(self.tokens))
        mine = self.doc_sources == source
        # A range opens where the source starts after another (or at the first document) and
        # closes where it ends before another (or at the last).
        edges = np.diff(np.concatenate([[False], mine, [False]]).astype(np.int8))
        first, last = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1) - 1
        return np.stack([self.doc_starts[first], ends[last]], axis=1).astype(np.int64)

    def target_sources(self, starts: np.ndarray, seq_len: int) -> np.ndarray:
        """(rows, seq_len) int64 token source of each target of the windows cut at `starts`
        (window r predicts tokens starts[r] + 1 ... starts[r] + seq_len): per token, since a
        window may hold the end of one document and the start of the next."""
        if self.doc_sources is None:
            raise ValueError("these token shards record no document sources")
        positions = np.asarray(starts, np.int64)[:, None] + np.arange(1, seq_len + 1)
        docs = np.searchsorted(self.doc_starts, positions, side="right") - 1
        return self.doc_sources[docs].astype(np.int64)

    def source_tokens(self) -> dict[str, int]:
        """Tokens per source, by name (empty without recorded sources)."""
        if self.doc_sources is None:
            return {}
        lengths = np.diff(np.append(self.doc_starts, len(self.tokens)))
        per = np.bincount(self.doc_sources, weights=lengths, minlength=len(self.source_names))
        return {name: int(n) for name, n in zip(self.source_names, per, strict=True)}


def _write_atomic(path: Path, array: np.ndarray) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    array.tofile(tmp)
    os.replace(tmp, path)


@dataclass(frozen=True)
class SourcePlan:
    """How one data-stage input (a `data.sources` name) enters the token shards."""

    token_source: str  # the name its documents are recorded and sampled under
    epochs: float = 1.0  # copies of each training document (fractions pick a seeded subset)


def epoch_copies(doc_ids: list[str], epochs: float, seed: int, key: str) -> np.ndarray:
    """How many times each of one input's training documents enters the training tokens.

    Every document gets floor(epochs) copies; round(frac(epochs) * n) of them get one more,
    those ranking lowest by a hash of (seed, input, id). Ranking by an exact count rather than
    flipping a coin per document makes 0.5 exactly half the documents; hashing ids rather than
    shuffling positions keeps the pick independent of file order."""
    whole = math.floor(epochs)
    copies = np.full(len(doc_ids), whole, dtype=np.int64)
    extra = math.floor((epochs - whole) * len(doc_ids) + 0.5)
    if extra:
        salt = f"{EPOCH_SALT}:{seed}:{key}"
        ranks = np.argsort([hash_fraction(d, salt) for d in doc_ids], kind="stable")
        copies[ranks[:extra]] += 1
    return copies


Doc = tuple[str, str] | tuple[str, str, str]  # (id, text) or (id, text, input source name)
PART_META = ".json"  # a part is done when its metadata exists (written after its tokens)
ENCODE_BATCH_CHARS = 1 << 21  # text per encode_batch call: enough to keep every core busy


@dataclass
class EncodedPart:
    """One shard's documents encoded in file order: `bin` holds each as BOS + its tokens."""

    bin: Path
    ids: list[str]
    sources: list[str]
    tokens: np.ndarray  # int64 tokens per document, BOS included
    bytes: np.ndarray  # int64 UTF-8 bytes per document

    @classmethod
    def open(cls, meta_path: Path) -> EncodedPart:
        meta = json.loads(meta_path.read_text())
        return cls(
            meta_path.with_suffix(".bin"),
            meta["ids"],
            meta["sources"],
            np.asarray(meta["tokens"], dtype=np.int64),
            np.asarray(meta["bytes"], dtype=np.int64),
        )


def _prefetch(items: Iterable[T], depth: int = 2) -> Iterator[T]:
    """Produce `items` from a background thread, so reading and decompressing the next batch
    overlaps the Rust encoder (it releases the GIL while it works)."""
    queue: Queue[tuple[bool, Any]] = Queue(maxsize=depth)

    def fill() -> None:
        try:
            for item in items:
                queue.put((True, item))
            queue.put((False, None))
        except BaseException as err:  # re-raised in the consumer, where it can be handled
            queue.put((False, err))

    Thread(target=fill, daemon=True).start()
    while True:
        ok, item = queue.get()
        if not ok:
            if item is not None:
                raise item
            return
        yield item


def _text_batches(docs: Iterable[Doc], max_chars: int) -> Iterator[list[Doc]]:
    batch: list[Doc] = []
    chars = 0
    for doc in docs:
        batch.append(doc)
        chars += len(doc[1])
        if chars >= max_chars:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def encode_part(
    docs: Iterable[Doc],
    tok: Tokenizer,
    meta_path: Path,
    on_batch: Callable[[int], None] | None = None,
    batch_chars: int = ENCODE_BATCH_CHARS,
) -> EncodedPart:
    """Encode documents into `meta_path`'s part (`.bin` beside it), a batch at a time through
    the tokenizer's parallel `encode_batch`; `on_batch(tokens)` reports progress. Both files
    are renamed into place when complete, the metadata last, so a killed run leaves either a
    whole part or none."""
    dtype = token_dtype(tok.get_vocab_size())
    bos = tok.token_to_id(BOS)
    # Valid text goes through encode_batch in one parallel call; text carrying undecodable
    # bytes (lone surrogates) through the byte path of ByteCodec, still lossless.
    codec = ByteCodec(tok)
    bin_path = meta_path.with_suffix(".bin")
    tmp = bin_path.with_suffix(".bin.tmp")
    ids: list[str] = []
    sources: list[str] = []
    lengths: list[np.ndarray] = []
    n_bytes: list[int] = []
    with tmp.open("wb") as f:
        for batch in _prefetch(_text_batches(docs, batch_chars)):
            per_doc = codec.encode_batch([d[1] for d in batch])
            doc_len = np.fromiter((len(x) + 1 for x in per_doc), np.int64, len(per_doc))
            flat = np.empty(int(doc_len.sum()), dtype=dtype)
            is_bos = np.zeros(len(flat), dtype=bool)
            is_bos[np.cumsum(doc_len) - doc_len] = True
            flat[is_bos] = bos
            flat[~is_bos] = np.fromiter(chain.from_iterable(per_doc), dtype, len(flat) - len(batch))
            flat.tofile(f)
            lengths.append(doc_len)
            for doc in batch:
                ids.append(doc[0])
                sources.append(doc[2] if len(doc) > 2 else UNKNOWN_SOURCE)
                n_bytes.append(len(to_bytes(doc[1])))
            if on_batch is not None:
                on_batch(len(flat))
    os.replace(tmp, bin_path)
    tokens = np.concatenate(lengths) if lengths else np.zeros(0, dtype=np.int64)
    meta = {"ids": ids, "sources": sources, "tokens": tokens.tolist(), "bytes": n_bytes}
    meta_tmp = meta_path.with_suffix(".json.tmp")
    meta_tmp.write_text(json.dumps(meta))
    os.replace(meta_tmp, meta_path)
    return EncodedPart(bin_path, ids, sources, tokens, np.asarray(n_bytes, dtype=np.int64))


def write_token_shards(
    docs: Iterable[Doc],
    tok: Tokenizer,
    out_dir: Path,
    val_fraction: float,
    plans: Mapping[str, SourcePlan] | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Encode (id, text) or (id, text, input source name) documents into train/val shards
    under `out_dir`; return counts, overall and per token source (see `assemble_token_shards`)."""
    part_dir = out_dir / "parts"
    part_dir.mkdir(parents=True, exist_ok=True)
    part = encode_part(docs, tok, part_dir / f"all{PART_META}")
    counts = assemble_token_shards([part], tok, out_dir, val_fraction, plans, seed)
    shutil.rmtree(part_dir)
    return counts


def assemble_token_shards(
    parts: list[EncodedPart],
    tok: Tokenizer,
    out_dir: Path,
    val_fraction: float,
    plans: Mapping[str, SourcePlan] | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Split encoded parts (in corpus order) into train/val shards under `out_dir`.

    `plans` maps an input source to its token source and epochs (unlisted inputs are their own
    token source, once). Epochs apply to the train split only, after the hold-out by document
    id, so no copy of a validation document reaches training. Copies are laid out as passes
    over the training documents in file order (pass p holds each document with more than p
    copies), which keeps repeats of one document far apart in the token stream. Tokens are
    copied from the parts' files in runs of neighbouring documents, never held all at once."""
    plans = plans or {}
    dtype = token_dtype(tok.get_vocab_size())
    doc_ids = [i for part in parts for i in part.ids]
    inputs = [s for part in parts for s in part.sources]
    lengths = np.concatenate([np.zeros(0, np.int64), *(p.tokens for p in parts)])
    n_bytes = np.concatenate([np.zeros(0, np.int64), *(p.bytes for p in parts)])
    part_of = np.repeat(np.arange(len(parts)), [len(p.ids) for p in parts])
    # Offset of each document inside its part's file.
    offsets = np.concatenate(
        [np.zeros(0, np.int64), *(np.cumsum(p.tokens) - p.tokens for p in parts)]
    )
    source_index: dict[str, int] = {}  # in order of first appearance: the data stage's order
    doc_source = np.array(
        [
            source_index.setdefault(plans.get(s, SourcePlan(s)).token_source, len(source_index))
            for s in inputs
        ],
        dtype=np.int64,
    )
    if len(source_index) > np.iinfo(SOURCE_DTYPE).max + 1:
        raise ValueError(f"{len(source_index)} token sources: at most 65536 fit the .src index")
    names = list(source_index)
    is_val = np.array([hash_fraction(d) < val_fraction for d in doc_ids], dtype=bool)
    train_docs = np.flatnonzero(~is_val)

    copies = np.ones(len(train_docs), dtype=np.int64)
    by_input: dict[str, list[int]] = defaultdict(list)  # positions in the train split
    for pos, doc in enumerate(train_docs):
        by_input[inputs[doc]].append(pos)
    for source, members in by_input.items():
        epochs = plans.get(source, SourcePlan(source)).epochs
        if epochs != 1.0:
            ids = [doc_ids[train_docs[p]] for p in members]
            copies[members] = epoch_copies(ids, epochs, seed, source)
    train_order = np.concatenate(
        [np.flatnonzero(copies > p) for p in range(int(copies.max(initial=1)))]
    ).astype(np.int64)
    before = _per_source(doc_source[train_docs], lengths[train_docs], names)
    order = {"train": train_docs[train_order], "val": np.flatnonzero(is_val)}

    counts: dict[str, Any] = {}
    for split in ("train", "val"):
        picked = order[split]
        if not len(picked):
            raise ValueError(
                f"the {split} split is empty: too few documents for tokenize.val_fraction "
                "(or epochs that keep no document); add data or change the fraction"
            )
        _copy_runs(
            parts,
            part_of[picked],
            offsets[picked],
            lengths[picked],
            dtype,
            out_dir / f"{split}.bin",
        )
        split_lengths = lengths[picked]
        starts = np.concatenate([[0], np.cumsum(split_lengths)[:-1]]).astype(np.int64)
        sources = doc_source[picked].astype(SOURCE_DTYPE)
        _write_atomic(out_dir / f"{split}.idx", starts)
        _write_atomic(out_dir / f"{split}.src", sources)
        counts[f"{split}_tokens"] = int(split_lengths.sum())
        counts[f"{split}_docs"] = len(starts)
        counts[f"{split}_bytes"] = int(n_bytes[picked].sum())
        per_tokens = np.bincount(sources, weights=split_lengths, minlength=len(names))
        per_docs = np.bincount(sources, minlength=len(names))
        counts[f"{split}_tokens_by_source"] = {
            n: int(c) for n, c in zip(names, per_tokens, strict=True)
        }
        counts[f"{split}_docs_by_source"] = {
            n: int(c) for n, c in zip(names, per_docs, strict=True)
        }
    counts["epochs_by_source"] = _epochs_report(names, before, counts, plans)
    meta = {
        "dtype": dtype.name,
        "vocab_size": tok.get_vocab_size(),
        "split": {"salt": SPLIT_SALT, "val_fraction": val_fraction, "key": "document id"},
        "epochs": {"salt": EPOCH_SALT, "seed": seed, "applies_to": "train"},
        "sources": names,
        **counts,
    }
    (out_dir / "meta.json").write_text(json.dumps(meta, indent=2))
    return counts


def _copy_runs(
    parts: list[EncodedPart],
    part_of: np.ndarray,
    offsets: np.ndarray,
    lengths: np.ndarray,
    dtype: np.dtype,
    out: Path,
) -> None:
    """Write documents (given by part, offset, length, in output order) into `out`, one slice
    per run of documents that lie back to back in the same part."""
    if not len(part_of):
        return
    follows = (part_of[1:] == part_of[:-1]) & (offsets[1:] == offsets[:-1] + lengths[:-1])
    run_starts = np.flatnonzero(np.concatenate([[True], ~follows]))
    run_ends = np.append(run_starts[1:], len(part_of))
    maps = [np.memmap(p.bin, dtype=dtype, mode="r") if len(p.ids) else None for p in parts]
    tmp = out.with_suffix(out.suffix + ".tmp")
    with tmp.open("wb") as f:
        for a, b in zip(run_starts, run_ends, strict=True):
            first, last = offsets[a], offsets[b - 1] + lengths[b - 1]
            source = maps[part_of[a]]
            assert source is not None
            np.asarray(source[first:last]).tofile(f)
    os.replace(tmp, out)


def _per_source(
    doc_sources: np.ndarray, lengths: np.ndarray, names: list[str]
) -> dict[str, tuple[int, int]]:
    """Token source -> (documents, tokens) of one split as encoded, before any epochs."""
    docs = np.bincount(doc_sources, minlength=len(names))
    tokens = np.bincount(doc_sources, weights=lengths, minlength=len(names))
    return {n: (int(d), int(t)) for n, d, t in zip(names, docs, tokens, strict=True)}


def _epochs_report(
    names: list[str],
    before: dict[str, tuple[int, int]],
    counts: dict[str, Any],
    plans: Mapping[str, SourcePlan],
) -> dict[str, dict[str, Any]]:
    """Per token source: its inputs' configured epochs, training documents and tokens before
    and after epochs, and the epochs realised in tokens (inputs of one token source may differ,
    and fractional epochs pick whole documents of unequal length)."""
    report = {}
    for name in names:
        docs, tokens = before[name]
        after = counts["train_tokens_by_source"][name]
        report[name] = {
            "inputs": {k: p.epochs for k, p in plans.items() if p.token_source == name},
            "documents": docs,
            "documents_after": counts["train_docs_by_source"][name],
            "tokens_before": tokens,
            "tokens_after": after,
            "effective_epochs": round(after / tokens, 4) if tokens else 0.0,
        }
    return report


def window_batch(chunk: torch.Tensor, bos_id: int | None = None) -> dict[str, torch.Tensor]:
    """(rows, seq_len + 1) token windows -> inputs and next-token targets; with `bos_id`, also
    per-token document ids (each BOS opens a document; a window may start mid-document)."""
    batch = {"input_ids": chunk[:, :-1], "targets": chunk[:, 1:]}
    if bos_id is not None:
        batch["doc_ids"] = (batch["input_ids"] == bos_id).cumsum(dim=1)
    return batch


def fit_unigram(train: np.ndarray, vocab_size: int) -> np.ndarray:
    """Add-one smoothed unigram log-probabilities (natural log) of the training tokens: the
    baseline every model's bits-per-byte is compared against."""
    counts = np.bincount(np.asarray(train, dtype=np.int64), minlength=vocab_size).astype(np.float64)
    return np.log(counts + 1.0) - np.log(counts.sum() + vocab_size)
