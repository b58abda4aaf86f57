"""The `data` stage: raw sources -> filtered, deduplicated document shards + stats.json."""

from __future__ import annotations

import json
import shutil
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from rich.markup import escape
from rich.table import Table

from frontierlm.config import WEB_FILTER_ORDER, DataConfig, DataSource
from frontierlm.console import console, progress_bar
from frontierlm.data.decontam import Decontaminate
from frontierlm.data.dedup import ExactDedup
from frontierlm.data.documents import (
    MAX_MESSAGES,
    DataError,
    Document,
    SourceStats,
    read_shards,
    write_shards,
)
from frontierlm.data.executor import (
    TASK_DIR,
    ReadTask,
    TaskResult,
    plan_tasks,
    read_task_output,
    resolved_workers,
    run_tasks,
    split_steps,
)
from frontierlm.data.filters import AlphaFilter, LengthFilter
from frontierlm.data.line_dedup import LineDedup
from frontierlm.data.minhash import MinHashDedup
from frontierlm.data.pii import PIIRedact
from frontierlm.data.pipeline import Step, StepStats, run_steps, steps_table
from frontierlm.data.quality import QualityFilter, QualityModel, QualityTopFraction
from frontierlm.data.readers import SourceFile, read_source, resolve_sources
from frontierlm.data.web_filters import (
    C4Filter,
    FineWebQualityFilter,
    GopherQualityFilter,
    GopherRepetitionFilter,
    LanguageFilter,
    URLFilter,
)

__all__ = [
    "DataError",
    "Document",
    "read_shards",
    "read_source",
    "run_data_stage",
    "write_shards",
]


def build_steps(cfg: DataConfig, scratch_dir: Path | None = None) -> list[Step]:
    """The data steps in order. `scratch_dir` holds two-pass steps' spill files (a fresh
    subdirectory each, removed when the step ends); None means the system temp dir."""
    steps: list[Step] = [
        LengthFilter(cfg.min_chars, cfg.min_words),
        AlphaFilter(cfg.min_alpha_fraction),
    ]
    # After the cheap length/alpha checks (fewer documents reach the costlier rules) and before
    # dedup (so dedup keys see the text C4 leaves), in FineWeb's order.
    chosen = set(cfg.filters)
    steps.extend(web_filter(name, cfg) for name in WEB_FILTER_ORDER if name in chosen)
    if cfg.dedup:
        steps.append(ExactDedup())
    if cfg.minhash:
        # After exact dedup: exact copies are cheaper to drop there and would otherwise only
        # inflate the buckets.
        steps.append(
            MinHashDedup(
                bands=cfg.minhash_bands,
                rows=cfg.minhash_rows,
                ngram=cfg.minhash_ngram,
                seed=cfg.minhash_seed,
                verify=cfg.minhash_verify,
                threshold=cfg.minhash_threshold,
                work_dir=scratch_dir,
                spill_docs=cfg.shard_docs,
            )
        )
    if cfg.line_dedup != "off":
        # After document-level dedup: an exact copy left in would make every line of the
        # later copy "seen before" and empty it, a worse way of dropping the same document.
        steps.append(
            LineDedup(
                mode=cfg.line_dedup,
                min_chars=cfg.line_dedup_min_chars,
                work_dir=scratch_dir,
                spill_docs=cfg.shard_docs,
            )
        )
    # Decontaminate after dedup (fewer documents to look up) and before quality, so the
    # classifier's top fraction is taken of documents that may be kept at all.
    if cfg.decontaminate:
        steps.append(Decontaminate(cfg.decontaminate, cfg.decontam_ngram, cfg.decontam_mode))
    if cfg.quality_model is not None:
        model = QualityModel.load(Path(cfg.quality_model))
        steps.append(QualityFilter(model, cfg.quality_threshold))
        if cfg.quality_top_fraction is not None:
            steps.append(QualityTopFraction(model, cfg.quality_top_fraction, scratch_dir))
    if cfg.utility_filter is not None:
        # After quality (the costlier model runs on fewer documents), before PII (the
        # reference model read the text as it was).
        from frontierlm.data.utility_filter import (
            ReferenceScorer,
            UtilityFilter,
            UtilityTopFraction,
        )

        u = cfg.utility_filter
        scorer = ReferenceScorer(u)
        steps.append(UtilityFilter(scorer, u.max_loss, u.min_loss, u.min_reduction))
        if u.top_fraction is not None:
            steps.append(UtilityTopFraction(scorer, u.top_fraction, scratch_dir))
    # PII last: placeholders would otherwise change n-grams and quality features.
    if cfg.pii:
        steps.append(PIIRedact())
    return steps


