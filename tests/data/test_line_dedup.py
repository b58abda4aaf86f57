from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

import pytest
from pydantic import ValidationError

from frontierlm.config import DataConfig, DataSource
from frontierlm.data import build_steps, read_shards, run_data_stage
from frontierlm.data.decontam import Decontaminate
from frontierlm.data.documents import Document, SourceStats
from frontierlm.data.line_dedup import LineDedup
from frontierlm.data.minhash import MinHashDedup
from frontierlm.data.pipeline import StepStats
from frontierlm.data.readers import read_source

FOOTER = "Copyright 2024 Example Corp. All rights reserved."  # 49 chars
DECON = Decontaminate.name
COOKIE = "We use cookies to improve your experience on our site."


def run_step(step: LineDedup, texts: list[str]) -> tuple[list[Document], StepStats]:
    stats = StepStats(step.name)
    docs = (Document(f"d{i}", t, {"source": "s"}) for i, t in enumerate(texts))
    return list(step.process(docs, stats)), stats


def test_repeated_footer_removed_from_later_documents_only() -> None:
    texts = [f"Page {i} has its own body text.\n{FOOTER}\n" for i in range(4)]
    kept, stats = run_step(LineDedup(in_memory=True), texts)
    assert [d.text for d in kept] == [
        f"Page 0 has its own body text.\n{FOOTER}\n",
        "Page 1 has its own body text.\n",
        "Page 2 has its own body text.\n",
        "Page 3 has its own body text.\n",
    ]
    assert stats.counts == {"lines_removed": 3, "rewritten": 3, "chars_removed": 3 * 50}
    assert (stats.docs_in, stats.docs_out, stats.dropped) == (4, 4, Counter())
    assert [d.meta.get("line_dedup_removed") for d in kept] == [None, 1, 1, 1]


def test_match_is_on_normalised_text_and_separators_follow_removed_lines() -> None:
    texts = [
        f"{COOKIE}\nFirst page body.",
        f"  {COOKIE.upper()}  \nSecond page body.\nMore of page two.",
        f"Third page body.\n{COOKIE}",  # last line: its preceding newline goes with it
        f"Fourth\n{COOKIE}\n\nafter a blank line",
    ]
    kept, stats = run_step(LineDedup(in_memory=True), texts)
    assert [d.text for d in kept] == [
        texts[0],
        "Second page body.\nMore of page two.",
        "Third page body.",
        "Fourth\n\nafter a blank line",
    ]
    assert stats.counts["lines_removed"] == 3


def test_repeats_within_one_document_are_kept() -> None:
    texts = [
        f"{FOOTER}\nbody zero\n{FOOTER}",  # first document to hold it: both copies stay
        f"body one\n{FOOTER}\n{FOOTER}\n{FOOTER}",  # later: every copy goes
        "body two\nA refrain that repeats within this song only.\n"
        "verse\nA refrain that repeats within this song only.",
    ]
    kept, stats = run_step(LineDedup(in_memory=True), texts)
    assert [d.text for d in kept] == [texts[0], "body one", texts[2]]
    assert stats.counts == {"lines_removed": 3, "rewritten": 1, "chars_removed": 3 * 50}


def test_min_chars_respected() -> None:
    short = "x" * 29
    exact = "y" * 30
    texts = [f"{short}\n{exact}\nHome\n}}", f"b\n{short}\n{exact}\nHome\n}}"]
    kept, stats = run_step(LineDedup(in_memory=True), texts)
    assert [d.text for d in kept] == [texts[0], f"b\n{short}\nHome\n}}"]
    assert stats.counts["lines_removed"] == 1
    # Counted on normalised text: runs of spaces inside a line shrink before measuring.
    spaced = "a" * 14 + "      " + "b" * 14  # 34 chars, 29 normalised
    kept, stats = run_step(LineDedup(in_memory=True), [spaced, f"c\n{spaced}"])
    assert kept[1].text == f"c\n{spaced}" and stats.counts["lines_removed"] == 0
    kept, stats = run_step(LineDedup(min_chars=10, in_memory=True), texts)
    assert [d.text for d in kept] == [texts[0], "b\nHome\n}"]
    assert stats.counts["lines_removed"] == 2


