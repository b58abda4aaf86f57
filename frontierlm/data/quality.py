"""Model-based quality filtering as DCLM does it, with numpy in place of fastText.

DCLM (Li et al. 2024) scores each page with a fastText bigram classifier trained on "reference"
text (there: OpenHermes and ELI5) against random web pages, and keeps about the top 10%. Here:
- features: hashed word unigrams and bigrams (`buckets` = 2^20 by default) of the same
  normalised words decontamination uses, log(1 + count), L2-normalised per document so a
  page's length does not decide its score;
- model: logistic regression, full-batch Adam with L2 weight decay, class-balanced loss;
- positives: WikiText-2 articles, negatives: the Common Crawl pages the project ships;
  documents are cut into windows of `window_words` words for more, shorter examples, and the
  held-out AUC is measured on windows of documents kept out of training altogether.

A model is a directory (written atomically): `weights.npz` holds only the non-zero weights (a
bucket never seen in training keeps weight 0 exactly), `meta.json` the settings and the AUC.

Steps: `QualityFilter` stores `meta["quality_score"]` (the probability of "reference") and drops
documents below a threshold; `QualityTopFraction` keeps the top share of the whole stream.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import tempfile
from array import array
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from frontierlm.atomic import atomic_dir, commit_dir
from frontierlm.config import DataSource
from frontierlm.data.decontam import normalized_words, word_hashes
from frontierlm.data.documents import Document, SourceStats
from frontierlm.data.pipeline import Step, TwoPassStep
from frontierlm.data.readers import read_source

WEIGHTS = "weights.npz"
META = "meta.json"
U64 = np.uint64
_FOLD = U64(0x9E3779B97F4A7C15)
_MIX = U64(0xBF58476D1CE4E5B9)
# WikiText-2 articles start at a top-level " = Title = " line (as in the quickstart recipe).
WIKITEXT_SPLIT = r"\n(?= = [^=].* = \n)"
DEFAULT_POSITIVES = ("data/wikitext-2/valid.txt",)
DEFAULT_NEGATIVES = (
    "data/web/commoncrawl-sample-0000.warc.gz",
    "data/web/commoncrawl-sample-0001.warc.gz",
    "data/web/cc_en_head-0091.jsonl",
)


def model_files(directory: Path) -> list[Path]:
    """The files a model directory consists of (the data stage fingerprints both)."""
    return [directory / WEIGHTS, directory / META]


def features(text: str, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """(bucket indices, values) of a text's hashed uni+bigrams: sorted distinct buckets,
    log(1 + count) weights scaled to unit L2 norm. Empty arrays for a text with no words."""
    h = word_hashes(normalized_words(text))
    if len(h) == 0:
        return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.float32)
    # A bigram hash folds both words in order and is mixed so it rarely shares a bucket with a
    # unigram; the top bits index the buckets (the best-mixed bits of a multiplicative hash).
    bigrams = (h[:-1] * _FOLD + h[1:]) * _MIX
    grams = np.concatenate([h, bigrams])
    buckets, counts = np.unique(grams >> U64(64 - bits), return_counts=True)
    values = np.log1p(counts.astype(np.float32))
    values /= np.sqrt(np.sum(values * values))
    return buckets.astype(np.int64), values.astype(np.float32)


@dataclass
class SparseRows:
    """Rows of hashed features, CSR-like: row r owns cols/vals[offsets[r]:offsets[r+1]]."""

    cols: np.ndarray
    vals: np.ndarray
    rows: np.ndarray  # row index of every entry

    @classmethod
    def build(cls, texts: Sequence[str], bits: int) -> SparseRows:
        cols, vals, rows = [], [], []
        for r, text in enumerate(texts):
            c, v = features(text, bits)
            cols.append(c)
            vals.append(v)
            rows.append(np.full(len(c), r, dtype=np.int64))
        empty = [np.empty(0, dtype=np.int64)]
        return cls(
            np.concatenate(cols or empty),
            np.concatenate(vals or [np.empty(0, dtype=np.float32)]),
            np.concatenate(rows or empty),
        )

    def dot(self, w: np.ndarray, n: int) -> np.ndarray:
        return np.bincount(self.rows, weights=w[self.cols] * self.vals, minlength=n)


@dataclass
class QualityModel:
    bits: int
    weights: np.ndarray  # (2^bits,) float32
    bias: float
    meta: dict[str, Any] = field(default_factory=dict)

    def logits(self, texts: Sequence[str]) -> np.ndarray:
        return SparseRows.build(texts, self.bits).dot(self.weights, len(texts)) + self.bias

    def score(self, text: str) -> float:
        """Probability that `text` is reference-like (0..1)."""
        cols, vals = features(text, self.bits)
        z = float(np.dot(self.weights[cols], vals)) + self.bias
        return 1.0 / (1.0 + math.exp(-z)) if z > -700 else 0.0

    def save(self, directory: Path) -> None:
        """Write weights.npz and meta.json into `directory`, replacing it whole or not at all."""
        directory = Path(directory)
        tmp = atomic_dir(directory)
        nz = np.flatnonzero(self.weights).astype(np.uint32)
        np.savez_compressed(
            tmp / WEIGHTS,
            index=nz,
            value=self.weights[nz].astype(np.float32),
            bias=np.float64(self.bias),
        )
        self.meta.update(bits=self.bits, nonzero=len(nz))
        # Ties the pair together: a weights file from another training is refused on load.
        digest = hashlib.sha256((tmp / WEIGHTS).read_bytes()).hexdigest()
        meta = dict(self.meta, weights_sha256=digest)
        (tmp / META).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        commit_dir(tmp, directory)

    @classmethod
    def load(cls, directory: Path) -> QualityModel:
        directory = Path(directory)
        weights_file, meta_file = model_files(directory)
        if not weights_file.is_file() or not meta_file.is_file():
            raise FileNotFoundError(
                f"quality model {directory} needs {WEIGHTS} and {META}; train one with "
                f"`frontierlm train-classifier {directory}`"
            )
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
        digest = hashlib.sha256(weights_file.read_bytes()).hexdigest()
        if meta.get("weights_sha256") != digest:
            raise ValueError(
                f"quality model {directory}: {WEIGHTS} does not match {META} (copied from two "
                "different trainings?); train it again"
            )
        bits = int(meta["bits"])
        with np.load(weights_file) as z:
            weights = np.zeros(1 << bits, dtype=np.float32)
            weights[z["index"]] = z["value"]
            bias = float(z["bias"])
        return cls(bits, weights, bias, meta)


# ----------------------------------------------------------------------------- training


def auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U with tied scores sharing their mean rank)."""
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels).astype(bool)
    pos, neg = int(labels.sum()), int((~labels).sum())
    if pos == 0 or neg == 0:
        raise ValueError("AUC needs both positive and negative examples")
    order = np.argsort(scores, kind="stable")
    sorted_scores = scores[order]
    ranks = np.empty(len(scores), dtype=np.float64)
    starts = np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]])
    ends = np.r_[starts[1:], len(scores)]
    for a, b in zip(starts.tolist(), ends.tolist(), strict=True):
        ranks[order[a:b]] = (a + b + 1) / 2.0  # mean of 1-based ranks a+1..b
    return float((ranks[labels].sum() - pos * (pos + 1) / 2.0) / (pos * neg))


