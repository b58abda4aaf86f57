"""Token shards: documents encoded into one flat array per split, read back as a memmap.

Layout of `tokens/`:
  train.bin / val.bin    flat uint16 (vocab < 65536) or uint32 token ids; each document is
                         BOS followed by its tokens, so BOS marks every document boundary
  train.idx / val.idx    int64 offsets of each document's first token (its BOS)
  meta.json              dtype, vocab size, token and document counts per split, and the split rule
Documents are assigned to val by a salted hash of their id, so the split is stable across runs
and independent of file order.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer

from frontierlm.tokenizer.train import BOS

SPLIT_SALT = "frontierlm-split-v1"


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

    @classmethod
    def open(cls, directory: Path, split: str) -> TokenSplit:
        meta = json.loads((directory / "meta.json").read_text())
        tokens = np.memmap(directory / f"{split}.bin", dtype=meta["dtype"], mode="r")
        starts = np.fromfile(directory / f"{split}.idx", dtype=np.int64)
        return cls(tokens=tokens, doc_starts=starts)

    def __len__(self) -> int:
        return len(self.tokens)


def _write_atomic(path: Path, array: np.ndarray) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    array.tofile(tmp)
    os.replace(tmp, path)


def write_token_shards(
    docs: Iterable[tuple[str, str]],
    tok: Tokenizer,
    out_dir: Path,
    val_fraction: float,
    batch_docs: int = 512,
) -> dict[str, int]:
    """Encode (id, text) pairs into train/val shards under `out_dir`; return counts."""
    dtype = token_dtype(tok.get_vocab_size())
    bos = tok.token_to_id(BOS)
    parts: dict[str, list[np.ndarray]] = {"train": [], "val": []}
    lengths: dict[str, list[int]] = {"train": [], "val": []}
    text_bytes = {"train": 0, "val": 0}

    def flush(batch: list[tuple[str, str]]) -> None:
        encodings = tok.encode_batch([text for _, text in batch], add_special_tokens=False)
        for (doc_id, text), enc in zip(batch, encodings, strict=True):
            split = "val" if hash_fraction(doc_id) < val_fraction else "train"
            ids = np.empty(len(enc.ids) + 1, dtype=dtype)
            ids[0] = bos
            ids[1:] = enc.ids
            parts[split].append(ids)
            lengths[split].append(len(ids))
            text_bytes[split] += len(text.encode("utf-8"))

    batch: list[tuple[str, str]] = []
    for doc in docs:
        batch.append(doc)
        if len(batch) == batch_docs:
            flush(batch)
            batch = []
    if batch:
        flush(batch)

    counts: dict[str, int] = {}
    for split in ("train", "val"):
        if not parts[split]:
            raise ValueError(
                f"the {split} split is empty: too few documents for tokenize.val_fraction; "
                "add data or change the fraction"
            )
        flat = np.concatenate(parts[split])
        starts = np.concatenate([[0], np.cumsum(lengths[split])[:-1]]).astype(np.int64)
        _write_atomic(out_dir / f"{split}.bin", flat)
        _write_atomic(out_dir / f"{split}.idx", starts)
        counts[f"{split}_tokens"] = len(flat)
        counts[f"{split}_docs"] = len(starts)
        counts[f"{split}_bytes"] = text_bytes[split]
    meta = {
        "dtype": dtype.name,
        "vocab_size": tok.get_vocab_size(),
        "split": {"salt": SPLIT_SALT, "val_fraction": val_fraction, "key": "document id"},
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
