"""Small datatrove-style steps over a lazy document stream, each counting what it keeps and drops.

A step only decides: `drop_reason(doc)` returns None to keep a document or a short reason to
drop it, and may add to `doc.meta` (scores, hashes) but never rewrites `doc.text`. The base
class does the counting, so every step reports in/out/dropped-by-reason the same way.
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
            reason = self.drop_reason(doc)
            if reason is None:
                stats.docs_out += 1
                yield doc
            else:
                stats.dropped[reason] += 1
                stats.dropped_by_source[doc.meta.get("source", "?"), reason] += 1


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