def web_filter(name: str, cfg: DataConfig) -> Step:
    """The web filter `name` (one of `WEB_FILTER_ORDER`) with the thresholds in `cfg`."""
    if name == "language":
        return LanguageFilter(cfg.language.languages, cfg.language.min_score)
    if name == "url":
        u = cfg.url
        return URLFilter(
            u.soft_word_threshold,
            u.extra_domains,
            u.extra_banned_words,
            u.extra_banned_subwords,
            u.extra_soft_banned_words,
        )
    if name == "gopher_repetition":
        r = cfg.gopher_repetition
        return GopherRepetitionFilter(
            dup_line_frac=r.dup_line_frac,
            dup_para_frac=r.dup_para_frac,
            dup_line_char_frac=r.dup_line_char_frac,
            dup_para_char_frac=r.dup_para_char_frac,
            top_n_grams=((2, r.top_2_gram_frac), (3, r.top_3_gram_frac), (4, r.top_4_gram_frac)),
            dup_n_grams=tuple(zip(range(5, 11), r.dup_ngram_fracs, strict=True)),
        )
    if name == "gopher_quality":
        return GopherQualityFilter(**cfg.gopher.model_dump())
    if name == "c4":
        return C4Filter(**cfg.c4.model_dump())
    if name == "fineweb":
        return FineWebQualityFilter(**cfg.fineweb.model_dump())
    raise ValueError(f"unknown web filter {name!r}; known: {', '.join(WEB_FILTER_ORDER)}")