def windows(text: str, size: int, min_words: int) -> list[str]:
    """`text` cut into consecutive pieces of `size` whitespace words; a tail shorter than
    `min_words` is dropped (a document shorter than that gives nothing)."""
    words = text.split()
    out = [" ".join(words[i : i + size]) for i in range(0, len(words), size)]
    return [w for w in out if len(w.split()) >= min_words]


def source_for(path: str) -> DataSource:
    """How to read one classifier input: WikiText-style .txt files split into articles."""
    name = Path(path).name.replace(" ", "_")
    if path.endswith(".txt"):
        return DataSource(name=name, path=path, split_pattern=WIKITEXT_SPLIT)
    return DataSource(name=name, path=path)


def read_texts(paths: Sequence[str], workers: int = 1) -> list[tuple[str, str]]:
    """(document id, text) of every document in `paths`, with `<unk>` removed: WikiText's
    placeholder would otherwise be a perfect, meaningless "reference" feature."""
    docs = []
    for path in paths:
        source = source_for(path)
        for doc in read_source(source, SourceStats(source.name), workers):
            docs.append((f"{path}#{doc.id}", doc.text.replace("<unk>", " ")))
    return docs


@dataclass
class TrainResult:
    model: QualityModel
    heldout_auc: float
    train_auc: float


