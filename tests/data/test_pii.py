from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from frontierlm.config import DataSource
from frontierlm.data.documents import Document, SourceStats
from frontierlm.data.pii import PIIRedact, redact
from frontierlm.data.pipeline import run_steps
from frontierlm.data.readers import read_source


def _redact(text: str) -> tuple[str, Counter[str]]:
    counts: Counter[str] = Counter()
    return redact(text, counts), counts


@pytest.mark.parametrize(
    "text, expected, kind",
    [
        ("Mail john.doe+news@example.co.uk now", "Mail <EMAIL> now", "email"),
        ("(sales@shop-24.com)", "(<EMAIL>)", "email"),
        ("server 192.168.1.20, then", "server <IP>, then", "ip"),
        ("was at 38.107.191.66 through", "was at <IP> through", "ip"),
        ("dns 8.8.8.8.", "dns <IP>.", "ip"),
        ("host 2001:db8::8a2e:370:7334 up", "host <IP> up", "ip"),
        ("[dead:beef:cafe:5417:affe:8FA3:deaf:feed]", "[<IP>]", "ip"),
        ("call (555) 123-4567 today", "call <PHONE> today", "phone"),
        ("tel +1 555 123 4567.", "tel <PHONE>.", "phone"),
        ("UK +44 20 7946 0958", "UK <PHONE>", "phone"),
        ("or 555.123.4567", "or <PHONE>", "phone"),
        ("Berlin 030 1234567", "Berlin <PHONE>", "phone"),
    ],
)
def test_placeholders(text: str, expected: str, kind: str) -> None:
    out, counts = _redact(text)
    assert out == expected
    assert counts == {kind: 1}


@pytest.mark.parametrize(
    "text",
    [
        "Python 3.11.4 was released",  # versions
        "version 1.0.0.1 of the driver",
        "v2.4.1.9 and build 10.0.19041.1",
        "chapter 1.2.3.4.5 and 256.1.1.1",  # not an address
        "released 2023-01-15 (15.01.2023, 01/15/2023) at 12:30:45",  # dates, times
        "for $1,234.56 or €1 234 567",  # prices
        "12 345 678 people and 1,234,567,890 stars",  # thousands
        "ISBN 978-3-16-148410-0",
        "order 20230115123456",  # a bare digit run
        "call 555-1234",  # 7-digit local numbers are left alone
        "0 1 1 2 3 5 8 13 21 34 55 89 144 233 377 610 987 1597",  # a number row
        "-rw-r--r-- tarek/staff     609 2008-06-09 13:26:54 setup.py",  # ls -l
        "slice a[::2], std::vector, @decorator, user@localhost",
    ],
)
def test_non_matches(text: str) -> None:
    out, counts = _redact(text)
    assert out == text and not counts


def test_step_counts_per_kind_and_marks_meta() -> None:
    docs = [
        Document("a", "Write to a@b.org or c@d.net, or call +1 555 123 4567.", {"source": "s"}),
        Document("b", "Nothing to hide in Python 3.11.4.", {"source": "s"}),
        Document("c", "Ping 10.0.0.1 from 2001:db8::1:2.", {"source": "s"}),
    ]
    kept, stats = run_steps(iter(docs), [PIIRedact()])
    out = {d.id: d for d in kept}
    assert out["a"].text == "Write to <EMAIL> or <EMAIL>, or call <PHONE>."
    assert out["a"].meta["pii"] == {"email": 2, "phone": 1}
    assert out["b"].text == docs[1].text and "pii" not in out["b"].meta
    assert out["c"].text == "Ping <IP> from <IP>."
    st = stats[0]
    assert st.docs_out == 3 and not st.dropped
    assert st.counts["email"] == 2 and st.counts["phone"] == 1 and st.counts["ip"] == 2
    assert st.counts["rewritten"] == 2


def test_real_pages_lose_only_real_pii(repo_data: Path) -> None:
    """The shipped Common Crawl pages: what is replaced is addresses (Mastodon handles, a
    contact address, a site's IPs), never numbers that only look so. (On the Python docs
    sample, too slow to extract here, the same holds: 0 phones, the IPs and e-mails of code
    examples.)"""
    found: Counter[str] = Counter()
    for name in ("commoncrawl-sample-0000.warc.gz", "commoncrawl-sample-0001.warc.gz"):
        source = DataSource(name="w", path=str(repo_data / "web" / name))
        for doc in read_source(source, SourceStats("w")):
            redact(doc.text, found)
    assert found["phone"] == 0
    assert found == {"email": 5, "ip": 2}