def run_data_stage(cfg: DataConfig, out_dir: Path) -> dict[str, float]:
    """Read every source, filter, dedup, write shards and `stats.json` into `out_dir`.

    Returns {"docs_in", "docs_out", "chars_out", "malformed"}. Raises DataError before any
    work if a source has no readable files.
    """
    files = resolve_sources(cfg.sources)
    out_dir = Path(out_dir)
    start = time.perf_counter()
    source_stats = {s.name: SourceStats(s.name) for s in cfg.sources}
    kept: Counter[str] = Counter()
    kept_chars: Counter[str] = Counter()

    def count_kept(docs: Iterable[Document]) -> Iterator[Document]:
        for doc in docs:
            kept[doc.meta["source"]] += 1
            kept_chars[doc.meta["source"]] += len(doc.text)
            yield doc

    tasks = plan_tasks(cfg.sources, files)
    steps = build_steps(cfg, out_dir)
    _, stream_steps = split_steps(steps)
    with progress_bar() as bar:
        bar_task = bar.add_task("read + filter", total=sum(t.bytes for t in tasks), info="")
        done = Counter[str]()

        def on_done(task: ReadTask, result: TaskResult) -> None:
            done["tasks"] += 1
            done["reused"] += result.reused
            bar.update(bar_task, advance=task.bytes, info=f"{done['tasks']}/{len(tasks)} files")

        results = run_tasks(tasks, cfg, out_dir, on_done)
        for result in results:
            source_stats[result.source.name].merge(result.source)
        # Phase 2 in task order; its steps' counts join the tasks' (merged) step counts.
        stream = (doc for task in tasks for doc in read_task_output(task, out_dir))
        # Scratch next to the output: the spill is about the size of the kept text, which the
        # output disk must hold anyway (the system temp dir is often a small tmpfs).
        docs, stream_stats = run_steps(stream, stream_steps)
        shards = write_shards(
            count_kept(docs),
            out_dir,
            cfg.shard_docs,
            shard_bytes=cfg.shard_bytes,
            shard_format=cfg.shard_format,
        )
    task_steps = [StepStats(step.name) for step in steps[: len(steps) - len(stream_steps)]]
    for result in results:
        for merged, part in zip(task_steps, result.steps, strict=True):
            merged.merge(part)
    step_stats = task_steps + stream_stats
    shutil.rmtree(out_dir / TASK_DIR)  # the shards hold everything now
    seconds = time.perf_counter() - start

    messages = [m for s in source_stats.values() for m in s.messages][:MAX_MESSAGES]
    malformed = sum(s.malformed for s in source_stats.values())
    by_reason: Counter[str] = sum((s.malformed_by_reason for s in source_stats.values()), Counter())
    totals = {
        "docs_in": sum(s.docs for s in source_stats.values()),
        "docs_out": sum(kept.values()),
        "chars_out": sum(kept_chars.values()),
        "malformed": malformed,
    }
    sources = _source_rows(cfg.sources, files, source_stats, step_stats, kept, kept_chars)
    report = {
        "totals": totals,
        "seconds": round(seconds, 2),
        "sources": sources,
        "steps": [s.to_dict() for s in step_stats],
        "malformed": {
            "total": malformed,
            "by_reason": dict(by_reason.most_common()),
            "messages": messages,
        },
        "shards": [p.name for p in shards],
        "executor": {
            "name": cfg.executor if resolved_workers(cfg) > 1 else "this process",
            "workers": resolved_workers(cfg),
            "tasks": len(tasks),
            "tasks_reused": done["reused"],
        },
    }
    (out_dir / "stats.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")

    console.print(_sources_table(sources))
    console.print(steps_table(step_stats))
    for message in messages[:5]:
        console.print(f"[yellow]malformed[/] {escape(message)}", highlight=False)
    if malformed > 5:
        console.print(f"[yellow]... {malformed} malformed in all; see {out_dir / 'stats.json'}")
    console.print(
        f"data: {totals['docs_out']:,} of {totals['docs_in']:,} documents kept, "
        f"{totals['chars_out']:,} chars, {len(shards)} shards in {seconds:.1f}s -> {out_dir}"
    )
    return totals


def _source_rows(
    sources: list[DataSource],
    files: list[list[SourceFile]],
    source_stats: dict[str, SourceStats],
    step_stats: list[StepStats],
    kept: Counter[str],
    kept_chars: Counter[str],
) -> dict[str, dict[str, Any]]:
    rows = {}
    for source, source_files in zip(sources, files, strict=True):
        s = source_stats[source.name]
        dropped = {
            reason: n
            for st in step_stats
            for (name, reason), n in st.dropped_by_source.most_common()
            if name == source.name
        }
        rows[source.name] = {
            "path": source.path,
            # A folder or glob may mix formats: name each one present.
            "format": "+".join(sorted({f.format for f in source_files})),
            "files": len(source_files),
            "docs_read": s.docs,
            "malformed": s.malformed,
            "malformed_by_reason": dict(s.malformed_by_reason.most_common()),
            "skipped_non_html": s.skipped_non_html,
            "docs_kept": kept[source.name],
            "chars_kept": kept_chars[source.name],
            "dropped": dropped,
        }
    return rows


def _sources_table(rows: dict[str, dict[str, Any]]) -> Table:
    table = Table(title="data sources")
    table.add_column("source", no_wrap=True)
    for col in ("read", "malformed", "kept", "chars kept"):
        table.add_column(col, justify="right")
    table.add_column("dropped by reason", no_wrap=True)
    for name, r in rows.items():
        reasons = "\n".join(f"{k} {n:,}" for k, n in r["dropped"].items()) or "-"
        table.add_row(
            name,
            f"{r['docs_read']:,}",
            f"{r['malformed']:,}",
            f"{r['docs_kept']:,}",
            f"{r['chars_kept']:,}",
            reasons,
        )
    return table


def run_data_stage_ctx(ctx: Any) -> dict[str, float]:
    """Entry point for the pipeline runner (`frontierlm.stages`)."""
    return run_data_stage(ctx.cfg.data, ctx.work_dir)
