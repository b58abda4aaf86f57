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
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from tokenizers import Tokenizer

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


def write_token_shards(
    docs: Iterable[tuple[str, str] | tuple[str, str, str]],
    tok: Tokenizer,
    out_dir: Path,
    val_fraction: float,
    batch_docs: int = 512,
    plans: Mapping[str, SourcePlan] | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Encode (id, text) or (id, text, input source name) documents into train/val shards
    under `out_dir`; return counts, overall and per token source.

    `plans` maps an input source to its token source and epochs (unlisted inputs are their own
    token source, once). Epochs apply to the train split only, after the hold-out by document
    id, so no copy of a validation document reaches training. Copies are laid out as passes
    over the training documents in file order (pass p holds each document with more than p
    copies), which keeps repeats of one document far apart in the token stream."""
    plans = plans or {}
    dtype = token_dtype(tok.get_vocab_size())
    bos = tok.token_to_id(BOS)
    encoded: dict[str, list[np.ndarray]] = {"train": [], "val": []}
    doc_sources: dict[str, list[int]] = {"train": [], "val": []}
    doc_bytes: dict[str, list[int]] = {"train": [], "val": []}
    # Training documents of each input, as (position in the train split, id): what epochs pick.
    train_by_input: dict[str, list[tuple[int, str]]] = defaultdict(list)
    source_index: dict[str, int] = {}  # in order of first appearance: the data stage's order

    def flush(batch: list[tuple[str, ...]]) -> None:
        encodings = tok.encode_batch([doc[1] for doc in batch], add_special_tokens=False)
        for doc, enc in zip(batch, encodings, strict=True):
            doc_id, text = doc[0], doc[1]
            source = doc[2] if len(doc) > 2 else UNKNOWN_SOURCE
            plan = plans.get(source, SourcePlan(source))
            split = "val" if hash_fraction(doc_id) < val_fraction else "train"
            if split == "train":
                train_by_input[source].append((len(encoded["train"]), doc_id))
            ids = np.empty(len(enc.ids) + 1, dtype=dtype)
            ids[0] = bos
            ids[1:] = enc.ids
            encoded[split].append(ids)
            doc_sources[split].append(source_index.setdefault(plan.token_source, len(source_index)))
            doc_bytes[split].append(len(text.encode("utf-8")))

    batch: list[tuple[str, ...]] = []
    for doc in docs:
        batch.append(doc)
        if len(batch) == batch_docs:
            flush(batch)
            batch = []
    if batch:
        flush(batch)

    if len(source_index) > np.iinfo(SOURCE_DTYPE).max + 1:
        raise ValueError(f"{len(source_index)} token sources: at most 65536 fit the .src index")
    names = list(source_index)

    copies = np.ones(len(encoded["train"]), dtype=np.int64)
    for source, members in train_by_input.items():
        epochs = plans.get(source, SourcePlan(source)).epochs
        if epochs != 1.0:
            positions = np.array([p for p, _ in members], dtype=np.int64)
            copies[positions] = epoch_copies([d for _, d in members], epochs, seed, source)
    train_order = np.concatenate(
        [np.flatnonzero(copies > p) for p in range(int(copies.max(initial=1)))]
    ).astype(np.int64)
    before = _per_source(doc_sources["train"], encoded["train"], names)
    order = {"train": train_order, "val": np.arange(len(encoded["val"]))}

    counts: dict[str, Any] = {}
    for split in ("train", "val"):
        if not len(order[split]):
            raise ValueError(
                f"the {split} split is empty: too few documents for tokenize.val_fraction "
                "(or epochs that keep no document); add data or change the fraction"
            )
        picked = [encoded[split][i] for i in order[split]]
        lengths = np.array([len(ids) for ids in picked], dtype=np.int64)
        flat = np.concatenate(picked)
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
        sources = np.asarray(doc_sources[split], dtype=SOURCE_DTYPE)[order[split]]
        _write_atomic(out_dir / f"{split}.bin", flat)
        _write_atomic(out_dir / f"{split}.idx", starts)
        _write_atomic(out_dir / f"{split}.src", sources)
        counts[f"{split}_tokens"] = len(flat)
        counts[f"{split}_docs"] = len(starts)
        counts[f"{split}_bytes"] = int(np.asarray(doc_bytes[split])[order[split]].sum())
        per_tokens = np.bincount(sources, weights=lengths, minlength=len(names))
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


def _per_source(
    doc_sources: list[int], encoded: list[np.ndarray], names: list[str]
) -> dict[str, tuple[int, int]]:
    """Token source -> (documents, tokens) of one split as encoded, before any epochs."""
    sources = np.asarray(doc_sources, dtype=np.int64)
    lengths = np.array([len(ids) for ids in encoded], dtype=np.int64)
    docs = np.bincount(sources, minlength=len(names))
    tokens = np.bincount(sources, weights=lengths, minlength=len(names))
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