def test_paragraph_mode() -> None:
    nav = "Home | Products | About us | Contact\nSearch this website for products"
    texts = [
        f"Intro of page zero.\n\n{nav}\n\nEnd of zero.",
        f"Intro of page one.\n \n\n{nav}\n\nEnd of one, with {COOKIE}",
        # Only lines of the nav repeated, not the whole paragraph: kept in paragraph mode.
        "Intro of page two.\n\nHome | Products | About us | Contact\nA new second line.",
        f"{nav}\n\n\nIntro of page three, after the nav.",
    ]
    kept, stats = run_step(LineDedup(mode="paragraph", in_memory=True), texts)
    assert [d.text for d in kept] == [
        texts[0],
        f"Intro of page one.\n\nEnd of one, with {COOKIE}",
        texts[2],
        "Intro of page three, after the nav.",
    ]
    assert stats.counts["paragraphs_removed"] == 2 and stats.counts["rewritten"] == 2
    assert "lines_removed" not in stats.counts
    # The same texts in line mode: the first nav line goes from page two as well.
    kept, stats = run_step(LineDedup(mode="line", in_memory=True), texts)
    assert kept[2].text == "Intro of page two.\n\nA new second line."
    assert stats.counts["lines_removed"] == 2 + 1 + 2


def test_emptied_documents_dropped_with_reason() -> None:
    texts = [
        f"{FOOTER}\n{COOKIE}",
        f"{COOKIE}\n\n  \n{FOOTER}\n",  # nothing but boilerplate and whitespace
        "   ",  # came in empty: not this step's to drop
        f"{FOOTER}\nshort",  # something is left
    ]
    kept, stats = run_step(LineDedup(in_memory=True), texts)
    assert [d.id for d in kept] == ["d0", "d2", "d3"]
    assert kept[2].text == "short"
    assert stats.dropped == {"line_dedup_empty": 1}
    assert stats.dropped_by_source == {("s", "line_dedup_empty"): 1}
    assert stats.counts == {
        "lines_removed": 3,
        "rewritten": 2,
        # Document 1 keeps its blank lines ("\n  \n", 4 chars) until it is dropped.
        "chars_removed": len(texts[1]) - 4 + len(FOOTER) + 1,
    }
    assert (stats.docs_in, stats.docs_out) == (4, 3)


def boilerplate_corpus(n: int, seed: int = 0) -> list[str]:
    """Pages of unique lines mixed with lines drawn from a small pool of boilerplate."""
    rng = random.Random(seed)
    pool = [f"Boilerplate line number {k} that many pages of this site share." for k in range(12)]
    texts = []
    for i in range(n):
        lines = [f"Unique line {i}.{j} of this page, {rng.random():.6f}." for j in range(5)]
        lines += rng.sample(pool, rng.randint(0, 4))
        if rng.random() < 0.1:
            lines.append(lines[-1])  # a within-document repeat
        rng.shuffle(lines)
        if rng.random() < 0.05:
            lines = rng.sample(pool, 2)  # may be emptied entirely
        texts.append("\n".join(lines))
    return texts


@pytest.mark.parametrize("mode", ["line", "paragraph"])
def test_spilled_equals_in_memory(mode: str, tmp_path: Path) -> None:
    texts = boilerplate_corpus(120)
    if mode == "paragraph":
        texts = [t.replace("\n", "\n\n") for t in texts]
    ref, ref_stats = run_step(LineDedup(mode=mode, in_memory=True), texts)
    # 11 chunks of 11 documents, hash ranges of ~7 pairs: many runs and many merge ranges.
    step = LineDedup(mode=mode, work_dir=tmp_path, spill_docs=11, merge_entries=7)
    stats = StepStats(step.name)
    stream = step.process(
        (Document(f"d{i}", t, {"source": "s"}) for i, t in enumerate(texts)), stats
    )
    first = next(stream)
    (scratch,) = tmp_path.iterdir()
    assert len(list(scratch.glob("*.jsonl"))) == 11 and len(list(scratch.glob("*.keys.npy"))) == 11
    out = [first, *stream]
    assert [(d.id, d.text, d.meta) for d in out] == [(d.id, d.text, d.meta) for d in ref]
    assert (stats.counts, stats.dropped) == (ref_stats.counts, ref_stats.dropped)
    assert stats.counts[f"{mode}s_removed"] > 100 and stats.dropped["line_dedup_empty"] > 0
    assert list(tmp_path.iterdir()) == []  # scratch removed


@pytest.mark.parametrize("in_memory", [True, False])
def test_empty_stream_and_rerun(in_memory: bool, tmp_path: Path) -> None:
    step = LineDedup(in_memory=in_memory, work_dir=tmp_path, spill_docs=2)
    texts = [f"a\n{FOOTER}", f"b\n{FOOTER}", f"c\n{FOOTER}"]
    assert [d.text for d in run_step(step, texts)[0]] == [texts[0], "b", "c"]
    kept, stats = run_step(step, [])  # nothing left over from the first run
    assert (kept, stats.docs_in, stats.docs_out) == ([], 0, 0)
    assert [d.text for d in run_step(step, texts[1:])[0]] == [texts[1], "c"]
    assert list(tmp_path.iterdir()) == []


