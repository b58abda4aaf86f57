"""MinHash dedup: documents/s and agreement with exact Jaccard, against datasketch in the same run.

Claim: `MinHashDedup` (14 bands x 8 rows, word 5-grams, on-disk spill and bucket merge) is
faster than datasketch's MinHash + MinHashLSH with the same bands and rows, and with exact
verification finds the pairs of exact Jaccard >= 0.8 at precision and recall >= 0.95.

Corpus: the shipped documents (cc_net pages, WikiText-2 paragraphs, Shakespeare, GSM8K) plus
mutated copies (0-6% of words deleted or replaced), as in tests/data/test_minhash.py.

    PYTHONPATH=. python benchmarks/minhash.py [--copies 1000] [--gsm 7473]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from datasketch import MinHash, MinHashLSH

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "data"))

from minhash_corpus import near_duplicate_corpus  # noqa: E402

from frontierlm.data.dedup import normalize  # noqa: E402
from frontierlm.data.documents import Document  # noqa: E402
from frontierlm.data.minhash import (  # noqa: E402
    MinHashDedup,
    MinHasher,
    UnionFind,
    candidate_pairs,
    exact_jaccard_pairs,
    jaccard,
)
from frontierlm.data.pipeline import StepStats  # noqa: E402

BANDS, ROWS, NGRAM, THRESHOLD = 14, 8, 5, 0.8


def datasketch_pairs(texts: list[str]) -> tuple[set[tuple[int, int]], float, float]:
    """Candidate pairs from datasketch (sha1 per shingle, MinHashLSH with params=(14, 8)),
    and the seconds spent signing and bucketing."""
    start = time.perf_counter()
    sigs = []
    for text in texts:
        words = normalize(text).split()
        n = min(NGRAM, len(words))
        grams = [" ".join(words[i : i + n]).encode() for i in range(len(words) - n + 1)]
        m = MinHash(num_perm=BANDS * ROWS, seed=1)
        m.update_batch(grams)
        sigs.append(m)
    signed = time.perf_counter()
    lsh = MinHashLSH(num_perm=BANDS * ROWS, params=(BANDS, ROWS))
    pairs: set[tuple[int, int]] = set()
    for j, m in enumerate(sigs):
        for key in lsh.query(m):
            pairs.add((int(key), j))
        lsh.insert(str(j), m)
    return pairs, signed - start, time.perf_counter() - signed


def ours(texts: list[str], verify: str, scratch: Path) -> tuple[MinHashDedup, float]:
    step = MinHashDedup(BANDS, ROWS, NGRAM, verify=verify, threshold=THRESHOLD, work_dir=scratch)
    start = time.perf_counter()
    docs = (Document(str(i), t) for i, t in enumerate(texts))
    for _ in step.process(docs, StepStats(step.name)):
        pass
    return step, time.perf_counter() - start


def pr(pred: set, truth: set) -> tuple[float, float]:
    hits = len(pred & truth)
    return hits / max(len(pred), 1), hits / max(len(truth), 1)


def dropped(roots: np.ndarray) -> set[int]:
    return set(np.flatnonzero(roots != np.arange(len(roots))).tolist())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--copies", type=int, default=1000, help="mutated copies added")
    parser.add_argument("--gsm", type=int, default=7473, help="GSM8K problems used")
    parser.add_argument("--out", default=str(ROOT / "benchmarks/out/minhash.json"))
    args = parser.parse_args()

    texts = near_duplicate_corpus(ROOT / "data", copies=args.copies, gsm=args.gsm)
    words = sum(len(t.split()) for t in texts)
    hasher = MinHasher(BANDS, ROWS, NGRAM)
    sets = [hasher.shingles(t) for t in texts]
    truth = exact_jaccard_pairs(sets, THRESHOLD)
    uf = UnionFind(len(texts))
    for i, j in truth:
        uf.union(i, j)
    truth_dropped = dropped(uf.roots())

    scratch = ROOT / "benchmarks/out/minhash-scratch"
    scratch.mkdir(parents=True, exist_ok=True)
    rows = []
    ds_pairs, ds_sign, ds_lsh = datasketch_pairs(texts)
    ds_uf = UnionFind(len(texts))
    for i, j in ds_pairs:
        ds_uf.union(i, j)
    p, r = pr(ds_pairs, set(truth))
    dp, dr = pr(dropped(ds_uf.roots()), truth_dropped)
    base_s = ds_sign + ds_lsh
    rows.append(("datasketch MinHash+MinHashLSH", base_s, p, r, dp, dr))
    # The step keeps no pair list; its pairs are recomputed (untimed) from the same hash
    # functions: every shared bucket, then (verify=exact) those of exact Jaccard >= 0.8.
    lsh = candidate_pairs(hasher, np.stack([hasher.signature(s) for s in sets]))
    our_pairs = {
        "none": lsh,
        "exact": {(i, j) for i, j in lsh if jaccard(sets[i], sets[j]) >= THRESHOLD},
    }
    for verify in ("none", "exact"):
        step, seconds = ours(texts, verify, scratch)
        p, r = pr(our_pairs[verify], set(truth))
        dp, dr = pr(dropped(step.cluster_root), truth_dropped)
        rows.append((f"frontierlm MinHashDedup verify={verify}", seconds, p, r, dp, dr))

    print(f"{len(texts):,} documents, {words:,} words, {len(truth)} pairs with J >= {THRESHOLD}")
    header = f"{'method':40s} {'docs/s':>9s} {'x base':>7s} {'pair P/R':>12s} {'drop P/R':>12s}"
    print(header)
    print("-" * len(header))
    report_rows = []
    for name, seconds, p, r, dp, dr in rows:
        rate = len(texts) / seconds
        pairs = f"{p:.3f}/{r:.3f}"
        print(f"{name:40s} {rate:9.0f} {base_s / seconds:7.2f} {pairs:>12s} {dp:.3f}/{dr:.3f}")
        report_rows.append(
            {
                "method": name,
                "seconds": round(seconds, 3),
                "docs_per_s": round(rate, 1),
                "speedup_vs_datasketch": round(base_s / seconds, 2),
                "pair_precision": round(p, 4),
                "pair_recall": round(r, 4),
                "drop_precision": round(dp, 4),
                "drop_recall": round(dr, 4),
            }
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": platform.processor() or platform.machine(),
        "docs": len(texts),
        "words": words,
        "true_pairs": len(truth),
        "bands": BANDS,
        "rows_per_band": ROWS,
        "ngram": NGRAM,
        "threshold": THRESHOLD,
        "datasketch_sign_s": round(ds_sign, 3),
        "datasketch_lsh_s": round(ds_lsh, 3),
        "rows": report_rows,
    }
    out.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
