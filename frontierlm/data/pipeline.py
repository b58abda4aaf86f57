"""Small datatrove-style steps over a lazy document stream, each counting what it keeps and drops.

A step only decides: `drop_reason(doc)` returns None to keep a document or a short reason to
drop it, and may add to `doc.meta` (scores, hashes) but never rewrites `doc.text`. The base
class does the counting, so every step reports in/out/dropped-by-reason the same way.

Most steps decide one document at a time. A `TwoPassStep` (fuzzy dedup) cannot: whether a
document is a near-duplicate depends on documents further down the stream. Its contract:

1. pass 1: `observe(index, doc)` sees every upstream document, in stream order, with its index
   (0, 1, ...). The step must keep what it needs to replay the stream (on disk, for corpora
   larger than RAM) and decides nothing yet.
2. `finish()` runs once, after the upstream stream is exhausted: global work (bucketing,
   clustering).
3. pass 2: `replay()` yields the same `(index, doc)` pairs in the same order, and
   `decide(index, doc)` returns None or a drop reason, exactly like `drop_reason`.
4. `close()` always runs last (also when the consumer stops early) and removes scratch files.

Counting is the base class's, as for every step: `in` counts pass 1, `out` and the drops pass 2.
The first document leaves a two-pass step only after every upstream document has entered it,
so upstream stats are final by then; downstream steps stay lazy.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
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

    def to_dict(self) -> dict[str, Any]:
        return {
            "step": self.name,
            "in": self.docs_in,
            "out": self.docs_out,
            "dropped": dict(self.dropped.most_common()),
        }


class Step:
    """Base for filters and dedup: subclasses set `name` and implement `drop_reason`."""

    name: str = "step"

    def drop_reason(self, doc: Document) -> str | None:
        raise NotImplementedError

    def process(self, docs: Iterable[Document], stats: StepStats) -> Iterator[Document]:
        for doc in docs:
            stats.docs_in += 1
            if _counted_keep(stats, doc, self.drop_reason(doc)):
                yield doc


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

    def observe(self, index: int, doc: Document) -> None:
        raise NotImplementedError

    def finish(self) -> None:
        raise NotImplementedError

    def replay(self) -> Iterator[tuple[int, Document]]:
        raise NotImplementedError

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
        try:
            for index, doc in enumerate(docs):
                stats.docs_in += 1
                self.observe(index, doc)
            self.finish()
            for index, doc in self.replay():
                if _counted_keep(stats, doc, self.decide(index, doc)):
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
    table.add_column("dropped by reason", no_wrap=True)
    for s in stats:
        reasons = "\n".join(f"{r} {n:,}" for r, n in s.dropped.most_common()) or "-"
        table.add_row(s.name, f"{s.docs_in:,}", f"{s.docs_out:,}", reasons)
    return table
