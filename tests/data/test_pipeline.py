"""The step contract: rewriting, counting, timing and merging of stats."""

from __future__ import annotations

from collections import Counter

from frontierlm.data.documents import Document
from frontierlm.data.pipeline import Step, StepStats, run_steps


class DropDigitLines(Step):
    """Removes lines with digits; drops documents left empty."""

    name = "digits"

    def rewrite(self, doc: Document, counts: Counter[str]) -> str | None:
        lines = doc.text.split("\n")
        kept = [line for line in lines if not any(c.isdigit() for c in line)]
        counts["lines_removed"] += len(lines) - len(kept)
        return "\n".join(kept)

    def drop_reason(self, doc: Document) -> str | None:
        return "empty_after_rewrite" if not doc.words else None


def test_rewrite_counts_and_new_words() -> None:
    docs = [
        Document("a", "keep me\nline 2\nand me", {"source": "s"}),
        Document("b", "untouched text", {"source": "s"}),
        Document("c", "123\n456", {"source": "t"}),
    ]
    assert docs[0].words == ["keep", "me", "line", "2", "and", "me"]  # cache filled before
    out, (stats,) = run_steps(docs, [DropDigitLines()])
    kept = list(out)
    assert [d.id for d in kept] == ["a", "b"]
    assert kept[0].text == "keep me\nand me"
    assert kept[0].words == ["keep", "me", "and", "me"]
    assert kept[0].meta == {"source": "s"}
    assert (stats.docs_in, stats.docs_out) == (3, 2)
    assert stats.counts == Counter(rewritten=2, chars_removed=7 + 7, lines_removed=3)
    assert stats.dropped == Counter(empty_after_rewrite=1)
    assert stats.dropped_by_source == Counter({("t", "empty_after_rewrite"): 1})
    assert stats.seconds > 0
    record = stats.to_dict()
    assert record["counts"]["lines_removed"] == 3 and record["in"] == 3


def test_merge_adds_every_field() -> None:
    a, b = StepStats("x"), StepStats("x")
    for s, n in ((a, 1), (b, 2)):
        s.docs_in, s.docs_out, s.seconds = 10 * n, 5 * n, 0.5 * n
        s.dropped["r"] += n
        s.dropped_by_source["src", "r"] += n
        s.counts["k"] += n
    a.merge(b)
    assert (a.docs_in, a.docs_out, a.seconds) == (30, 15, 1.5)
    assert a.dropped["r"] == 3 and a.dropped_by_source["src", "r"] == 3 and a.counts["k"] == 3