def train_classifier(
    positives: Sequence[tuple[str, str]],
    negatives: Sequence[tuple[str, str]],
    bits: int = 20,
    window_words: int = 100,
    min_words: int = 30,
    heldout_fraction: float = 0.2,
    steps: int = 300,
    lr: float = 0.05,
    weight_decay: float = 1e-4,
    seed: int = 0,
) -> TrainResult:
    """Fit a logistic regression reference-vs-web on (id, text) documents.

    Documents, not windows, are split into train and held-out (seeded by id hash), so no
    held-out window shares a page with a training window.
    """
    if not positives or not negatives:
        raise ValueError("classifier training needs positive and negative documents")
    rng = np.random.default_rng(seed)
    split: dict[str, list[tuple[str, int]]] = {"train": [], "heldout": []}
    for label, docs in ((1, positives), (0, negatives)):
        order = rng.permutation(len(docs))
        n_heldout = max(1, round(heldout_fraction * len(docs))) if heldout_fraction > 0 else 0
        for rank, i in enumerate(order.tolist()):
            part = "heldout" if rank < n_heldout else "train"
            split[part] += [(w, label) for w in windows(docs[i][1], window_words, min_words)]
    train = split["train"]
    texts = [t for t, _ in train]
    y = np.array([label for _, label in train], dtype=np.float64)
    if y.min() == y.max():
        raise ValueError("after windowing, the training split holds one class only")
    x = SparseRows.build(texts, bits)
    n = len(texts)
    # Class-balanced: each class carries half the loss however many windows it has.
    sample_w = np.where(y == 1, 0.5 / y.sum(), 0.5 / (n - y.sum()))
    w = np.zeros(1 << bits, dtype=np.float64)
    b = 0.0
    m_w, v_w = np.zeros_like(w), np.zeros_like(w)
    m_b = v_b = 0.0
    beta1, beta2, eps = 0.9, 0.999, 1e-8
    for t in range(1, steps + 1):
        z = x.dot(w, n) + b
        p = 1.0 / (1.0 + np.exp(-np.clip(z, -50, 50)))
        err = (p - y) * sample_w
        g_w = np.bincount(x.cols, weights=x.vals * err[x.rows], minlength=len(w))
        g_w += weight_decay * w
        g_b = float(err.sum())
        m_w = beta1 * m_w + (1 - beta1) * g_w
        v_w = beta2 * v_w + (1 - beta2) * g_w * g_w
        m_b = beta1 * m_b + (1 - beta1) * g_b
        v_b = beta2 * v_b + (1 - beta2) * g_b * g_b
        step = lr * math.sqrt(1 - beta2**t) / (1 - beta1**t)
        w -= step * m_w / (np.sqrt(v_w) + eps)
        b -= step * m_b / (math.sqrt(v_b) + eps)
    meta: dict[str, Any] = {
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "features": "hashed word unigrams+bigrams, log1p counts, L2-normalised",
        "window_words": window_words,
        "steps": steps,
        "lr": lr,
        "weight_decay": weight_decay,
        "seed": seed,
        "positive_docs": len(positives),
        "negative_docs": len(negatives),
        "train_windows": n,
    }
    model = QualityModel(bits, w.astype(np.float32), b, meta)
    train_auc = auc(model.logits(texts), y)
    heldout = split["heldout"]
    heldout_y = np.array([label for _, label in heldout])
    if heldout and heldout_y.min() != heldout_y.max():
        heldout_auc = auc(model.logits([t for t, _ in heldout]), heldout_y)
    else:
        heldout_auc = float("nan")
    model.meta.update(
        heldout_windows=len(heldout),
        train_auc=round(train_auc, 4),
        heldout_auc=round(heldout_auc, 4),
    )
    return TrainResult(model, heldout_auc, train_auc)


