"""Benchmark: BPE training cost, compression by vocabulary size, and encode throughput.

1. Training corpus: the quickstart's curated documents (the data stage is run if missing) less a
   salted-hash 10% of every source (30% of the WikiText articles) that is held out, written as
   `--mb` megabytes of JSONL that the trainer streams.
   The curated text is ~9 MB, so larger corpora are built from copies in which a seeded random
   share (0-30%) of the words is replaced by other words of the corpus: the trainer reads N MB,
   but the word diversity stays that of the shipped text (fewer distinct words than N MB of real
   text would have, so the merge phase is cheaper than it would be there).
2. For each vocab size (default 4k/32k/64k/128k) and split regex (cl100k, our default; o200k;
   gpt2, the GPT-2-style baseline trained the same way) a child process trains the tokenizer
   from the file with `frontierlm.tokenizer.train.train_tokenizer` and reports its wall time and
   peak resident memory (ru_maxrss).
3. Compression on held-out text never trained on, measured by `frontierlm.tokenizer.report`
   (what `frontierlm tokenizer report` prints): English (the held-out WikiText articles), code
   (HumanEval prompts + solutions), math (GSM8K test), non-English (Common Crawl pages of the
   shipped WARC samples and the WET record that language id calls not English): UTF-8 bytes per
   token and tokens per whitespace-separated word.
4. Encode throughput on the same text (up to `--throughput-mb`) with the `--throughput-vocab`
   cl100k tokenizer on all cores: the tokenize stage's path (`encode_part`: batched
   encode_batch_fast, ids into a token file), plain `Tokenizer.encode_batch`, and tiktoken
   (`encode_ordinary_batch` with one thread per core) built from the same vocabulary.

    python benchmarks/tokenizer.py [--mb 8] [--vocabs 4096,32768,65536,131072] [--throughput-mb 8]
    python benchmarks/tokenizer.py --train-only --mb 200 --vocabs 131072 --splits cl100k

Writes benchmarks/out/tokenizer.json and tokenizer.md (the table printed at the end).
`--train-only` measures step 2 alone (wall time, peak memory) and writes
benchmarks/out/tokenizer-train.json: the cost of training at a corpus size larger than the
shipped text, whose compression figures would measure the mutated copies, not real text.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _runs import ROOT, frontierlm

OUT = ROOT / "benchmarks" / "out"
PRETOKENIZERS = ("cl100k", "o200k", "gpt2")

CHILD = """
import json, resource, sys, time
from pathlib import Path
from frontierlm.tokenizer.train import save_tokenizer, train_tokenizer
corpus, vocab, pre, out = sys.argv[1], int(sys.argv[2]), sys.argv[3], Path(sys.argv[4])
def texts():
    with open(corpus, encoding="utf-8") as f:
        for line in f:
            yield json.loads(line)
