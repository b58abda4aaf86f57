"""Small datatrove-style steps over a lazy document stream, each counting what it keeps and drops.

A step decides: `drop_reason(doc)` returns None to keep a document or a short reason to drop
it, and may add to `doc.meta` (scores, hashes). A step that edits text (C4's line removal, PII
redaction) does so only in `rewrite(doc, counts)`, which returns the new text (or None for no
change) and may add named counts (`counts["email"] += 2`); the base class swaps in a new
`Document` (so cached words are recomputed), counts `rewritten` documents and `chars_removed`,
then asks `drop_reason` of the rewritten document. The base class does all counting and timing,
so every step reports in/out/dropped-by-reason/counts/seconds the same way.

Most steps decide one document at a time. A `TwoPassStep` (fuzzy dedup) cannot: whether a
document is a near-duplicate depends on documents further down the stream. Its contract:

1. pass 1: `observe(index, doc)` sees every upstream document, in stream order, with its index
   (0, 1, ...). The step must keep what it needs to replay the stream (on disk, for corpora
   larger than RAM) and decides nothing yet.
2. `finish()` runs once, after the upstream stream is exhausted: global work (bucketing,
   clustering).
3. pass 2: `replay()` yields the same `(index, doc)` pairs in the same order. For each,
   `revise(index, doc, counts)` may return new text (None, the default: no change), counted
   like `rewrite` (`rewritten`, `chars_removed`, the step's own counts); then
   `decide(index, doc)` sees the revised document and returns None or a drop reason, exactly
   like `drop_reason`. Revising is how a step edits text by what the whole stream holds (line
   dedup removes lines seen in earlier documents).
4. `close()` always runs last (also when the consumer stops early) and removes scratch files.

Counting is the base class's, as for every step: `in` counts pass 1, `out` and the drops pass 2.
The first document leaves a two-pass step only after every upstream document has entered it,
so upstream stats are final by then; downstream steps stay lazy.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

from rich.table import Table

from frontierlm.data.documents import Document


@dataclass
class StepStats:
    name: str
    docs_in: int = 0
    docs_out: int = 0
    dropped: Counter[str] = field(default_factory=Counter)
    # (source, reason) -> count, so the stage can say which source lost what.
    dropped_by_source: Counter[tuple[str, str]] = field(default_factory=Counter)
    # Named counts beyond keep/drop: documents rewritten, characters removed, PII replaced.
    counts: Counter[str] = field(default_factory=Counter)
    # Time inside this step's own code (a lazy chain interleaves steps, so wall time cannot be
    # split by subtraction).
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "step": self.name,
            "in": self.docs_in,
            "out": self.docs_out,
            "dropped": dict(self.dropped.most_common()),
            "counts": dict(self.counts.most_common()),
            "seconds": round(self.seconds, 3),
        }

    def merge(self, other: StepStats) -> None:
        """Add another worker's stats of the same step into these."""
        self.docs_in += other.docs_in
        self.docs_out += other.docs_out
        self.dropped.update(other.dropped)
        self.dropped_by_source.update(other.dropped_by_source)
        self.counts.update(other.counts)
        self.seconds += other.seconds


class Step:
    """Base for filters, rewriters and dedup: subclasses set `name` and implement
    `drop_reason`, `rewrite`, or both."""

    name: str = "step"
    # True for steps whose decision on a document depends on other documents (dedup, top
    # fraction): executors run every step before the first such step in parallel over the
    # inputs, and the rest in one process over the whole stream, in order.
    whole_stream: bool = False

    def drop_reason(self, doc: Document) -> str | None:
        return None

    def rewrite(self, doc: Document, counts: Counter[str]) -> str | None:
        """The document's new text, or None to leave it as it is."""
        return None

    def apply(self, doc: Document, stats: StepStats) -> Document | None:
        """Rewrite then decide one document, counting both; None when it is dropped."""
        stats.docs_in += 1
        doc = _counted_rewrite(stats, doc, self.rewrite(doc, stats.counts))
        return doc if _counted_keep(stats, doc, self.drop_reason(doc)) else None

    def process(self, docs: Iterable[Document], stats: StepStats) -> Iterator[Document]:
        clock = time.perf_counter
        for doc in docs:
            start = clock()
            kept = self.apply(doc, stats)
            stats.seconds += clock() - start
            if kept is not None:
                yield kept