# ----------------------------------------------------------------------------- steps


class QualityFilter(Step):
    """Store `meta["quality_score"]`; with a threshold, drop documents below it
    (reason `low_quality`)."""

    name = "quality"

    def __init__(self, model: QualityModel, threshold: float | None = None) -> None:
        self.model = model
        self.threshold = threshold

    def drop_reason(self, doc: Document) -> str | None:
        score = self.model.score(doc.text)
        doc.meta["quality_score"] = round(score, 6)
        if self.threshold is not None and score < self.threshold:
            return "low_quality"
        return None


class QualityTopFraction(TwoPassStep):
    """Keep the top `fraction` of the stream by quality score: exactly
    floor(fraction * n + 0.5) documents of n, ties kept in stream order (reason
    `below_top_fraction`).

    Pass 1 keeps only the scores (8 bytes per document) in memory and spills documents to a
    scratch JSONL file in `work_dir` (removed when the step closes), which pass 2 replays.
    A score already in `meta["quality_score"]` (from `QualityFilter`) is reused.
    """

    name = "quality_top"
    score_key = "quality_score"  # where the score is read from (and stored) in meta
    reason = "below_top_fraction"

    def __init__(
        self, model: QualityModel | None, fraction: float, work_dir: Path | None = None
    ) -> None:
        if not 0.0 < fraction <= 1.0:
            raise ValueError(f"quality top fraction must be in (0, 1], got {fraction}")
        self.model = model
        self.fraction = fraction
        self.work_dir = work_dir
        self._scratch: Path | None = None
        self._spill: Any = None
        self._scores = array("d")
        self._keep = np.empty(0, dtype=bool)

    def observe(self, index: int, doc: Document) -> None:
        if index == 0:  # a step object run a second time starts from nothing
            self.close()
            self._scores = array("d")
        if self._spill is None:
            if self.work_dir is not None:
                Path(self.work_dir).mkdir(parents=True, exist_ok=True)
            self._scratch = Path(tempfile.mkdtemp(prefix="quality-", dir=self.work_dir))
            self._spill = open(self._scratch / "docs.jsonl", "w", encoding="utf-8")  # noqa: SIM115
        score = doc.meta.get(self.score_key)
        if score is None:
            if self.model is None:
                raise ValueError(f"{self.name}: document {doc.id} has no score and no model")
            score = round(self.model.score(doc.text), 6)
            doc.meta[self.score_key] = score
        self._scores.append(float(score))
        record = {"id": doc.id, "text": doc.text, "meta": doc.meta}
        self._spill.write(json.dumps(record, ensure_ascii=False) + "\n")

    def finish(self) -> None:
        if self._spill is not None:
            self._spill.close()
            self._spill = None
        scores = np.frombuffer(self._scores, dtype=np.float64) if self._scores else np.empty(0)
        keep = math.floor(self.fraction * len(scores) + 0.5)
        # Stable sort on the negated score: equal scores keep stream order.
        best = np.argsort(-scores, kind="stable")[:keep]
        self._keep = np.zeros(len(scores), dtype=bool)
        self._keep[best] = True
        self._scores = array("d")

    def replay(self) -> Iterator[tuple[int, Document]]:
        if self._scratch is None:
            return
        with open(self._scratch / "docs.jsonl", encoding="utf-8") as f:
            for index, line in enumerate(f):
                record = json.loads(line)
                yield index, Document(record["id"], record["text"], record["meta"])

    def decide(self, index: int, doc: Document) -> str | None:
        return None if self._keep[index] else self.reason

    def close(self) -> None:
        if self._spill is not None:
            self._spill.close()
            self._spill = None
        if self._scratch is not None:
            shutil.rmtree(self._scratch, ignore_errors=True)
        self._scratch = None
