"""The tokenizer stages: train byte-level BPE on the curated text, encode it into token shards."""

from __future__ import annotations

import json
import shutil
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.table import Table
from tokenizers import Tokenizer

from frontierlm.console import console, progress_bar
from frontierlm.data.documents import read_shard, read_shards, shard_paths
from frontierlm.eval.bpb import UnigramLM, bits_per_byte, sequential_windows
from frontierlm.stages import StageContext
from frontierlm.tokenizer.shards import (
    PART_META,
    UNKNOWN_SOURCE,
    EncodedPart,
    SourcePlan,
    TokenSplit,
    assemble_token_shards,
    batched,
    encode_part,
    fit_unigram,
)
from frontierlm.tokenizer.train import (
    capped,
    load_tokenizer,
    save_tokenizer,
    token_byte_lengths,
    train_tokenizer,
)

REPORT_BATCH = 1024  # documents per encode_batch call of the compression report


def run_tokenizer_stage(ctx: StageContext) -> dict[str, Any]:
    cfg = ctx.cfg.tokenizer
    t0 = time.perf_counter()
    # A generator: the trainer counts words chunk by chunk while the shards are read, so the
    # curated corpus is never held in memory as one list.
    texts = capped((d.text for d in read_shards(ctx.path("data"))), cfg.max_train_chars)
    tok = train_tokenizer(
        texts, cfg.vocab_size, cfg.min_frequency, cfg.pre_tokenizer, cfg.reserved_special_tokens
    )
    train_s = time.perf_counter() - t0
    save_tokenizer(tok, ctx.work_dir)

    # Compression report: UTF-8 bytes per token on each source's curated text, a second pass
    # over the shards encoded a batch at a time.
    per_source: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for docs in batched(read_shards(ctx.path("data")), REPORT_BATCH):
        encodings = tok.encode_batch([d.text for d in docs], add_special_tokens=False)
        for doc, enc in zip(docs, encodings, strict=True):
            counts = per_source[doc.meta.get("source", "?")]
            counts[0] += len(doc.text.encode("utf-8"))
            counts[1] += len(enc.ids)
    report = {
        src: {"bytes": b, "tokens": t, "bytes_per_token": b / max(t, 1)}
        for src, (b, t) in sorted(per_source.items())
    }
    total_bytes = sum(v["bytes"] for v in report.values())
    total_tokens = sum(v["tokens"] for v in report.values())
    (ctx.work_dir / "compression.json").write_text(json.dumps(report, indent=2))
    for src, row in report.items():
        console.print(f"  {src:<16} {row['bytes_per_token']:.2f} bytes/token")
    return {
        "vocab_size": tok.get_vocab_size(),
        "train_s": round(train_s, 2),
        "bytes_per_token": total_bytes / max(total_tokens, 1),
        "compression": {src: round(v["bytes_per_token"], 3) for src, v in report.items()},
    }


def run_tokenize_stage(ctx: StageContext) -> dict[str, Any]:
    tok = load_tokenizer(ctx.path("tokenizer"))
    # The data stage records each document's input; grouping inputs into token sources and
    # repeating them happens here, so changing either re-encodes without re-curating.
    plans = {s.name: SourcePlan(s.token_source, s.epochs) for s in ctx.cfg.data.sources}
    parts = encode_shards(shard_paths(ctx.path("data")), tok, ctx.work_dir / "parts")
    counts = assemble_token_shards(
        parts, tok, ctx.work_dir, ctx.cfg.tokenize.val_fraction, plans, ctx.cfg.run.seed
    )
    # The parts are the token shards again, in another order: not kept once assembled.
    shutil.rmtree(ctx.work_dir / "parts")
    train = TokenSplit.open(ctx.work_dir, "train").tokens
    val = TokenSplit.open(ctx.work_dir, "val").tokens
    log_probs = fit_unigram(train, tok.get_vocab_size())
    np.save(ctx.work_dir / "unigram.npy", log_probs)
    lengths = torch.tensor(token_byte_lengths(tok))
    whole_val = sequential_windows(val, 1024, 16, max_batches=len(val) // (1024 * 16) + 1)
    unigram = bits_per_byte(UnigramLM(log_probs), whole_val, lengths, torch.device("cpu"))["bpb"]
    console.print(token_sources_table(counts))
    console.print(
        f"  train {counts['train_tokens']:,} tokens / {counts['train_docs']:,} docs, "
        f"val {counts['val_tokens']:,} tokens; unigram val bpb {unigram:.4f}"
    )
    return {**counts, "unigram_val_bpb": unigram}


def encode_shards(shards: list[Path], tok: Tokenizer, part_dir: Path) -> list[EncodedPart]:
    """Encode each curated shard into its own part under `part_dir`, skipping parts a killed
    run already finished (the stage's `.partial` directory survives while its fingerprint
    matches), with a progress bar in tokens/s."""
    part_dir.mkdir(parents=True, exist_ok=True)
    parts: list[EncodedPart] = []
    with progress_bar() as bar:
        task = bar.add_task("tokenize", total=len(shards), info="")
        t0 = time.perf_counter()
        done = 0

        def report(tokens: int) -> None:
            nonlocal done
            done += tokens
            rate = done / max(time.perf_counter() - t0, 1e-9)
            bar.update(task, info=f"{done:,} tokens, {rate:,.0f} tokens/s")

        resumed = 0
        for shard in shards:
            meta = part_dir / f"{shard.name.split('.')[0]}{PART_META}"
            if meta.is_file():
                parts.append(EncodedPart.open(meta))
                resumed += 1
            else:
                docs = (
                    (d.id, d.text, d.meta.get("source", UNKNOWN_SOURCE)) for d in read_shard(shard)
                )
                parts.append(encode_part(docs, tok, meta, on_batch=report))
            bar.advance(task)
    if resumed:
        console.print(f"  {resumed} of {len(shards)} shards were encoded by an earlier run: kept")
    return parts


def token_sources_table(counts: dict[str, Any]) -> Table:
    """Training tokens per token source after epochs, their share, and the epochs behind them."""
    table = Table(title="token sources (train split)")
    table.add_column("token source")
    table.add_column("inputs")
    for column in ("docs", "tokens", "share", "epochs"):
        table.add_column(column, justify="right")
    total = max(counts["train_tokens"], 1)
    for name, row in counts["epochs_by_source"].items():
        inputs = ", ".join(k if e == 1.0 else f"{k} x{e:g}" for k, e in row["inputs"].items())
        table.add_row(
            name,
            inputs or "-",
            f"{row['documents_after']:,}",
            f"{row['tokens_after']:,}",
            f"{row['tokens_after'] / total:.1%}",
            f"{row['effective_epochs']:.2f}",
        )
    return table
