"""`frontierlm tokenizer report`: what a vocabulary buys, measured on text it was not trained on.

For each tokenizer: UTF-8 bytes per token and tokens per whitespace word on four held-out
domains read from data/ (the same sets as benchmarks/tokenizer.py, which imports them from here):
  english      WikiText-2 articles whose id hashes into the benchmark's held-out 30% (`SALT`);
               held out from the benchmark's tokenizers and from the baselines trained here.
               The quickstart tokenizer trains on all of WikiText, so for it this is in-sample.
  code         HumanEval prompts + canonical solutions
  math         GSM8K test questions + answers
  non-english  pages of the shipped web files that language id calls not English (the
               Aragonese WET page; the benchmark also scans the two Common Crawl WARCs)
Each is compared with a baseline: by default a GPT-2-split BPE of the same trained vocab size
trained the same way (`train_tokenizer`, min_frequency 2) on the curated shards beside the
tokenizer (runs/<name>/data) or, without them, the shipped training text; or `--against`
another tokenizer directory (or a tiktoken encoding name, when tiktoken can load it).

Compute: training costs ~6 N FLOPs per token for N parameters, so per byte of text it costs
6 N / (bytes per token); the ratio of two tokenizers' bytes/token is the compute saved per byte.
A larger vocabulary pays for it with 2 * d_model * vocab embedding and output-head parameters.
"""

from __future__ import annotations

import gzip
import json
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from frontierlm.tokenizer.shards import hash_fraction
from frontierlm.tokenizer.train import capped, load_tokenizer, train_tokenizer

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "data"
# The held-out split of benchmarks/tokenizer.py: the same salt selects the same articles here.
SALT = "tokenizer-bench"
ENGLISH_HELD_FRACTION = 0.3
OTHER_HELD_FRACTION = 0.1
WIKITEXT = DATA / "wikitext-2" / "valid.txt"
DOMAINS = ("english", "code", "math", "non-english")
# Reading the Common Crawl WARCs means HTML extraction (slow) and yields no non-English page
# today, so the report reads only the WET file; the benchmark passes all three.
REPORT_FOREIGN_FILES = ("whirlwind.warc.wet.gz",)
ALL_FOREIGN_FILES = (
    "commoncrawl-sample-0000.warc.gz",
    "commoncrawl-sample-0001.warc.gz",
    "whirlwind.warc.wet.gz",
)
# Column labels short enough for the FLOPs table to fit 80 columns.
SHORT = {"english": "en", "non-english": "non-en"}
BASELINE_SPLIT = "gpt2"
DEFAULT_D_MODEL = 2048
DEFAULT_PARAMS = 1e9
DEFAULT_BASELINE_CHARS = 50_000_000  # the tokenizer stage's default max_train_chars

# One batch of texts -> the token ids of each text.
EncodeBatch = Callable[[list[str]], list[list[int]]]


def held_out(doc_id: str, source: str) -> bool:
    """Whether the benchmark holds a curated document out of tokenizer training."""
    share = ENGLISH_HELD_FRACTION if source == "wikipedia" else OTHER_HELD_FRACTION
    return hash_fraction(doc_id, SALT) < share


def wikitext_articles() -> Iterator[tuple[str, str]]:
    """(id, text) of the WikiText-2 articles, ids as the data stage gives them ("wikipedia/N")."""
    from frontierlm.config import DataSource
    from frontierlm.data.documents import SourceStats
    from frontierlm.data.quality import WIKITEXT_SPLIT
    from frontierlm.data.readers import read_source

    source = DataSource(name="wikipedia", path=str(WIKITEXT), split_pattern=WIKITEXT_SPLIT)
    for doc in read_source(source, SourceStats("wikipedia")):
        yield doc.id, doc.text


