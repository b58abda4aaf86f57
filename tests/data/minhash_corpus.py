"""A near-duplicate test corpus from the shipped documents, shared by the MinHash tests and
`benchmarks/minhash.py`: real texts of several kinds plus mutated copies of some of them."""

from __future__ import annotations

import gzip
import json
import random
from pathlib import Path


def shipped_texts(data: Path, gsm: int = 1000, shakespeare_chars: int = 300_000) -> list[str]:
    """cc_net web pages, WikiText-2 paragraphs (>= 30 words), Shakespeare in ~1000-char groups
    of speeches, GSM8K problems with their answers: ~2,900 documents of 30-800 words."""
    texts = []
    with open(data / "web/cc_en_head-0091.jsonl", encoding="utf-8") as f:
        texts += [json.loads(line)["text"] for line in f if line.strip()]
    with open(data / "wikitext-2/valid.txt", encoding="utf-8") as f:
        texts += [line.strip() for line in f if len(line.split()) >= 30]
    play = (data / "tinyshakespeare/input.txt").read_text(encoding="utf-8")[:shakespeare_chars]
    group: list[str] = []
    for speech in play.split("\n\n"):
        group.append(speech)
        if sum(map(len, group)) >= 1000:
            texts.append("\n\n".join(group))
            group = []
    with gzip.open(data / "gsm8k/train.jsonl.gz", "rt", encoding="utf-8") as f:
        for _, line in zip(range(gsm), f, strict=False):
            record = json.loads(line)
            texts.append(f"Question: {record['question']}\nAnswer: {record['answer']}")
    return texts


def mutate(text: str, rate: float, vocab: list[str], rng: random.Random) -> str:
    """Delete or replace (half each) about `rate` of the words, like boilerplate drift,
    typo fixes or a changed date between two crawls of one page."""
    out = []
    for word in text.split():
        r = rng.random()
        if r < rate / 2:
            continue
        out.append(rng.choice(vocab) if r < rate else word)
    return " ".join(out)


def near_duplicate_corpus(
    data: Path, copies: int = 400, max_rate: float = 0.06, seed: int = 0, **kw: int
) -> list[str]:
    """The shipped texts plus `copies` mutated copies of randomly chosen ones (edit rates
    uniform in [0, max_rate], so true similarities spread across the 0.8 threshold; a text can
    be copied more than once), all shuffled into one stream."""
    rng = random.Random(seed)
    texts = shipped_texts(data, **kw)
    vocab = sorted({w for t in texts[:500] for w in t.split()})
    for _ in range(copies):
        source = rng.choice(texts)
        texts.append(mutate(source, rng.uniform(0.0, max_rate), vocab, rng))
    rng.shuffle(texts)
    return texts
