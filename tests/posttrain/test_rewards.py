"""Answer extraction and exact match on real GSM8K references."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

from frontierlm.posttrain.rewards import exact_match, extract_answer, normalize_number

DATA = Path(__file__).resolve().parents[2] / "data"


def test_every_shipped_gsm8k_reference_has_an_answer():
    with gzip.open(DATA / "gsm8k" / "train.jsonl.gz", "rt") as f:
        answers = [json.loads(line)["answer"] for line in f]
    extracted = [extract_answer(a) for a in answers]
    assert all(e is not None for e in extracted)
    assert extracted[0] == "72" and extracted[1] == "10"
    assert exact_match(answers[0], answers[0])


def test_numbers_are_normalised():
    assert normalize_number("1,000") == "1000"
    assert normalize_number("3.50") == "3.5"
    assert normalize_number("-0") == "0"
    assert normalize_number("12.") == "12"
    assert normalize_number("abc") is None


def test_exact_match_reads_the_final_answer():
    assert exact_match("so 5+5=10\n#### 10", "#### 10")
    assert exact_match("#### 1,000", "1000")
    assert not exact_match("#### 11", "#### 10")
    # Without '####' only the flexible fallback reads the last number.
    assert not exact_match("The answer is 10.", "#### 10")
    assert exact_match("The answer is 10.", "#### 10", fallback="last_number")
    assert extract_answer("no number here", fallback="last_number") is None
