"""Heuristic quality filters; each reads the words the document split once (`Document.words`)."""

from __future__ import annotations

import re

from frontierlm.data.documents import Document
from frontierlm.data.pipeline import Step


class LengthFilter(Step):
    """Drop empty documents, then those under `min_chars` characters or `min_words` words."""

    name = "length"

    def __init__(self, min_chars: int, min_words: int) -> None:
        self.min_chars = min_chars
        self.min_words = min_words

    def drop_reason(self, doc: Document) -> str | None:
        # "empty" is its own reason because it counts pages the extractor found nothing in.
        if not doc.words:
            return "empty"
        if len(doc.text) < self.min_chars:
            return "too_short_chars"
        if len(doc.words) < self.min_words:
            return "too_few_words"
        return None


_NON_ASCII = re.compile(r"[^\x00-\x7f]+")
# Every byte that is not an ASCII letter: deleting them leaves the letters of an ASCII text.
_NOT_ASCII_LETTERS = bytes(b for b in range(256) if not chr(b).isalpha() or b > 127)


def count_letters(text: str) -> int:
    """How many characters of `text` satisfy str.isalpha, with C-level work for the ASCII part
    (most of the web and every code file): UTF-8 bytes of other characters are all >= 128, so
    deleting every byte but A-Z and a-z leaves exactly the ASCII letters; the other characters
    are few and asked one by one."""
    ascii_letters = len(text.encode("utf-8", "surrogatepass").translate(None, _NOT_ASCII_LETTERS))
    if text.isascii():
        return ascii_letters
    return ascii_letters + sum(map(str.isalpha, "".join(_NON_ASCII.findall(text))))


class AlphaFilter(Step):
    """Drop documents whose letters are under `min_alpha_fraction` of non-whitespace characters
    (tables of numbers, code dumps, symbol spam); records the share as `meta["alpha_fraction"]`."""

    name = "alpha"

    def __init__(self, min_alpha_fraction: float) -> None:
        self.min_alpha_fraction = min_alpha_fraction

    def drop_reason(self, doc: Document) -> str | None:
        # str.split cuts at exactly the characters str.isspace accepts, so the words' lengths
        # add up to the non-whitespace count without a second pass over the text.
        non_space = sum(map(len, doc.words))
        letters = count_letters(doc.text)
        fraction = letters / non_space if non_space else 0.0
        doc.meta["alpha_fraction"] = round(fraction, 4)
        return "mostly_non_text" if fraction < self.min_alpha_fraction else None
