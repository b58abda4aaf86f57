"""Token shards: documents encoded into one flat array per split, read back as a memmap.

Layout of `tokens/`:
  train.bin / val.bin    flat uint16 (vocab < 65536) or uint32 token ids; each document is
                         BOS followed by its tokens, so BOS marks every document boundary
  train.idx / val.idx    int64 offsets of each document's first token (its BOS)
  train.src / val.src    uint16 per document, aligned with .idx: the index of its data source in
                         meta.json's "sources" (what multi-stage mixtures sample by)
  meta.json              dtype, vocab size, token and document counts per split (also per source),
                         the source names, and the split rule
Documents are assigned to val by a salted hash of their id, so the split is stable across runs
and independent of file order.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tokenizers import Tokenizer

from frontierlm.tokenizer.train import BOS

SPLIT_SALT = "frontierlm-split-v1"
UNKNOWN_SOURCE = "?"  # documents given without a source (the tokenizer stage's report says "?" too)
SOURCE_DTYPE = np.dtype(np.uint16)


def hash_fraction(key: str, salt: str = SPLIT_SALT) -> float:
    """A uniform number in [0, 1) fixed by `key`: the basis of every held-out split."""
    digest = hashlib.blake2b(f"{salt}:{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64


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


def write_token_shards(
    docs: Iterable[tuple[str, str] | tuple[str, str, str]],
    tok: Tokenizer,
    out_dir: Path,
    val_fraction: float,
    batch_docs: int = 512,
) -> dict[str, Any]:
    """Encode (id, text) or (id, text, source name) documents into train/val shards under
    `out_dir`; return counts, overall and per source."""
    dtype = token_dtype(tok.get_vocab_size())
    bos = tok.token_to_id(BOS)
    parts: dict[str, list[np.ndarray]] = {"train": [], "val": []}
    lengths: dict[str, list[int]] = {"train": [], "val": []}
    doc_sources: dict[str, list[int]] = {"train": [], "val": []}
    text_bytes = {"train": 0, "val": 0}
    source_index: dict[str, int] = {}  # in order of first appearance: the data stage's order

    def flush(batch: list[tuple[str, ...]]) -> None:
        encodings = tok.encode_batch([doc[1] for doc in batch], add_special_tokens=False)
        for doc, enc in zip(batch, encodings, strict=True):
            doc_id, text = doc[0], doc[1]
            source = doc[2] if len(doc) > 2 else UNKNOWN_SOURCE
            split = "val" if hash_fraction(doc_id) < val_fraction else "train"
            ids = np.empty(len(enc.ids) + 1, dtype=dtype)
            ids[0] = bos
            ids[1:] = enc.ids
            parts[split].append(ids)
            lengths[split].append(len(ids))
            doc_sources[split].append(source_index.setdefault(source, len(source_index)))
            text_bytes[split] += len(text.encode("utf-8"))

    batch: list[tuple[str, ...]] = []
    for doc in docs:
        batch.append(doc)
        if len(batch) == batch_docs:
            flush(batch)
            batch = []
    if batch:
        flush(batch)

    if len(source_index) > np.iinfo(SOURCE_DTYPE).max + 1:
        raise ValueError(f"{len(source_index)} data sources: at most 65536 fit the .src index")
    names = list(source_index)
    counts: dict[str, Any] = {}
    for split in ("train", "val"):
        if not parts[split]:
            raise ValueError(
                f"the {split} split is empty: too few documents for tokenize.val_fraction; "
                "add data or change the fraction"
            )
        flat = np.concatenate(parts[split])
        starts = np.concatenate([[0], np.cumsum(lengths[split])[:-1]]).astype(np.int64)
        sources = np.asarray(doc_sources[split], dtype=SOURCE_DTYPE)
        _write_atomic(out_dir / f"{split}.bin", flat)
        _write_atomic(out_dir / f"{split}.idx", starts)
        _write_atomic(out_dir / f"{split}.src", sources)
        counts[f"{split}_tokens"] = len(flat)
        counts[f"{split}_docs"] = len(starts)
        counts[f"{split}_bytes"] = text_bytes[split]
        per_tokens = np.bincount(sources, weights=lengths[split], minlength=len(names))
        per_docs = np.bincount(sources, minlength=len(names))
        counts[f"{split}_tokens_by_source"] = {
            n: int(c) for n, c in zip(names, per_tokens, strict=True)
        }
        counts[f"{split}_docs_by_source"] = {
            n: int(c) for n, c in zip(names, per_docs, strict=True)
        }
    meta = {
        "dtype": dtype.name,
        "vocab_size": tok.get_vocab_size(),
        "split": {"salt": SPLIT_SALT, "val_fraction": val_fraction, "key": "document id"},
        "sources": names,
        **counts,
    }
    (out_dir / "meta.json").write_text(json.dumps(meta, indent=2))
    return counts


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