def held_out_sets(
    english_ids: set[str] | None = None,
    foreign_files: Sequence[str] = REPORT_FOREIGN_FILES,
    data: Path = DATA,
) -> dict[str, list[str]]:
    """The held-out texts per domain. `english_ids` narrows English to those ids (the
    benchmark passes the held-out articles that survived curation)."""
    import py3langid

    from frontierlm.config import DataSource
    from frontierlm.data.documents import SourceStats
    from frontierlm.data.readers import read_source

    english = [
        text
        for doc_id, text in wikitext_articles()
        if held_out(doc_id, "wikipedia") and (english_ids is None or doc_id in english_ids)
    ]
    with gzip.open(data / "humaneval" / "HumanEval.jsonl.gz", "rt") as f:
        code = [(r := json.loads(line))["prompt"] + r["canonical_solution"] for line in f]
    with gzip.open(data / "gsm8k" / "test.jsonl.gz", "rt") as f:
        math = [f"Question: {r['question']}\nAnswer: {r['answer']}" for r in map(json.loads, f)]
    foreign = []
    for name in foreign_files:
        source = DataSource(name="cc", path=str(data / "web" / name))
        for doc in read_source(source, SourceStats("cc")):
            if len(doc.text) >= 200 and py3langid.classify(doc.text)[0] != "en":
                foreign.append(doc.text)
    sets = {"english": english, "code": code, "math": math, "non-english": foreign}
    return {k: v for k, v in sets.items() if v}  # a domain with no shipped text is left out


def tokenizer_encoder(tok: Tokenizer) -> EncodeBatch:
    def encode(texts: list[str]) -> list[list[int]]:
        return [e.ids for e in tok.encode_batch(texts, add_special_tokens=False)]

    return encode


def compression(encode: EncodeBatch, sets: dict[str, list[str]]) -> dict[str, dict[str, float]]:
    """Per domain: bytes, tokens, whitespace words, bytes/token and tokens/word."""
    report = {}
    for name, texts in sets.items():
        tokens = sum(len(ids) for ids in encode(texts))
        n_bytes = sum(len(t.encode("utf-8")) for t in texts)
        words = sum(len(t.split()) for t in texts)
        report[name] = {
            "bytes_per_token": n_bytes / max(tokens, 1),
            "tokens_per_word": tokens / max(words, 1),
            "bytes": n_bytes,
            "tokens": tokens,
            "words": words,
        }
    return report


@dataclass
class Subject:
    """One tokenizer under report: a name, its vocab size and how it encodes."""

    name: str
    vocab_size: int  # every id, special tokens included (the embedding table's rows)
    trained_vocab: int  # what `train_tokenizer` was asked for (core specials, bytes, merges)
    encode: EncodeBatch
    path: str | None = None
    kind: str = "tokenizer"  # tokenizer | baseline | against
    compression: dict[str, dict[str, float]] = field(default_factory=dict)


def load_subject(spec: str, kind: str = "tokenizer") -> Subject:
    """A tokenizer directory (or tokenizer.json); for `--against`, also a tiktoken encoding
    name. FileNotFoundError names the path when neither loads."""
    path = Path(spec)
    if path.exists() or kind != "against":
        tok = load_tokenizer(path)
        return Subject(
            name=_display_name(path),
            vocab_size=tok.get_vocab_size(),
            trained_vocab=tok.get_vocab_size(with_added_tokens=False),
            encode=tokenizer_encoder(tok),
            path=str(path),
            kind=kind,
        )
    try:
        import tiktoken

        enc = tiktoken.get_encoding(spec)
    except Exception as err:  # unknown name, or the encoding file cannot be downloaded
        raise FileNotFoundError(
            f"--against {spec}: no tokenizer directory at {path} and not a tiktoken encoding "
            f"that loads here ({type(err).__name__}: {str(err)[:120]})"
        ) from None

    def encode(texts: list[str]) -> list[list[int]]:
        return enc.encode_ordinary_batch(texts, num_threads=os.cpu_count() or 1)

    return Subject(spec, enc.n_vocab, enc.n_vocab, encode, None, kind)


def _display_name(path: Path) -> str:
    """runs/<name>/tokenizer -> "<name>/tokenizer": the run name tells tokenizers apart."""
    path = path.resolve()
    if path.name == "tokenizer.json":
        path = path.parent
    return f"{path.parent.name}/{path.name}" if path.parent.name else path.name


def baseline_texts(tok_dir: Path, max_chars: int) -> tuple[Iterator[str], str]:
    """What a baseline trains on, and a description of it: the curated shards beside the
    tokenizer (runs/<name>/data, what the stage trained on) or else the shipped training text
    (WikiText, Tiny Shakespeare, GSM8K train); held-out documents are skipped in both."""
    from frontierlm.data.documents import read_shards, shard_paths

    data = tok_dir.resolve().parent / "data"
    if tok_dir.is_dir() and shard_paths(data):
        docs = (
            d.text
            for d in read_shards(data)
            if not (d.meta.get("source") == "wikipedia" and held_out(d.id, "wikipedia"))
        )
        return capped(docs, max_chars), f"curated shards {data}"
    return capped(
        _shipped_training_text(), max_chars
    ), "shipped text (WikiText, Shakespeare, GSM8K)"


