"""Decontamination: drop (or flag) documents sharing a word n-gram with a shipped evaluation set.

As in GPT-3 (Brown et al. 2020, appendix C) and Llama 2's 13-gram check: both sides are
normalised the same way (NFKC, casefolded, punctuation and symbols dropped, words = runs of
letters and digits) and a document is contaminated by an evaluation item when they share any
contiguous n-gram of those words (n = 13 by default). Evaluation texts shorter than n words
cannot contribute an n-gram and are counted as `short` in the index stats; GPT-3 lowered n per
benchmark for those, which for one-line MMLU questions would also flag ordinary prose.

The index is built once per run from the files in `data/` (`EVAL_SETS`): every n-gram of every
evaluation text, hashed to 64 bits, in one sorted array with the eval set and item of each hash
beside it (13 bytes per n-gram: 1.0M n-grams, 13 MB, for GSM8K test + HumanEval + MMLU test,
built in ~2 s).
A document is looked up with one vectorised `searchsorted` over its own n-gram hashes.
"""

from __future__ import annotations

import gzip
import json
import lzma
import re
import unicodedata
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import xxhash

from frontierlm.data.documents import Document
from frontierlm.data.minhash import U64, mix64
from frontierlm.data.pipeline import Step

# The shipped evaluation sets live in the repository's data/ directory, not beside the recipe:
# they are part of the project, like the code that reads them.
DATA_DIR = Path(__file__).resolve().parents[2] / "data"

# An odd multiplier for the polynomial fold, mixed by minhash.py's splitmix64 finalizer: a
# window's hash must depend on every word and its position.
_FOLD = U64(0x9E3779B97F4A7C15)
# Letters and digits only: underscores and every punctuation mark or symbol separate words, so
# "has_close_elements(numbers)" and "has close elements numbers" normalise alike.
_WORD = re.compile(r"[^\W_]+")
# Item ids recorded in meta per eval set: enough to find the item, bounded for a page that
# pastes a whole benchmark.
MAX_IDS_IN_META = 10


def normalized_words(text: str) -> list[str]:
    """GPT-3-style normalisation: NFKC, casefold, punctuation stripped, split into words."""
    return _WORD.findall(unicodedata.normalize("NFKC", text).casefold())


def word_hashes(words: list[str]) -> np.ndarray:
    """64-bit hash of each word, seeded apart from MinHash's (uint64 array)."""
    hashes = (xxhash.xxh3_64_intdigest(w.encode(), 0x5EED) for w in words)
    return np.fromiter(hashes, dtype=np.uint64, count=len(words))


def ngram_hashes(text: str, n: int) -> np.ndarray:
    """Distinct 64-bit hashes of the word n-grams of `normalized_words(text)`; empty when the
    text has fewer than n words."""
    h = word_hashes(normalized_words(text))
    count = len(h) - n + 1
    if count <= 0:
        return np.empty(0, dtype=np.uint64)
    acc = np.zeros(count, dtype=np.uint64)
    for k in range(n):
        acc *= _FOLD
        acc += h[k : k + count]
    return np.unique(mix64(acc))


# ----------------------------------------------------------------------------- eval sets


@dataclass(frozen=True)
class EvalSet:
    """One shipped evaluation set: a file under data/ and how to read its items."""

    name: str
    path: str  # relative to DATA_DIR
    items: Callable[[Path], Iterator[tuple[str, list[str]]]]  # file -> (item id, texts)

    @property
    def file(self) -> Path:
        return DATA_DIR / self.path