def _counted_rewrite(stats: StepStats, doc: Document, new_text: str | None) -> Document:
    """`doc` with `new_text` (None: unchanged), counting the rewrite on `stats`."""
    if new_text is None or new_text == doc.text:
        return doc
    stats.counts["rewritten"] += 1
    stats.counts["chars_removed"] += len(doc.text) - len(new_text)
    # A new Document so cached words/tokens are recomputed; meta is shared, so what the step
    # recorded while rewriting stays.
    return replace(doc, text=new_text, meta=doc.meta)


def _counted_keep(stats: StepStats, doc: Document, reason: str | None) -> bool:
    """Count one decision on `stats`; True when the document is kept."""
    if reason is None:
        stats.docs_out += 1
        return True
    stats.dropped[reason] += 1
    stats.dropped_by_source[doc.meta.get("source", "?"), reason] += 1
    return False


class TwoPassStep(Step):
    """A step that sees the whole stream before deciding; see the module docstring's contract."""

    whole_stream = True

    def observe(self, index: int, doc: Document) -> None:
        raise NotImplementedError

    def finish(self) -> None:
        raise NotImplementedError

    def replay(self) -> Iterator[tuple[int, Document]]:
        raise NotImplementedError

    def revise(self, index: int, doc: Document, counts: Counter[str]) -> str | None:
        """Pass 2, before `decide`: the document's new text, or None to leave it as it is."""
        return None

    def decide(self, index: int, doc: Document) -> str | None:
        raise NotImplementedError

    def close(self) -> None:
        """Release scratch space; called once after pass 2 or when the stream is abandoned."""

    def drop_reason(self, doc: Document) -> str | None:
        # A lone document carries no stream position; a caller reaching here skipped process().
        raise TypeError(
            f"step {self.name!r} is two-pass: run it through process()/run_steps, which call "
            "observe, finish, replay and decide"
        )

    def process(self, docs: Iterable[Document], stats: StepStats) -> Iterator[Document]:
        clock = time.perf_counter
        try:
            for index, doc in enumerate(docs):
                stats.docs_in += 1
                start = clock()
                self.observe(index, doc)
                stats.seconds += clock() - start
            start = clock()
            self.finish()
            stats.seconds += clock() - start
            for index, doc in self.replay():
                start = clock()
                doc = _counted_rewrite(stats, doc, self.revise(index, doc, stats.counts))
                keep = _counted_keep(stats, doc, self.decide(index, doc))
                stats.seconds += clock() - start
                if keep:
                    yield doc
        finally:
            self.close()


def run_steps(
    docs: Iterable[Document], steps: list[Step]
) -> tuple[Iterator[Document], list[StepStats]]:
    """Chain `steps` over `docs` lazily; the stats fill in as the returned stream is consumed."""
    stats = [StepStats(step.name) for step in steps]
    stream: Iterable[Document] = docs
    for step, step_stats in zip(steps, stats, strict=True):
        stream = step.process(stream, step_stats)
    return iter(stream), stats


def steps_table(stats: list[StepStats]) -> Table:
    table = Table(title="data steps")
    table.add_column("step")
    table.add_column("in", justify="right")
    table.add_column("out", justify="right")
    table.add_column("seconds", justify="right")
    table.add_column("dropped by reason", no_wrap=True)
    table.add_column("counts", no_wrap=True)
    for s in stats:
        reasons = "\n".join(f"{r} {n:,}" for r, n in s.dropped.most_common()) or "-"
        counts = "\n".join(f"{k} {n:,}" for k, n in s.counts.most_common()) or "-"
        table.add_row(
            s.name, f"{s.docs_in:,}", f"{s.docs_out:,}", f"{s.seconds:.2f}", reasons, counts
        )
    return table
