"""Web-text heuristics with their published defaults: language id, URL block list, Gopher
repetition and quality (Rae et al. 2021, table A1), C4 (Raffel et al. 2020) and FineWeb's own
three rules (Penedo et al. 2024), in FineWeb's order.

Each rule has its own drop reason so `stats.json` says which rule removed what. Thresholds and
the exact counting (which characters are punctuation, how words are split) follow datatrove's
implementations, the reference FineWeb was built with, so the published numbers keep their
meaning; tests/data/test_web_filters_reference.py checks decision agreement with datatrove.
Words come from `Document.tokens` (frontierlm/data/text.py), split once per text and shared.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Sequence
from functools import cache
from importlib import resources
from itertools import compress
from operator import add, itemgetter
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from frontierlm.data.documents import Document
from frontierlm.data.pipeline import Step
from frontierlm.data.text import SENTENCE_END, count_sentences

# Characters that make a word "only symbols" for Gopher's word counts: ASCII punctuation, the
# common typographic and CJK marks, and control characters (as datatrove's PUNCTUATION set).
_PUNCTUATION = (
    "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~"
    "—”“„’´«»…►━–"
    "％１〈〉《》「」【】、，；？！：（）。．～∶"
    + "".join(map(chr, [*range(0, 9), *range(11, 32), *range(127, 160)]))
)
# Sentence-final marks a line may end with for FineWeb's punctuation rule.
TERMINAL_PUNCTUATION = tuple(SENTENCE_END | set("｡꓿"))
_SYMBOL_CHARS = _PUNCTUATION + "".join(TERMINAL_PUNCTUATION)

STOP_WORDS = ("the", "be", "to", "of", "and", "that", "have", "with")


def _duplicates(items: Iterable[str]) -> tuple[int, int]:
    """(elements seen before, their characters): later copies count, the first does not."""
    seen: set[str] = set()
    dup_items = dup_chars = 0
    for item in items:
        if item in seen:
            dup_items += 1
            dup_chars += len(item)
        else:
            seen.add(item)
    return dup_items, dup_chars


def _has_letter(word: str) -> bool:
    return word.isalpha() or any(c.isalpha() for c in word)


# ----------------------------------------------------------------------------- language


class LanguageFilter(Step):
    """Keep documents whose most likely language (py3langid, 97 languages, model inside the
    pip package) is one of `languages` with probability >= `min_score` (FineWeb: 0.65).
    Records `meta["language"]` and `meta["language_score"]` for every document it sees."""

    name = "language"

    def __init__(self, languages: Sequence[str] = ("en",), min_score: float = 0.65) -> None:
        self.languages = frozenset(languages)
        self.min_score = min_score
        self._model: Any = None

    def _identifier(self) -> Any:
        # Loaded on first use (~0.7 s) so that building the steps stays instant.
        if self._model is None:
            from py3langid import langid

            # MODEL_FILE is relative to the package directory.
            path = Path(langid.__file__).parent / langid.MODEL_FILE
            self._model = langid.LanguageIdentifier.from_modelpath(path, norm_probs=True)
        return self._model

    def drop_reason(self, doc: Document) -> str | None:
        # Newlines carry no language signal; joining lines keeps word boundaries intact.
        lang, score = self._identifier().classify(doc.text.replace("\n", " "))
        doc.meta["language"] = lang
        doc.meta["language_score"] = round(float(score), 4)
        if lang not in self.languages:
            return "language_other"
        if score < self.min_score:
            return "language_low_score"
        return None


# ----------------------------------------------------------------------------- URL

_URL_WORD_SPLIT = re.compile(r"[^a-zA-Z0-9]+")


def _normalize_word(word: str) -> str:
    return _URL_WORD_SPLIT.sub("", word).lower()


@cache
def shipped_list(name: str) -> frozenset[str]:
    """One word or domain per line from frontierlm/data/lists/; '#' starts a comment line."""
    text = resources.files("frontierlm.data").joinpath("lists", name).read_text("utf-8")
    return frozenset(
        line.strip() for line in text.splitlines() if line.strip() and line.lstrip()[0] != "#"
    )


class URLFilter(Step):
    """Drop documents whose `meta["url"]` is on the block list: the host or any parent domain
    is listed, a banned word is one of the URL's words, `soft_word_threshold` soft-banned words
    are, or a banned subword occurs anywhere in the URL with punctuation removed. Documents
    without a URL pass. Lists: frontierlm/data/lists/*.txt plus the `extra_*` arguments."""

    name = "url"

    def __init__(
        self,
        soft_word_threshold: int = 2,
        extra_domains: Iterable[str] = (),
        extra_banned_words: Iterable[str] = (),
        extra_banned_subwords: Iterable[str] = (),
        extra_soft_banned_words: Iterable[str] = (),
    ) -> None:
        self.soft_word_threshold = soft_word_threshold
        self.domains = shipped_list("url_domains.txt") | {d.lower() for d in extra_domains}
        # Words are compared in normalised form (letters and digits, lower case).
        self.banned_words = frozenset(
            map(_normalize_word, shipped_list("url_banned_words.txt") | set(extra_banned_words))
        )
        self.soft_banned_words = frozenset(
            map(
                _normalize_word,
                shipped_list("url_soft_banned_words.txt") | set(extra_soft_banned_words),
            )
        )
        subwords = sorted(
            map(
                _normalize_word,
                shipped_list("url_banned_subwords.txt") | set(extra_banned_subwords),
            )
        )
        # One alternation scans the URL once, however long the list.
        self._subword_re = re.compile("|".join(map(re.escape, subwords))) if subwords else None

    def drop_reason(self, doc: Document) -> str | None:
        url = doc.meta.get("url")
        if not url:
            return None
        host = (urlsplit(url).hostname or "").rstrip(".")
        labels = host.split(".")
        if any(".".join(labels[i:]) in self.domains for i in range(len(labels) - 1)):
            return "url_domain"
        # Case is kept on the URL side, as datatrove does: the lists are lower case, so "XXX"
        # in a URL does not match "xxx" (path segments often carry ids, not words).
        words = set(_URL_WORD_SPLIT.split(url))
        if not self.banned_words.isdisjoint(words):
            return "url_banned_word"
        if len(self.soft_banned_words & words) >= self.soft_word_threshold:
            return "url_soft_banned_words"
        if self._subword_re is not None and self._subword_re.search(_normalize_word(url)):
            return "url_banned_subword"
        return None


# ----------------------------------------------------------------------------- Gopher

_PARAGRAPH_BREAK = re.compile(r"\n{2,}")
_LINE_BREAKS = re.compile(r"\n+")


class GopherRepetitionFilter(Step):
    """Gopher's repetition rules: duplicate paragraphs and lines (share of items and of
    characters), the most frequent 2/3/4-gram's share of characters, and the share of
    characters inside repeated 5..10-grams. Reasons `gopher_<rule>`."""

    name = "gopher_repetition"

    def __init__(
        self,
        dup_line_frac: float = 0.3,
        dup_para_frac: float = 0.3,
        dup_line_char_frac: float = 0.2,
        dup_para_char_frac: float = 0.2,
        top_n_grams: Sequence[tuple[int, float]] = ((2, 0.20), (3, 0.18), (4, 0.16)),
        dup_n_grams: Sequence[tuple[int, float]] = (
            (5, 0.15),
            (6, 0.14),
            (7, 0.13),
            (8, 0.12),
            (9, 0.11),
            (10, 0.10),
        ),
    ) -> None:
        self.dup_line_frac = dup_line_frac
        self.dup_para_frac = dup_para_frac
        self.dup_line_char_frac = dup_line_char_frac
        self.dup_para_char_frac = dup_para_char_frac
        self.top_n_grams = tuple(top_n_grams)
        self.dup_n_grams = tuple(dup_n_grams)

    def drop_reason(self, doc: Document) -> str | None:
        text = doc.text
        if not text:
            return "gopher_empty"
        n_chars = len(text)
        paragraphs = _PARAGRAPH_BREAK.split(text.strip())
        dup, dup_chars = _duplicates(paragraphs)
        if dup / len(paragraphs) > self.dup_para_frac:
            return "gopher_dup_para_frac"
        if dup_chars / n_chars > self.dup_para_char_frac:
            return "gopher_dup_para_char_frac"
        lines = _LINE_BREAKS.split(text)
        dup, dup_chars = _duplicates(lines)
        if dup / len(lines) > self.dup_line_frac:
            return "gopher_dup_line_frac"
        if dup_chars / n_chars > self.dup_line_char_frac:
            return "gopher_dup_line_char_frac"

        words = doc.tokens
        for n, limit in self.top_n_grams:
            if len(words) < n:
                continue
            counts = Counter(zip(*(words[i:] for i in range(n)), strict=False))
            # max() keeps the first n-gram among equal counts, as Counter.most_common does.
            gram, count = max(counts.items(), key=itemgetter(1))
            if (sum(map(len, gram)) + n - 1) * count / n_chars > limit:
                return f"gopher_top_{n}_gram"
        # The n-grams for n = 5, 6, ... grow by one word each: the (n+1)-grams are the n-grams
        # with the next word appended (one C-level concatenation per position instead of a
        # join of n words), so the 5..10-grams cost about as much as building the 5-grams.
        grams: list[str] = []
        grams_n = 0
        for n, limit in self.dup_n_grams:
            if len(words) < n:
                continue
            if grams_n and n == grams_n + 1:
                grams = list(map(add, grams, words[n - 1 :]))
            else:
                grams = _joined_ngrams(words, n)
            grams_n = n
            if _repeated_chars(grams, n) / n_chars > limit:
                return f"gopher_dup_{n}_gram"
        return None


def _joined_ngrams(words: list[str], n: int) -> list[str]:
    """Every run of n consecutive words, concatenated without a separator (as datatrove keys
    them), in order."""
    grams = list(words)
    for k in range(1, n):
        # map() stops at the shorter input: one gram fewer per extra word.
        grams = list(map(add, grams, words[k:]))
    return grams


def _repeated_ngram_chars(words: list[str], n: int) -> int:
    """Characters in n-grams (words concatenated) seen earlier in the document, scanning left to
    right and jumping past each repeat so that overlapping repeats are not counted twice."""
    if len(words) < n:
        return 0
    return _repeated_chars(_joined_ngrams(words, n), n)


def _repeated_chars(grams: list[str], n: int) -> int:
    """`_repeated_ngram_chars` given the document's joined n-grams.

    The left-to-right walk adds each visited n-gram to a seen set, or, when it is already
    there, counts it and skips the next n - 1 positions. An n-gram that occurs once in the
    document can never be found in the set nor skip anything, so only positions whose n-gram
    occurs twice or more are walked (found with C-level counting; on web text a few percent of
    the positions). Whether such a position is skipped depends only on the last counted
    repeat before it, which the walk tracks as `resume`.
    """
    counts = Counter(grams)
    if len(counts) == len(grams):
        # No n-gram occurs twice: nothing to walk (the common case for clean prose, large n).
        return 0
    multiple = compress(range(len(grams)), map((1).__lt__, map(counts.__getitem__, grams)))
    seen: set[str] = set()
    repeated = 0
    resume = 0  # positions before this one were skipped by the last counted repeat
    for i in multiple:
        if i < resume:
            continue
        gram = grams[i]
        if gram in seen:
            repeated += len(gram)
            resume = i + n
        else:
            seen.add(gram)
    return repeated


class GopherQualityFilter(Step):
    """Gopher's quality rules on the document's words: word count, mean word length, '#' and
    ellipsis per word, bullet and ellipsis-ended lines, share of words with a letter, and a
    minimum of English stop words. Reasons `gopher_<rule>`."""

    name = "gopher_quality"

    def __init__(
        self,
        min_words: int = 50,
        max_words: int = 100_000,
        min_avg_word_length: float = 3,
        max_avg_word_length: float = 10,
        max_symbol_word_ratio: float = 0.1,
        max_bullet_lines_ratio: float = 0.9,
        max_ellipsis_lines_ratio: float = 0.3,
        min_alpha_words_ratio: float = 0.8,
        min_stop_words: int = 2,
        stop_words: Iterable[str] = STOP_WORDS,
    ) -> None:
        self.min_words = min_words
        self.max_words = max_words
        self.min_avg_word_length = min_avg_word_length
        self.max_avg_word_length = max_avg_word_length
        self.max_symbol_word_ratio = max_symbol_word_ratio
        self.max_bullet_lines_ratio = max_bullet_lines_ratio
        self.max_ellipsis_lines_ratio = max_ellipsis_lines_ratio
        self.min_alpha_words_ratio = min_alpha_words_ratio
        self.min_stop_words = min_stop_words
        self.stop_words = frozenset(stop_words)

    def drop_reason(self, doc: Document) -> str | None:
        text = doc.text
        words = doc.tokens
        # Word counts and lengths leave out tokens made only of punctuation ("," "--").
        content = [w for w in words if w.strip(_SYMBOL_CHARS)]
        if len(content) < self.min_words:
            return "gopher_short_doc"
        if len(content) > self.max_words:
            return "gopher_long_doc"
        mean_len = sum(map(len, content)) / len(content) if content else 0.0
        if mean_len < self.min_avg_word_length:
            return "gopher_below_avg_word_len"
        if mean_len > self.max_avg_word_length:
            return "gopher_above_avg_word_len"
        # Ratios per word use every token, punctuation included.
        n_words = len(words)
        if text.count("#") / n_words > self.max_symbol_word_ratio:
            return "gopher_too_many_hashes"
        if (text.count("...") + text.count("…")) / n_words > self.max_symbol_word_ratio:
            return "gopher_too_many_ellipsis"
        lines = text.splitlines() or [""]
        bullets = sum(1 for line in lines if line.lstrip().startswith(("•", "-")))
        if bullets / len(lines) > self.max_bullet_lines_ratio:
            return "gopher_too_many_bullets"
        ellipsis_ends = sum(1 for line in lines if line.rstrip().endswith(("...", "…")))
        if ellipsis_ends / len(lines) > self.max_ellipsis_lines_ratio:
            return "gopher_too_many_end_ellipsis"
        with_letter = sum(1 for w in words if _has_letter(w))
        if with_letter / n_words < self.min_alpha_words_ratio:
            return "gopher_below_alpha_words"
        if len(self.stop_words.intersection(words)) < self.min_stop_words:
            return "gopher_few_stop_words"
        return None


# ----------------------------------------------------------------------------- C4

_CITATION = re.compile(r"\[\d*]|\[edit]|\[citation needed]")
_END_PUNCTUATION = (".", "?", "!", '"', "'")
_POLICY_PHRASES = (
    "terms of use",
    "privacy policy",
    "cookie policy",
    "uses cookies",
    "use of cookies",
    "use cookies",
)


class C4Filter(Step):
    """C4's rules. Per line (a `rewrite`, each removal counted as `line_<rule>`): drop lines
    with a word over `max_word_length` characters, without terminal punctuation (or ending in
    "..."), with fewer than `min_words_per_line` words, mentioning javascript, or a cookie/terms
    phrase; Wikipedia citation marks are cut out. Per document: drop when a kept line has
    "lorem ipsum" or "{", or the kept lines hold fewer than `min_sentences` sentences."""

    name = "c4"

    def __init__(
        self,
        filter_no_terminal_punct: bool = True,
        min_sentences: int = 5,
        min_words_per_line: int = 3,
        max_word_length: int = 1000,
        remove_citations: bool = True,
        filter_lorem_ipsum: bool = True,
        filter_javascript: bool = True,
        filter_curly_bracket: bool = True,
        filter_policy: bool = True,
    ) -> None:
        self.filter_no_terminal_punct = filter_no_terminal_punct
        self.min_sentences = min_sentences
        self.min_words_per_line = min_words_per_line
        self.max_word_length = max_word_length
        self.remove_citations = remove_citations
        self.filter_lorem_ipsum = filter_lorem_ipsum
        self.filter_javascript = filter_javascript
        self.filter_curly_bracket = filter_curly_bracket
        self.filter_policy = filter_policy
        # rewrite() decides the document while it walks the lines; drop_reason() reads the
        # verdict for the same document instead of walking them again.
        self._verdict: tuple[str, str | None] | None = None

    def _judge(self, text: str, counts: Counter[str]) -> tuple[str, str | None]:
        """(text with only the kept lines, drop reason or None)."""
        kept: list[str] = []
        sentences = 0
        for raw in text.splitlines():
            line = raw.strip()
            words = line.split()
            counts["lines"] += 1
            if self.max_word_length >= 0 and any(len(w) > self.max_word_length for w in words):
                counts["line_too_long_word"] += 1
                continue
            if self.remove_citations:
                line = _CITATION.sub("", line)
            if self.filter_no_terminal_punct and (
                not line.endswith(_END_PUNCTUATION) or line.endswith("...")
            ):
                counts["line_no_terminal_punct"] += 1
                continue
            if len(words) < self.min_words_per_line:
                counts["line_too_few_words"] += 1
                continue
            lower = line.lower()
            if self.filter_lorem_ipsum and "lorem ipsum" in lower:
                return text, "c4_lorem_ipsum"
            if self.filter_javascript and "javascript" in lower:
                counts["line_javascript"] += 1
                continue
            if self.filter_curly_bracket and "{" in line:
                return text, "c4_curly_bracket"
            if self.filter_policy and any(p in lower for p in _POLICY_PHRASES):
                counts["line_policy"] += 1
                continue
            # Only whether the total reaches min_sentences matters: stop splitting once it does.
            if sentences < self.min_sentences:
                sentences += count_sentences(line)
            kept.append(line)
        if sentences < self.min_sentences:
            return text, "c4_too_few_sentences"
        return "\n".join(kept).strip(), None

    def rewrite(self, doc: Document, counts: Counter[str]) -> str | None:
        new_text, reason = self._judge(doc.text, counts)
        self._verdict = (new_text, reason)
        return None if reason is not None else new_text

    def drop_reason(self, doc: Document) -> str | None:
        verdict, self._verdict = self._verdict, None
        if verdict is not None and verdict[0] == doc.text:
            return verdict[1]
        # Called on its own (not through apply): judge the text as it is.
        return self._judge(doc.text, Counter())[1]


# ----------------------------------------------------------------------------- FineWeb


class FineWebQualityFilter(Step):
    """FineWeb's three rules over non-blank lines, then its list check: too few lines ending in
    terminal punctuation, too many short lines, too many characters in duplicated lines, or
    too many newlines per word. Reasons `fineweb_<rule>`."""

    name = "fineweb"

    def __init__(
        self,
        line_punct_thr: float = 0.12,
        short_line_thr: float = 0.67,
        short_line_length: int = 30,
        char_duplicates_ratio: float = 0.01,
        new_line_ratio: float = 0.3,
    ) -> None:
        self.line_punct_thr = line_punct_thr
        self.short_line_thr = short_line_thr
        self.short_line_length = short_line_length
        self.char_duplicates_ratio = char_duplicates_ratio
        self.new_line_ratio = new_line_ratio

    def drop_reason(self, doc: Document) -> str | None:
        text = doc.text
        lines = [line for line in text.split("\n") if line.strip()]
        if not lines:
            return "fineweb_empty"
        ended = sum(1 for line in lines if line.endswith(TERMINAL_PUNCTUATION))
        if ended / len(lines) < self.line_punct_thr:
            return "fineweb_line_punct_ratio"
        short = sum(1 for line in lines if len(line) <= self.short_line_length)
        if short / len(lines) > self.short_line_thr:
            return "fineweb_short_line_ratio"
        non_newline = len(text) - text.count("\n")
        if _duplicates(lines)[1] / non_newline > self.char_duplicates_ratio:
            return "fineweb_char_dup_ratio"
        n_words = len(doc.tokens)
        if not n_words or text.count("\n") / n_words > self.new_line_ratio:
            return "fineweb_list_ratio"
        return None
