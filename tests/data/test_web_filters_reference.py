"""Decision agreement with datatrove's filters (the FineWeb reference) on the shipped web pages.

Run: PYTHONPATH=. python -m pytest -m slow -s tests/data/test_web_filters_reference.py
Reads every shipped WARC/JSONL web source (HTML extracted with trafilatura: a minute or two),
runs each of our filters and datatrove's equivalent on the same documents, prints agreement
and every disagreement with both reasons. datatrove's LanguageFilter is not compared: it needs
a fastText model download; ours uses py3langid's bundled model instead.
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from datatrove_reference import datatrove_url_filter

from frontierlm.config import DataSource
from frontierlm.data.documents import Document, SourceStats
from frontierlm.data.pipeline import Step
from frontierlm.data.readers import read_source
from frontierlm.data.web_filters import (
    C4Filter,
    FineWebQualityFilter,
    GopherQualityFilter,
    GopherRepetitionFilter,
    URLFilter,
)

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
SHARED = REPO.parent / "shared" / "data" / "web"


def _sources() -> list[DataSource]:
    paths = sorted((REPO / "data" / "web").glob("*.warc.gz"))
    paths += sorted((REPO / "data" / "web").glob("*.jsonl"))
    if SHARED.is_dir():
        paths += sorted(SHARED.glob("*.warc*.gz")) + sorted(SHARED.glob("commoncrawl/*"))
    sources = []
    for i, path in enumerate(p for p in paths if p.suffix in (".gz", ".jsonl")):
        extra = {"id_field": "id"} if path.suffix == ".jsonl" else {}
        sources.append(DataSource(name=f"s{i}", path=str(path), **extra))
    return sources


@pytest.fixture(scope="module")
def web_docs() -> list[Document]:
    docs = []
    for source in _sources():
        for doc in read_source(source, SourceStats(source.name), workers=2):
            if doc.text.strip():
                docs.append(doc)
    assert len(docs) > 500
    return docs


def _ours(step: Step, doc: Document) -> tuple[str | None, str]:
    fresh = Document(doc.id, doc.text, dict(doc.meta))
    new_text = step.rewrite(fresh, Counter())
    if new_text is not None:
        fresh = Document(doc.id, new_text, fresh.meta)
    return step.drop_reason(fresh), fresh.text


def _theirs(step: Any, doc: Document) -> tuple[str | None, str]:
    from datatrove.data import Document as DTDocument

    theirs = DTDocument(text=doc.text, id=doc.id, metadata=dict(doc.meta))
    result = step.filter(theirs)
    return (None if result is True else result[1]), theirs.text


def _compare(name: str, ours: Step, theirs: Any, docs: list[Document]) -> float:
    agree = 0
    seconds = [0.0, 0.0]
    disagreements = []
    for doc in docs:
        start = time.perf_counter()
        our_reason, our_text = _ours(ours, doc)
        seconds[0] += time.perf_counter() - start
        start = time.perf_counter()
        their_reason, their_text = _theirs(theirs, doc)
        seconds[1] += time.perf_counter() - start
        # A kept document must also keep the same text (C4 removes lines).
        same = (our_reason is None) == (their_reason is None) and (
            our_reason is not None or our_text == their_text
        )
        agree += same
        if not same:
            disagreements.append((doc.id, our_reason, their_reason))
    rate = agree / len(docs)
    print(
        f"\n{name}: {agree}/{len(docs)} decisions agree ({rate:.2%}); "
        f"ours {len(docs) / seconds[0]:.0f} docs/s, datatrove {len(docs) / seconds[1]:.0f} docs/s"
        " (each tokenizing afresh)"
    )
    for doc_id, ours_r, theirs_r in disagreements:
        print(f"  {doc_id}: ours={ours_r} datatrove={theirs_r}")
    return rate


def test_gopher_repetition_agrees(web_docs: list[Document]) -> None:
    from datatrove.pipeline.filters import GopherRepetitionFilter as Theirs

    assert _compare("gopher_repetition", GopherRepetitionFilter(), Theirs(), web_docs) >= 0.99


def test_gopher_quality_agrees(web_docs: list[Document]) -> None:
    from datatrove.pipeline.filters import GopherQualityFilter as Theirs

    assert _compare("gopher_quality", GopherQualityFilter(), Theirs(), web_docs) >= 0.99


def test_c4_agrees(web_docs: list[Document]) -> None:
    from datatrove.pipeline.filters import C4QualityFilter as Theirs

    assert _compare("c4", C4Filter(), Theirs(), web_docs) >= 0.99
    no_punct = C4Filter(filter_no_terminal_punct=False)
    theirs = Theirs(filter_no_terminal_punct=False)
    assert _compare("c4 (FineWeb's: no terminal-punct rule)", no_punct, theirs, web_docs) >= 0.99


def test_fineweb_agrees(web_docs: list[Document]) -> None:
    from datatrove.pipeline.filters import FineWebQualityFilter as Theirs

    assert _compare("fineweb", FineWebQualityFilter(), Theirs(), web_docs) >= 0.99


def test_url_filter_agrees(web_docs: list[Document]) -> None:
    """datatrove's URLFilter given our lists (its own bundled lists off), on the corpus URLs plus
    hand-made ones that hit each rule."""
    theirs = datatrove_url_filter()
    urls = [d.meta["url"] for d in web_docs if d.meta.get("url")]
    urls += [
        "https://pornhub.com/a",
        "https://www.xvideos.com/b",
        "https://example.org/free-porn",
        "https://example.org/hot-girls-dating",
        "https://example.org/hot-news",
        "https://freepornsite.example/",
        "https://example.org/XXX",
    ]
    docs = [Document(str(i), "text", {"url": u}) for i, u in enumerate(urls)]
    assert _compare("url", URLFilter(), theirs, docs) == 1.0