def _shipped_training_text() -> Iterator[str]:
    for doc_id, text in wikitext_articles():
        if not held_out(doc_id, "wikipedia"):
            yield text
    shakespeare = (DATA / "tinyshakespeare" / "input.txt").read_text(encoding="utf-8")
    yield from (shakespeare[i : i + 2000] for i in range(0, len(shakespeare), 2000))
    with gzip.open(DATA / "gsm8k" / "train.jsonl.gz", "rt") as f:
        for r in map(json.loads, f):
            yield f"Question: {r['question']}\nAnswer: {r['answer']}"


def train_baseline(subject: Subject, max_chars: int) -> Subject:
    """A GPT-2-split BPE of the subject's trained vocab size, trained the same way."""
    assert subject.path is not None
    texts, corpus = baseline_texts(Path(subject.path), max_chars)
    tok = train_tokenizer(texts, subject.trained_vocab, 2, BASELINE_SPLIT)
    return Subject(
        name=f"gpt2-split-{subject.trained_vocab}",
        vocab_size=tok.get_vocab_size(),
        trained_vocab=tok.get_vocab_size(with_added_tokens=False),
        encode=tokenizer_encoder(tok),
        path=corpus,
        kind="baseline",
    )


def flops_rows(subjects: Sequence[Subject], d_model: int, params: float) -> list[dict[str, Any]]:
    """Per tokenizer (relative to the smallest vocab): training FLOPs per byte at `params`
    parameters, the share of the smallest vocab's compute per byte on each domain, and the
    embedding + output-head parameters 2 * d_model * vocab."""
    ref = min(subjects, key=lambda s: s.vocab_size)
    rows = []
    for s in subjects:
        rows.append(
            {
                "name": s.name,
                "vocab_size": s.vocab_size,
                "reference": ref.name,
                "flops_per_byte": {
                    d: 6 * params / c["bytes_per_token"] for d, c in s.compression.items()
                },
                # < 1: fewer FLOPs per byte than the smallest vocab (it packs more bytes/token).
                "compute_vs_reference": {
                    d: ref.compression[d]["bytes_per_token"] / c["bytes_per_token"]
                    for d, c in s.compression.items()
                    if d in ref.compression
                },
                "embedding_head_params": 2 * d_model * s.vocab_size,
                "extra_embedding_head_params": 2 * d_model * (s.vocab_size - ref.vocab_size),
            }
        )
    return rows


@dataclass
class Report:
    subjects: list[Subject]
    flops: list[dict[str, Any]]
    d_model: int
    params: float
    held_out_bytes: dict[str, int]

    def to_json(self) -> dict[str, Any]:
        return {
            "d_model": self.d_model,
            "params": self.params,
            "held_out_bytes": self.held_out_bytes,
            "tokenizers": [
                {
                    "name": s.name,
                    "kind": s.kind,
                    "path": s.path,
                    "vocab_size": s.vocab_size,
                    "trained_vocab": s.trained_vocab,
                    "compression": s.compression,
                }
                for s in self.subjects
            ],
            "flops": self.flops,
        }


def build_report(
    tokenizers: Sequence[str],
    against: str | None = None,
    d_model: int = DEFAULT_D_MODEL,
    params: float = DEFAULT_PARAMS,
    baseline_chars: int = DEFAULT_BASELINE_CHARS,
    sets: dict[str, list[str]] | None = None,
    log: Callable[[str], None] = lambda _: None,
) -> Report:
    """Load every tokenizer first (a bad path fails before any training), then the baselines
    (one per distinct trained vocab size, or the single `against`), then measure."""
    subjects = [load_subject(t) for t in tokenizers]
    if against is not None:
        baselines = [load_subject(against, "against")]
    else:
        by_vocab: dict[int, Subject] = {}
        for s in subjects:
            if s.trained_vocab not in by_vocab:
                log(f"training the gpt2-split baseline of {s.trained_vocab:,} tokens")
                by_vocab[s.trained_vocab] = train_baseline(s, baseline_chars)
        baselines = list(by_vocab.values())
    sets = held_out_sets() if sets is None else sets
    for s in [*subjects, *baselines]:
        s.compression = compression(s.encode, sets)
    return Report(
        subjects=[*subjects, *baselines],
        flops=flops_rows(subjects, d_model, params),
        d_model=d_model,
        params=params,
        held_out_bytes={k: sum(len(t.encode("utf-8")) for t in v) for k, v in sets.items()},
    )


