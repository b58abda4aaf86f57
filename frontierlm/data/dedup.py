"""Exact deduplication on normalised text; the first occurrence is kept."""

from __future__ import annotations

import hashlib
import unicodedata

from frontierlm.data.documents import Document
from frontierlm.data.pipeline import Step


def normalize(text: str) -> str:
    """NFKC, casefold, whitespace runs collapsed to one space, ends stripped.

    Digits and punctuation are kept on purpose: GSM8K-style problems that differ only in their
    numbers are different documents, and "exact" should stay exact up to formatting. Fuzzier
    matching is MinHash's job, not this step's.
    """
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


class ExactDedup(Step):
    """Drop documents whose normalised text was already seen (reason `exact_duplicate`).

    Keeps a 128-bit blake2b digest per distinct document (16 bytes + set overhead, ~100 bytes
    each: ~100 MB per million documents) and writes it to `meta["dedup_hash"]`.
    """

    name = "exact_dedup"
    whole_stream = True

    def __init__(self) -> None:
        self.seen: set[bytes] = set()

    def drop_reason(self, doc: Document) -> str | None:
        digest = hashlib.blake2b(normalize(doc.text).encode("utf-8"), digest_size=16).digest()
        doc.meta["dedup_hash"] = digest.hex()
        if digest in self.seen:
            return "exact_duplicate"
        self.seen.add(digest)
        return None