def _jsonl(path: Path) -> Iterator[dict]:
    opener = lzma.open if path.suffix == ".xz" else gzip.open
    with opener(path, "rt", encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


def _gsm8k_items(path: Path) -> Iterator[tuple[str, list[str]]]:
    # Question and worked answer separately: either pasted alone is contamination, and an
    # n-gram spanning the seam would only match the one layout we happened to pick.
    for i, r in enumerate(_jsonl(path)):
        yield str(i), [r["question"], r["answer"]]


def _humaneval_items(path: Path) -> Iterator[tuple[str, list[str]]]:
    # The canonical solution continues the prompt's function: one text, as a page would show it.
    for r in _jsonl(path):
        yield r["task_id"], [r["prompt"] + r["canonical_solution"]]


def _mmlu_items(path: Path) -> Iterator[tuple[str, list[str]]]:
    # Many questions are under 13 words alone; with their choices most are long enough.
    counts: Counter[str] = Counter()
    for r in _jsonl(path):
        subject = r["subject"]
        yield f"{subject}/{counts[subject]}", [" ".join([r["question"], *r["choices"]])]
        counts[subject] += 1


EVAL_SETS: dict[str, EvalSet] = {
    s.name: s
    for s in [
        EvalSet("gsm8k_test", "gsm8k/test.jsonl.gz", _gsm8k_items),
        EvalSet("humaneval", "humaneval/HumanEval.jsonl.gz", _humaneval_items),
        EvalSet("mmlu_test", "mmlu/test.jsonl.xz", _mmlu_items),
    ]
}


def eval_set_files(names: list[str]) -> list[Path]:
    """The files the named eval sets are read from (the data stage fingerprints them)."""
    return [_eval_set(name).file for name in names]


def _eval_set(name: str) -> EvalSet:
    if name not in EVAL_SETS:
        raise ValueError(f"unknown eval set {name!r}; shipped: {sorted(EVAL_SETS)}")
    return EVAL_SETS[name]


# ----------------------------------------------------------------------------- index


class NgramIndex:
    """Sorted n-gram hashes of the named eval sets, with the (set, item) of each."""

    def __init__(self, names: list[str], n: int = 13) -> None:
        if n < 1:
            raise ValueError(f"decontamination n-gram must be >= 1, got {n}")
        if not names:
            raise ValueError("decontamination needs at least one eval set")
        self.names = list(dict.fromkeys(names))
        self.n = n
        self.item_ids: list[list[str]] = []
        self.stats: dict[str, dict[str, int]] = {}
        hashes, sets, items = [], [], []
        for s, name in enumerate(self.names):
            spec = _eval_set(name)
            if not spec.file.is_file():
                raise FileNotFoundError(
                    f"eval set {name!r} reads {spec.file}, which is missing; restore data/ from "
                    "the repository or drop it from data.decontaminate"
                )
            ids: list[str] = []
            short = ngrams = 0
            for item_id, texts in spec.items(spec.file):
                per_item = [ngram_hashes(t, n) for t in texts]
                h = np.unique(np.concatenate(per_item))
                short += sum(len(p) == 0 for p in per_item)
                hashes.append(h)
                sets.append(np.full(len(h), s, dtype=np.uint8))
                items.append(np.full(len(h), len(ids), dtype=np.int32))
                ngrams += len(h)
                ids.append(item_id)
            self.item_ids.append(ids)
            self.stats[name] = {"items": len(ids), "ngrams": ngrams, "short": short}
        keys = np.concatenate(hashes)
        order = np.argsort(keys, kind="stable")
        self.keys = keys[order]
        self.sets = np.concatenate(sets)[order]
        self.items = np.concatenate(items)[order]

    def lookup(self, text: str) -> dict[str, list[str]]:
        """Eval set -> ids of the items sharing an n-gram with `text` (empty when clean)."""
        h = ngram_hashes(text, self.n)
        if len(h) == 0 or len(self.keys) == 0:
            return {}
        lo = np.searchsorted(self.keys, h, side="left")
        hi = np.searchsorted(self.keys, h, side="right")
        hit = hi > lo
        if not hit.any():
            return {}
        # One n-gram can occur in several items (shared boilerplate): take every entry.
        entries = np.concatenate([np.arange(a, b) for a, b in zip(lo[hit], hi[hit], strict=True)])
        found: dict[str, list[str]] = {}
        pairs = zip(self.sets[entries].tolist(), self.items[entries].tolist(), strict=True)
        for s, i in sorted(set(pairs)):
            found.setdefault(self.names[s], []).append(self.item_ids[s][i])
        return found


class Decontaminate(Step):
    """Drop documents sharing an n-gram with an eval set (reason `contaminated:<eval set>`), or
    with `mode="flag"` keep them; either way `meta["contaminated"]` maps each eval set hit to
    (up to MAX_IDS_IN_META of) the item ids, and `counts[<eval set>]` counts documents per set.

    A document hitting several sets is dropped under the one with the most items hit (ties: the
    first in `eval_sets`) and counted under each.
    """

    name = "decontam"

    def __init__(
        self,
        eval_sets: list[str],
        ngram: int = 13,
        mode: str = "drop",
        index: NgramIndex | None = None,
    ) -> None:
        if mode not in ("drop", "flag"):
            raise ValueError(f"decontamination mode must be 'drop' or 'flag', got {mode!r}")
        self.mode = mode
        self.index = index if index is not None else NgramIndex(eval_sets, ngram)

    def rewrite(self, doc: Document, counts: Counter[str]) -> str | None:
        # The lookup lives here, not in drop_reason, because only rewrite is handed the step's
        # named counts, and flag mode reports through them alone. The text is never changed.
        found = self.index.lookup(doc.text)
        if found:
            doc.meta["contaminated"] = {k: v[:MAX_IDS_IN_META] for k, v in found.items()}
            for name in found:
                counts[name] += 1
        else:  # a mark left by an earlier run over other eval sets must not decide this one
            doc.meta.pop("contaminated", None)
        return None

    def drop_reason(self, doc: Document) -> str | None:
        found = doc.meta.get("contaminated")
        if self.mode == "flag" or not found:
            return None
        order = self.index.names
        worst = max(found, key=lambda k: (len(found[k]), -order.index(k)))
        return f"contaminated:{worst}"