def write_report(report: Report, out: Path) -> tuple[Path, Path]:
    """report.json and report.png, each written beside itself and renamed into place."""
    from frontierlm.atomic import write_text

    out.mkdir(parents=True, exist_ok=True)
    json_path, png_path = out / "report.json", out / "report.png"
    write_text(json_path, json.dumps(report.to_json(), indent=2))
    tmp = png_path.with_name(f".tmp-{png_path.name}")
    _plot(report, tmp)
    os.replace(tmp, png_path)
    return json_path, png_path


def _plot(report: Report, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    domains = [d for d in DOMAINS if d in report.held_out_bytes]
    n = len(report.subjects)
    width = 0.8 / max(n, 1)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(domains) + 0.4 * n), 4.5))
    for i, s in enumerate(report.subjects):
        xs = [j + (i - (n - 1) / 2) * width for j in range(len(domains))]
        ys = [s.compression[d]["bytes_per_token"] for d in domains]
        hatch = "//" if s.kind != "tokenizer" else None
        ax.bar(xs, ys, width, label=f"{s.name} ({s.vocab_size:,})", hatch=hatch)
    ax.set_xticks(range(len(domains)), domains)
    ax.set_ylabel("UTF-8 bytes per token (higher = fewer tokens)")
    ax.set_title("Compression on held-out text")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)


def print_report(report: Report, paths: Iterable[Path] = ()) -> None:
    """Two tables sized for an 80-column terminal (rich folds a long name rather than cut a
    number column): compression per domain, then compute per byte and embedding cost."""
    from rich.table import Table

    from frontierlm.console import console

    domains = [d for d in DOMAINS if d in report.held_out_bytes]
    table = Table(title="bytes/token (tokens/word) on held-out text")
    table.add_column("tokenizer", overflow="fold")
    table.add_column("vocab", justify="right")
    for d in domains:
        table.add_column(f"{d}\n{report.held_out_bytes[d] / 1e3:,.0f} KB", justify="right")
    for s in report.subjects:
        cells = [
            f"{s.compression[d]['bytes_per_token']:.3f}\n({s.compression[d]['tokens_per_word']:.2f})"
            for d in domains
        ]
        label = s.name if s.kind == "tokenizer" else f"{s.name} ({s.kind})"
        table.add_row(label, f"{s.vocab_size:,}", *cells)
    console.print(table)

    ref = report.flops[0]["reference"] if report.flops else ""
    flops = Table(
        title=f"training FLOPs per byte = 6N / (bytes/token), as a share of {ref}'s "
        f"(N = {report.params:.3g}); embedding + head = 2 x d_model ({report.d_model}) x vocab"
    )
    flops.add_column("tokenizer", overflow="fold")
    flops.add_column("vocab", justify="right")
    for d in domains:
        flops.add_column(SHORT.get(d, d), justify="right")
    flops.add_column("emb+head", justify="right")
    for row in report.flops:
        flops.add_row(
            row["name"],
            f"{row['vocab_size']:,}",
            *(f"{row['compute_vs_reference'][d]:.3f}x" for d in domains),
            f"{row['embedding_head_params'] / 1e6:,.1f}M",
        )
    console.print(flops)
    console.print(
        "  < 1x: the share of the smallest vocab's training compute per byte of text; the "
        "embedding and output head hold 2 x d_model x vocab parameters."
    )
    for row in report.flops:
        english = row["flops_per_byte"].get("english")
        per_byte = f"{english:.3g} FLOPs per English byte, " if english is not None else ""
        console.print(
            f"  {row['name']}: {per_byte}"
            f"+{row['extra_embedding_head_params'] / 1e6:,.1f}M embedding/head parameters"
        )
    for p in paths:
        console.print(f"  wrote {p}")