def test_abandoned_stream_removes_scratch(tmp_path: Path) -> None:
    step = LineDedup(work_dir=tmp_path, spill_docs=10)
    docs = (Document(str(i), t) for i, t in enumerate(boilerplate_corpus(50)))
    stream = step.process(docs, StepStats("l"))
    next(stream)
    assert len(list(tmp_path.iterdir())) == 1
    stream.close()
    assert list(tmp_path.iterdir()) == []


def test_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="mode"):
        LineDedup(mode="sentence")
    with pytest.raises(ValueError, match="min_chars"):
        LineDedup(min_chars=0)


def test_real_pages_lose_repeated_boilerplate(repo_data: Path) -> None:
    def dedup(name: str) -> tuple[list[Document], list[Document], StepStats]:
        source = DataSource(name="cc", path=str(repo_data / "web" / name))
        docs = list(read_source(source, SourceStats("cc")))
        copies = [Document(d.id, d.text, dict(d.meta)) for d in docs]
        kept, stats = [], StepStats("line_dedup")
        kept = list(LineDedup(spill_docs=4).process(iter(copies), stats))
        return docs, kept, stats

    # Sample 0000: 22 pages of as many sites; trafilatura already cut their menus and footers,
    # so no line of 30+ characters repeats across pages and nothing changes.
    docs, kept, stats = dedup("commoncrawl-sample-0000.warc.gz")
    assert len(docs) == 22 and [d.text for d in kept] == [d.text for d in docs]
    assert stats.counts == {}
    # Sample 0001: several allenai.org pages repeat the institute's project blurbs.
    docs, kept, stats = dedup("commoncrawl-sample-0001.warc.gz")
    assert len(docs) == 15 and len(kept) == 15
    step = LineDedup()
    removed: Counter[str] = Counter()
    for before, after in zip(docs, kept, strict=True):
        left = set(step.spans(after.text))
        removed.update(line for line in step.spans(before.text)[::2] if line not in left)
    for line, n in removed.most_common():
        print(f"removed from {n} later pages: {line[:100]!r}")
    assert stats.counts["lines_removed"] == sum(removed.values()) == 14
    assert stats.counts["rewritten"] == 2
    assert removed["Machine reasoning, common sense for AI, and language modeling"] == 2
    assert removed["Applied AI for climate modeling and wildlife protection"] == 2
    assert all(n == 2 for n in removed.values())


def test_config_and_build_steps(tmp_path: Path) -> None:
    source = DataSource(name="a", path="a.jsonl")
    cfg = DataConfig(sources=[source])
    assert (cfg.line_dedup, cfg.line_dedup_min_chars) == ("off", 30)
    assert not any(isinstance(s, LineDedup) for s in build_steps(cfg))
    cfg = DataConfig(
        sources=[source],
        minhash=True,
        line_dedup="paragraph",
        line_dedup_min_chars=12,
        decontaminate=["gsm8k_test"],
    )
    steps = build_steps(cfg, tmp_path)
    names = [s.name for s in steps]
    # After both document-level dedups, before decontamination.
    assert names[names.index("exact_dedup") :] == ["exact_dedup", "minhash", "line_dedup", DECON]
    step = next(s for s in steps if isinstance(s, LineDedup))
    assert (step.mode, step.min_chars, step.work_dir) == ("paragraph", 12, tmp_path)
    assert isinstance(steps[-3], MinHashDedup) and isinstance(steps[-1], Decontaminate)
    with pytest.raises(ValidationError, match="line_dedup"):
        DataConfig(sources=[source], line_dedup="sentence")
    with pytest.raises(ValidationError, match="line_dedup_min_chars"):
        DataConfig(sources=[source], line_dedup_min_chars=0)


def test_data_stage_removes_boilerplate(tmp_path: Path) -> None:
    texts = [f"Page {i} says something of its own.\n{COOKIE}\n{FOOTER}" for i in range(5)]
    texts.append(f"{COOKIE}\n{FOOTER}")
    lines = [json.dumps({"text": t}) for t in texts]
    (tmp_path / "web.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    out = tmp_path / "out"
    out.mkdir()
    cfg = DataConfig(
        sources=[DataSource(name="web", path=str(tmp_path / "web.jsonl"))],
        min_chars=0,
        min_words=0,
        line_dedup="line",
        shard_docs=2,
        workers=1,
    )
    run_data_stage(cfg, out)
    stats = json.loads((out / "stats.json").read_text(encoding="utf-8"))
    step = stats["steps"][-1]
    assert step["step"] == "line_dedup"
    assert step["dropped"] == {"line_dedup_empty": 1}
    assert step["counts"]["lines_removed"] == 10 and step["counts"]["rewritten"] == 5
    assert [d.text for d in read_shards(out)] == [texts[0]] + [
        f"Page {i} says something of its own." for i in range(1, 5)
    ]
    assert not list(out.glob("linededup-*"))  # scratch removed