t0 = time.perf_counter()
tok = train_tokenizer(texts(), vocab, 2, pre)
seconds = time.perf_counter() - t0
save_tokenizer(tok, out)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
print(json.dumps({"train_s": seconds, "peak_gib": peak, "vocab": tok.get_vocab_size()}))
"""


def curated(run: str) -> list[tuple[str, str, str]]:
    from frontierlm.data.documents import read_shards

    frontierlm("data", "recipes/quickstart.toml", f"--run.name={run}")
    return [(d.id, d.text, d.meta["source"]) for d in read_shards(ROOT / "runs" / run / "data")]


def write_corpus(texts: list[str], mb: float, path: Path, seed: int = 0) -> int:
    """`texts` then mutated copies of them until `mb` MB of UTF-8; returns bytes written."""
    rng = random.Random(seed)
    words = [w for t in texts[:2000] for w in t.split()][:200_000]
    target = int(mb * 1e6)
    written = 0
    with path.open("w", encoding="utf-8") as f:
        copy = 0
        while written < target:
            for text in texts:
                if copy:
                    parts = text.split(" ")
                    share = rng.uniform(0.0, 0.3)
                    for k in rng.sample(range(len(parts)), int(share * len(parts))):
                        parts[k] = rng.choice(words)
                    text = " ".join(parts)
                f.write(json.dumps(text) + "\n")
                written += len(text.encode("utf-8"))
                if written >= target:
                    break
            copy += 1
    return written


def train_all(
    corpus: Path, vocabs: list[int], work: Path, splits: tuple[str, ...] = PRETOKENIZERS
) -> dict[str, dict]:
    results = {}
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for vocab in vocabs:
        for pre in splits:
            out = work / f"{pre}-{vocab}"
            proc = subprocess.run(
                [sys.executable, "-c", CHILD, str(corpus), str(vocab), pre, str(out)],
                capture_output=True,
                text=True,
                env=env,
                check=True,
            )
            row = json.loads(proc.stdout.strip().splitlines()[-1])
            results[f"{pre}-{vocab}"] = {**row, "path": str(out), "pre": pre, "target": vocab}
            print(f"  trained {pre:6} {vocab:>7}: {row['train_s']:.1f}s, "
                  f"peak {row['peak_gib']:.2f} GiB", flush=True)  # fmt: skip
    return results


def throughput(tok_dir: Path, texts: list[str], repeats: int = 3) -> dict[str, float]:
    from frontierlm.tokenizer.export import to_tiktoken
    from frontierlm.tokenizer.shards import ENCODE_BATCH_CHARS, encode_part
    from frontierlm.tokenizer.train import load_tokenizer

    tok = load_tokenizer(tok_dir)
    enc = to_tiktoken(tok)
    cores = os.cpu_count() or 1
    mb = sum(len(t.encode("utf-8")) for t in texts) / 1e6
    batches, cur, chars = [], [], 0
    for t in texts:  # the same batches for every encoder
        cur.append(t)
        chars += len(t)
        if chars >= ENCODE_BATCH_CHARS:
            batches.append(cur)
            cur, chars = [], 0
    batches += [cur] if cur else []

    def ours() -> None:
        with tempfile.TemporaryDirectory() as d:
            docs = ((str(i), t) for i, t in enumerate(texts))
            encode_part(docs, tok, Path(d) / "part.json")

    def plain() -> None:
        for b in batches:
            [e.ids for e in tok.encode_batch(b, add_special_tokens=False)]

    def tiktoken_batch() -> None:
        for b in batches:
            enc.encode_ordinary_batch(b, num_threads=cores)

    runs = {"frontierlm tokenize": ours, "encode_batch": plain, "tiktoken": tiktoken_batch}
    best = dict.fromkeys(runs, 0.0)
    for _ in range(repeats):  # interleaved, so load from other jobs hits each alike
        for name, fn in runs.items():
            t0 = time.perf_counter()
            fn()
            best[name] = max(best[name], mb / (time.perf_counter() - t0))
    return {**best, "mb": mb, "cores": cores, "load_avg": os.getloadavg()[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=float, default=8.0, help="training corpus size")
    parser.add_argument("--vocabs", default="4096,32768,65536,131072")
    parser.add_argument("--throughput-mb", type=float, default=8.0)
    parser.add_argument("--throughput-vocab", type=int, default=32768)
    parser.add_argument("--run", default="tokbench", help="run name of the curated data")
    parser.add_argument("--splits", default=",".join(PRETOKENIZERS), help="split regexes")
    parser.add_argument(
        "--train-only", action="store_true", help="time training only (no compression/speed)"
    )
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    # The held-out sets and the compression measure are the report's
    # (`frontierlm tokenizer report`), so both measure the same text the same way.
    from frontierlm.tokenizer.report import (
        ALL_FOREIGN_FILES,
        compression,
        held_out,
        held_out_sets,
        tokenizer_encoder,
    )
    from frontierlm.tokenizer.train import load_tokenizer

    OUT.mkdir(parents=True, exist_ok=True)
    docs = curated(args.run)
    # WikiText gives more held-out English (30% of its articles); 10% of every other source.
    held = {i for i, _, s in docs if held_out(i, s)}
    train_texts = [t for i, t, _ in docs if i not in held]
    vocabs = [int(v) for v in args.vocabs.split(",")]
    splits = tuple(args.splits.split(","))
    if args.train_only:
        train_only(train_texts, args.mb, vocabs, splits)
        return
    curated_wiki = {i for i, _, s in docs if s == "wikipedia" and i in held}
    sets = held_out_sets(curated_wiki, ALL_FOREIGN_FILES)
    for name, texts in sets.items():
        print(f"  held out {name}: {len(texts)} docs, {sum(map(len, texts)) / 1e6:.2f} M chars")
    with tempfile.TemporaryDirectory(dir=OUT) as work_dir:
        work = Path(work_dir)
        corpus = work / "corpus.jsonl"
        n_bytes = write_corpus(train_texts, args.mb, corpus)
        print(f"  training corpus: {n_bytes / 1e6:.1f} MB", flush=True)
        trained = train_all(corpus, vocabs, work, splits)
        for row in trained.values():
            encode = tokenizer_encoder(load_tokenizer(Path(row["path"])))
            row["compression"] = compression(encode, sets)
        key = f"cl100k-{args.throughput_vocab}"
        if key not in trained:
            key = f"cl100k-{vocabs[-1]}"
        texts = []
        with corpus.open(encoding="utf-8") as f:
            budget = args.throughput_mb * 1e6
            for line in f:
                texts.append(json.loads(line))
                budget -= len(texts[-1].encode("utf-8"))
                if budget <= 0:
                    break
        speed = throughput(Path(trained[key]["path"]), texts)
        speed["tokenizer"] = key
    for row in trained.values():
        row.pop("path")
    result = {
        "corpus_mb": n_bytes / 1e6,
        "cores": os.cpu_count(),
        "tokenizers": trained,
        "held_out_bytes": {k: sum(len(t.encode()) for t in v) for k, v in sets.items()},
        "throughput_mb_s": speed,
    }
    (OUT / "tokenizer.json").write_text(json.dumps(result, indent=2))
    table = markdown(result)
    (OUT / "tokenizer.md").write_text(table)
    print(table)


def train_only(texts: list[str], mb: float, vocabs: list[int], splits: tuple[str, ...]) -> None:
    """Training wall time and peak memory alone, on a `mb` MB corpus (synthetic beyond the
    shipped ~9 MB): what the issue's 200 MB / 128k bar asks, without compression figures."""
    with tempfile.TemporaryDirectory(dir=OUT) as work_dir:
        work = Path(work_dir)
        corpus = work / "corpus.jsonl"
        n_bytes = write_corpus(texts, mb, corpus)
        print(f"  training corpus: {n_bytes / 1e6:.1f} MB (synthetic copies)", flush=True)
        trained = train_all(corpus, vocabs, work, splits)
    for row in trained.values():
        row.pop("path")
    result = {
        "corpus_mb": n_bytes / 1e6,
        "real_text_mb": sum(len(t.encode("utf-8")) for t in texts) / 1e6,
        "cores": os.cpu_count(),
        "load_avg": os.getloadavg()[0],
        "tokenizers": trained,
    }
    (OUT / "tokenizer-train.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


def markdown(result: dict) -> str:
    sets = list(result["held_out_bytes"])
    head = "| split | vocab | train s | peak GiB | " + " | ".join(
        f"{s} B/tok (tok/word)" for s in sets
    )
    lines = [head + " |", "|" + " --- |" * (4 + len(sets))]
    for row in result["tokenizers"].values():
        cells = [
            f"{c['bytes_per_token']:.2f} ({c['tokens_per_word']:.2f})"
            for c in (row["compression"][s] for s in sets)
        ]
        lines.append(
            f"| {row['pre']} | {row['vocab']:,} | {row['train_s']:.1f} | {row['peak_gib']:.2f} | "
            + " | ".join(cells)
            + " |"
        )
    speed = result["throughput_mb_s"]
    lines += [
        "",
        f"Training corpus {result['corpus_mb']:.1f} MB; held-out bytes {result['held_out_bytes']}.",
        "",
        f"Encode throughput, {speed['tokenizer']}, {speed['mb']:.1f} MB, {speed['cores']} cores "
        f"(load average {speed['load_avg']:.1f} at the end):",
        "",
        "| encoder | MB/s | vs tiktoken |",
        "| --- | --- | --- |",
    ]
    for name in ("frontierlm tokenize", "encode_batch", "tiktoken"):
        lines.append(f"| {name} | {speed[name]:.2f} | {speed[name] / speed['tiktoken']:.2f}x |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
