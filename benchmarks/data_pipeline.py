"""Web filters + MinHash: FrontierLM's data steps against datatrove's, per core, same input.

Claim (issue 5): FrontierLM's filters + MinHash process >= 1.5x the documents per second per core
of datatrove 0.10.1 on the same machine and input, with the same keep/drop decisions.

Input: every shipped web source (data/web/ and /work/shared/data/web/: WARC pages extracted by
`frontierlm.data.readers.read_source`, plus the cc_net JSONL files), extracted once and cached as
benchmarks/out/data_pipeline_base.jsonl, then replicated with seeded light mutations (a few
words deleted or replaced per copy, lines kept) to `--docs` documents, so the timings are
stable and MinHash has near-duplicates to find. Both sides read the same JSONL file.

Both sides run in one process (one core), in FineWeb's order: URL filter -> Gopher repetition
-> Gopher quality -> C4 (FineWeb's settings: terminal-punctuation rule off) -> FineWeb ->
MinHash (word 5-grams, 14 bands x 8 rows, every bucket collision a duplicate). Language id is
left out on both sides: datatrove's needs a fastText model download (no network here).

- FrontierLM: the steps `build_steps` returns for that DataConfig (length/alpha thresholds at 0,
  exact dedup off, minhash_verify="none"), from reading the JSONL to writing the kept documents.
- datatrove: JsonlReader -> the five filters -> JsonlWriter -> MinhashDedupSignature, then
  MinhashDedupBuckets (14 tasks), MinhashDedupCluster, JsonlReader -> MinhashDedupFilter ->
  JsonlWriter, in a temporary directory, steps called directly in this process (what
  LocalPipelineExecutor(tasks=1, workers=1) runs, without its logging). Imports are not timed.

Agreement: a pass-through probe between the stages records which documents enter and leave
each stage on both sides; per stage, the share of documents reaching it on both sides that get
the same decision, and the Jaccard similarity of the two MinHash removed sets.

    PYTHONPATH=. python benchmarks/data_pipeline.py [--docs 2000] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "data"))
from datatrove_reference import datatrove_url_filter

from frontierlm.config import C4Config, DataConfig, DataSource
from frontierlm.data import build_steps
from frontierlm.data.documents import Document, SourceStats
from frontierlm.data.pipeline import StepStats
from frontierlm.data.readers import read_source

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data" / "web"
OUT = ROOT / "benchmarks" / "out"
FILTERS = ["url", "gopher_repetition", "gopher_quality", "c4", "fineweb"]
STAGES = [*FILTERS, "minhash"]
BANDS, ROWS, NGRAM = 14, 8, 5


# ----------------------------------------------------------------------------- input


def _sources() -> list[DataSource]:
    """Every shipped web file, as tests/data/test_web_filters_reference.py reads them; a JSONL
    file present in both places (same bytes) is read once."""
    paths = sorted((ROOT / "data" / "web").glob("*.warc.gz"))
    paths += sorted((ROOT / "data" / "web").glob("*.jsonl"))
    if SHARED.is_dir():
        paths += sorted(SHARED.glob("*.warc.gz")) + sorted(SHARED.glob("commoncrawl/*.warc.gz"))
        names = {p.name for p in paths}
        paths += [p for p in sorted(SHARED.glob("commoncrawl/*.jsonl")) if p.name not in names]
    sources = []
    for i, path in enumerate(paths):
        extra = {"id_field": "id"} if path.suffix == ".jsonl" else {}
        sources.append(DataSource(name=f"s{i}", path=str(path), **extra))
    return sources


def base_documents(refresh: bool) -> list[dict[str, Any]]:
    """The shipped pages' text (extracted once, cached), as {"id", "text", "metadata"}."""
    cache = OUT / "data_pipeline_base.jsonl"
    if cache.exists() and not refresh:
        with open(cache, encoding="utf-8") as f:
            return [json.loads(line) for line in f]
    records = []
    for source in _sources():
        for doc in read_source(source, SourceStats(source.name), workers=2):
            if doc.text.strip():
                # cc_net records carry their page URL as the id; datatrove's URL filter
                # requires a URL on every document, so pages without one are left out.
                url = doc.meta.get("url") or (doc.id if doc.id.startswith("http") else None)
                if url:
                    doc_id = f"{source.name}/{doc.id}"
                    records.append({"id": doc_id, "text": doc.text, "metadata": {"url": url}})
    cache.parent.mkdir(parents=True, exist_ok=True)
    with open(cache, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    return records


def _mutate(text: str, rng: random.Random, rate: float) -> str:
    """Delete or replace about `rate` of the words, line by line (line structure is what the
    Gopher/C4/FineWeb rules read, so it stays)."""
    lines = []
    for line in text.split("\n"):
        words = line.split(" ")
        out = []
        for word in words:
            roll = rng.random()
            if roll < rate / 2:
                continue
            out.append(rng.choice(words) if roll < rate else word)
        lines.append(" ".join(out))
    return "\n".join(lines)


def replicated(base: list[dict[str, Any]], total: int, seed: int) -> list[dict[str, Any]]:
    """The base documents, then mutated copies of random ones (0-6% of words changed) up to
    `total`, shuffled so that copies are spread over the stream."""
    rng = random.Random(seed)
    # A page can occur twice (in two WARC files, or twice in one): ids must be unique for the
    # probes, so repeats get a suffix (they stay exact duplicates for MinHash to find).
    seen: Counter[str] = Counter()
    records = []
    for record in base:
        seen[record["id"]] += 1
        n = seen[record["id"]]
        records.append(record if n == 1 else {**record, "id": f"{record['id']}#{n}"})
    for k in range(max(0, total - len(base))):
        src = rng.choice(records)
        text = _mutate(src["text"], rng, rng.uniform(0.0, 0.06))
        records.append({"id": f"{src['id']}#copy{k}", "text": text, "metadata": src["metadata"]})
    rng.shuffle(records)
    return records


# ----------------------------------------------------------------------------- probes


class Probe:
    """Records the id of every document passing a point of a stream, without touching it."""

    def __init__(self) -> None:
        self.ids: list[str] = []

    def wrap(self, docs: Iterable[Any], key: Any) -> Iterator[Any]:
        append = self.ids.append
        for doc in docs:
            append(key(doc))
            yield doc


# ----------------------------------------------------------------------------- FrontierLM


def ours_config() -> DataConfig:
    return DataConfig(
        sources=[DataSource(name="bench", path=str(OUT))],
        # No length/alpha/exact-dedup step on the datatrove side: thresholds at 0 keep all.
        min_chars=0,
        min_words=0,
        min_alpha_fraction=0.0,
        dedup=False,
        filters=FILTERS,
        c4=C4Config(filter_no_terminal_punct=False),
        minhash=True,
        minhash_bands=BANDS,
        minhash_rows=ROWS,
        minhash_ngram=NGRAM,
        minhash_verify="none",
    )


def read_jsonl(path: Path) -> Iterator[Document]:
    with open(path, encoding="utf-8") as f:
        for line in f:
            record = json.loads(line)
            yield Document(record["id"], record["text"], record["metadata"])


def run_ours(path: Path, work: Path) -> tuple[float, list[Probe], list[StepStats], int]:
    """Seconds, one probe before each stage plus one after the last, the step stats and the
    number of documents written."""
    steps = build_steps(ours_config(), work)
    names = [s.name for s in steps]
    assert names == ["length", "alpha", *STAGES], names
    probes = [Probe() for _ in range(len(STAGES) + 1)]
    stats = [StepStats(s.name) for s in steps]
    start = time.perf_counter()
    stream: Iterable[Document] = read_jsonl(path)
    for i, (step, step_stats) in enumerate(zip(steps, stats, strict=True)):
        if i >= 2:
            stream = probes[i - 2].wrap(stream, _doc_id)
        stream = step.process(stream, step_stats)
    written = 0
    with open(work / "ours-out.jsonl", "w", encoding="utf-8") as f:
        for doc in probes[-1].wrap(stream, _doc_id):
            record = {"id": doc.id, "text": doc.text, "meta": doc.meta}
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
            written += 1
    return time.perf_counter() - start, probes, stats, written


def _doc_id(doc: Any) -> str:
    return doc.id


# ----------------------------------------------------------------------------- datatrove


def _drain(result: Any) -> None:
    if result is not None:
        for _ in result:
            pass


def run_datatrove(path: Path, work: Path) -> tuple[float, list[Probe], int]:
    """Seconds, the probes (as for `run_ours`) and the number of documents written."""
    from datatrove.pipeline.dedup import (
        MinhashDedupBuckets,
        MinhashDedupCluster,
        MinhashDedupFilter,
        MinhashDedupSignature,
    )
    from datatrove.pipeline.dedup.minhash import MinhashConfig
    from datatrove.pipeline.filters import (
        C4QualityFilter,
        FineWebQualityFilter,
        GopherQualityFilter,
        GopherRepetitionFilter,
    )
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.writers import JsonlWriter
    from datatrove.utils.hashing import HashConfig
    from xxhash import xxh64_intdigest

    config = MinhashConfig(
        n_grams=NGRAM,
        num_buckets=BANDS,
        hashes_per_bucket=ROWS,
        hash_config=HashConfig(precision=64, hash_fc="xxhash"),
    )
    url = datatrove_url_filter()
    filters = [
        url,
        GopherRepetitionFilter(),
        GopherQualityFilter(),
        C4QualityFilter(filter_no_terminal_punct=False),
        FineWebQualityFilter(),
    ]
    src, filtered, sigs = work / "in", work / "filtered", work / "sigs"
    buckets, clusters, final = work / "buckets", work / "clusters", work / "final"
    src.mkdir()
    (src / path.name).symlink_to(path.resolve())
    probes = [Probe() for _ in range(len(STAGES) + 1)]
    key = _doc_id

    start = time.perf_counter()
    # Stage 1: filters, then the kept documents written and signed.
    stream: Any = JsonlReader(str(src))(None)
    for probe, step in zip(probes, filters, strict=False):
        stream = step(probe.wrap(stream, key))
    stream = JsonlWriter(str(filtered), output_filename="${rank}.jsonl", compression=None)(
        probes[len(FILTERS)].wrap(stream, key)
    )
    signer = MinhashDedupSignature(str(sigs), config=config)
    # datatrove's xxhash64 passes a str, which the installed xxhash (4.1) refuses; the same
    # function on the UTF-8 bytes (what xxhash did with a str before).
    signer._hash_func = lambda text: xxh64_intdigest(text.encode("utf-8"))
    _drain(signer(stream))
    # Stages 2-3: one bucket task per band, then the clustering.
    for bucket in range(BANDS):
        _drain(MinhashDedupBuckets(str(sigs), str(buckets), config=config)(None, bucket, BANDS))
    _drain(MinhashDedupCluster(str(buckets), str(clusters), config=config)(None))
    # Stage 4: the filtered documents again, without the duplicates.
    stream = MinhashDedupFilter(str(clusters))(JsonlReader(str(filtered), compression=None)(None))
    writer = JsonlWriter(str(final), output_filename="${rank}.jsonl", compression=None)
    _drain(writer(probes[-1].wrap(stream, key)))
    seconds = time.perf_counter() - start
    return seconds, probes, len(probes[-1].ids)


# ----------------------------------------------------------------------------- report


def agreement(ours: list[Probe], theirs: list[Probe]) -> list[dict[str, Any]]:
    """Per stage: documents reaching it on both sides, the share given the same decision,
    documents dropped by each side, and the Jaccard similarity of the dropped sets."""
    rows = []
    for i, stage in enumerate(STAGES):
        in_o, out_o = set(ours[i].ids), set(ours[i + 1].ids)
        in_t, out_t = set(theirs[i].ids), set(theirs[i + 1].ids)
        both = in_o & in_t
        same = sum((d in out_o) == (d in out_t) for d in both)
        drop_o, drop_t = (in_o - out_o) & both, (in_t - out_t) & both
        union = drop_o | drop_t
        rows.append(
            {
                "stage": stage,
                "reached_both": len(both),
                "same_decision": same,
                "agreement": round(same / len(both), 4) if both else 1.0,
                "dropped_ours": len(in_o - out_o),
                "dropped_datatrove": len(in_t - out_t),
                "dropped_jaccard": round(len(drop_o & drop_t) / len(union), 4) if union else 1.0,
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--docs", type=int, default=2000, help="documents after replication")
    parser.add_argument("--seed", type=int, default=0, help="seed of the mutated copies")
    parser.add_argument("--refresh", action="store_true", help="extract the web pages again")
    parser.add_argument("--out", default=str(OUT / "data_pipeline.json"))
    args = parser.parse_args()

    base = base_documents(args.refresh)
    records = replicated(base, args.docs, args.seed)
    path = OUT / "data_pipeline_input.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    n, chars = len(records), sum(len(r["text"]) for r in records)
    print(
        f"{n:,} documents ({len(base):,} extracted + {n - len(base):,} mutated copies), "
        f"{chars / 1e6:.1f}M characters -> {path}"
    )

    import datatrove  # noqa: F401  (imported before the clock starts)

    with tempfile.TemporaryDirectory(prefix="bench-dt-") as tmp:
        dt_s, dt_probes, dt_kept = run_datatrove(path, Path(tmp))
    with tempfile.TemporaryDirectory(prefix="bench-ours-") as tmp:
        our_s, our_probes, our_stats, our_kept = run_ours(path, Path(tmp))

    rows = agreement(our_probes, dt_probes)
    dt_rate, our_rate = n / dt_s, n / our_s
    header = f"{'side':34s} {'seconds':>8s} {'docs/s/core':>12s} {'kept':>6s} {'x datatrove':>12s}"
    print(header)
    print("-" * len(header))
    print(
        f"{'datatrove 0.10.1 (filters+minhash)':34s} {dt_s:8.1f} {dt_rate:12.1f} "
        f"{dt_kept:6d} {1.0:12.2f}"
    )
    print(
        f"{'frontierlm build_steps':34s} {our_s:8.1f} {our_rate:12.1f} "
        f"{our_kept:6d} {our_rate / dt_rate:12.2f}"
    )
    print()
    header = (
        f"{'stage':18s} {'reached':>8s} {'agree':>8s} {'drop ours':>10s} "
        f"{'drop dt':>8s} {'drop J':>7s} {'our s':>7s}"
    )
    print(header)
    print("-" * len(header))
    seconds = {s.name: s.seconds for s in our_stats}
    for r in rows:
        print(
            f"{r['stage']:18s} {r['reached_both']:8d} {r['agreement']:8.2%} "
            f"{r['dropped_ours']:10d} {r['dropped_datatrove']:8d} {r['dropped_jaccard']:7.3f} "
            f"{seconds[r['stage']]:7.1f}"
        )

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": platform.processor() or platform.machine(),
        "docs": n,
        "docs_extracted": len(base),
        "chars": chars,
        "seed": args.seed,
        "stages": STAGES,
        "minhash": {"bands": BANDS, "rows": ROWS, "ngram": NGRAM, "verify": "none"},
        "datatrove": {
            "seconds": round(dt_s, 2),
            "docs_per_s_per_core": round(dt_rate, 1),
            "kept": dt_kept,
        },
        "frontierlm": {
            "seconds": round(our_s, 2),
            "docs_per_s_per_core": round(our_rate, 1),
            "kept": our_kept,
            "steps": [s.to_dict() for s in our_stats],
        },
        "ratio": round(our_rate / dt_rate, 3),
        "agreement": rows,
    }
    out.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"ratio {our_rate / dt_rate:.2f}x; wrote {out}")


if __name__ == "__main__":
    main()
