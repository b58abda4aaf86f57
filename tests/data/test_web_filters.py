"""Web filters at their published thresholds: each rule just below and just above its limit."""

from __future__ import annotations

from collections import Counter

import pytest

from frontierlm.config import ConfigError, DataConfig, DataSource
from frontierlm.data import build_steps
from frontierlm.data.documents import Document
from frontierlm.data.pipeline import StepStats
from frontierlm.data.text import count_sentences, word_tokens
from frontierlm.data.web_filters import (
    C4Filter,
    FineWebQualityFilter,
    GopherQualityFilter,
    GopherRepetitionFilter,
    LanguageFilter,
    URLFilter,
)

# Seven distinct words, mean length 4, four of them stop words.
CYCLE = ["the", "river", "flows", "to", "and", "with", "stones"]


def words(n: int) -> str:
    return " ".join(CYCLE[i % len(CYCLE)] for i in range(n))


def doc(text: str, **meta: str) -> Document:
    return Document("d", text, dict(meta))


# ----------------------------------------------------------------------------- tokenizer


def test_word_tokens_split_punctuation_like_spacy() -> None:
    assert word_tokens("Hello, world. It's (really) well-known: e.g. U.S.A. don't 10km...") == [
        "Hello", ",", "world", ".", "It", "'s", "(", "really", ")", "well", "-", "known",
        ":", "e.g.", "U.S.A.", "do", "n't", "10", "km", "...",
    ]  # fmt: skip
    assert word_tokens("see https://example.com/a-b, ok") == [
        "see", "https://example.com/a-b", ",", "ok",
    ]  # fmt: skip
    assert word_tokens("f(x): :)") == ["f(x", "):", ":)"]


def test_count_sentences() -> None:
    assert count_sentences("One. Two! Three? four") == 4
    assert count_sentences('He said "stop." Then left.') == 2
    assert count_sentences("No end mark") == 1


# ----------------------------------------------------------------------------- Gopher quality


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        (words(49), "gopher_short_doc"),
        (words(50), None),
        ("the and " + "cat " * 48, None),  # mean word length exactly 3
        ("the and " + "cat " * 47 + "ca", "gopher_below_avg_word_len"),
        ("the and " + "abcdefghij " * 48, None),  # exactly 10 (3+3+480)/50 < 10
        ("the and " + "abcdefghijklmn " * 48, "gopher_above_avg_word_len"),
        (words(100) + " #" * 11, None),  # 11 / 111 words
        (words(100) + " #" * 12, "gopher_too_many_hashes"),  # 12 / 112 > 0.1
        (words(50) + " ..." * 12 + " " + words(50), "gopher_too_many_ellipsis"),
        (words(50) + " ..." * 11 + " " + words(50), None),
        ("\n".join("- " + words(10) for _ in range(10)), "gopher_too_many_bullets"),
        ("\n".join(["- " + words(10)] * 9 + [words(10)]), None),  # 0.9 is allowed
        ("\n".join([words(10) + " ..."] * 3 + [words(10)] * 7), None),  # 0.3 is allowed
        ("\n".join([words(10) + " ..."] * 4 + [words(10)] * 6), "gopher_too_many_end_ellipsis"),
        (words(100) + " 123" * 25, None),  # 100 / 125 = 0.8 have a letter
        (words(100) + " 123" * 26, "gopher_below_alpha_words"),
        (" ".join(["river", "flows", "stones", "the"] * 20), "gopher_few_stop_words"),
        (" ".join(["river", "flows", "stones", "the", "and"] * 20), None),
    ],
)
def test_gopher_quality_thresholds(text: str, reason: str | None) -> None:
    assert GopherQualityFilter().drop_reason(doc(text)) == reason


def test_gopher_quality_max_words_and_punctuation_not_counted() -> None:
    assert GopherQualityFilter(max_words=60).drop_reason(doc(words(61))) == "gopher_long_doc"
    # 49 words plus punctuation tokens is still 49 words.
    assert GopherQualityFilter().drop_reason(doc(words(49) + " , ; ! ?")) == "gopher_short_doc"


# ----------------------------------------------------------------------------- Gopher repetition


def test_gopher_repetition_paragraphs_and_lines() -> None:
    f = GopherRepetitionFilter()
    paras = [" ".join(f"p{i}w{j}" for j in range(12)) for i in range(10)]
    # 3 repeats of "x" among 10 paragraphs is 0.3, allowed; 4 among 11 is 0.36.
    assert f.drop_reason(doc("\n\n".join(paras[:6] + ["x"] * 4))) is None
    assert f.drop_reason(doc("\n\n".join(paras[:6] + ["x"] * 5))) == "gopher_dup_para_frac"
    # One paragraph repeated once among four: 1/4 items, but 24.5% of the characters.
    assert f.drop_reason(doc("\n\n".join(paras[:3] + paras[:1]))) == "gopher_dup_para_char_frac"
    # Lines (single newlines): 4 repeats among 10.
    lines = paras[:6] + ["same"] * 4
    assert f.drop_reason(doc("\n".join(lines))) is None  # 3 of 10
    assert f.drop_reason(doc("\n".join([*lines, "same"]))) == "gopher_dup_line_frac"
    assert f.drop_reason(doc("\n".join(paras[:3] + paras[:1]))) == "gopher_dup_line_char_frac"


def test_gopher_repetition_ngrams() -> None:
    f = GopherRepetitionFilter()
    # "the river" (9 chars) x 30 in a text of ~600 chars: 0.45 > 0.20.
    assert f.drop_reason(doc("the river " * 30 + words(40))).startswith("gopher_top_2")
    distinct = " ".join(f"w{i}" for i in range(300))
    assert f.drop_reason(doc(distinct)) is None
    # A repeated 10-word run: 5-gram repeats cover the second copy.
    run = " ".join(f"r{i}x" for i in range(30))
    # A 30-word run repeated: the second copy is ~30% of the characters.
    assert f.drop_reason(doc(distinct[:140] + " " + run + " " + run)) == "gopher_dup_5_gram"


# ----------------------------------------------------------------------------- C4


def test_c4_line_removal_counts() -> None:
    text = "\n".join(
        [
            "This line ends well. It has two sentences.",
            "no terminal punctuation here",
            "Too short.",
            "Please enable JavaScript to view this page.",
            "Read our privacy policy before you continue.",
            "A third good line is here [1]. And more! Yes?",
            "word " * 3 + "x" * 1001 + ".",
        ]
    )
    stats = StepStats("c4")
    out = C4Filter().apply(doc(text), stats)
    assert out is not None
    assert out.text == (
        "This line ends well. It has two sentences.\nA third good line is here . And more! Yes?"
    )
    assert stats.counts["line_no_terminal_punct"] == 1
    assert stats.counts["line_too_few_words"] == 1
    assert stats.counts["line_javascript"] == 1
    assert stats.counts["line_policy"] == 1
    assert stats.counts["line_too_long_word"] == 1
    assert stats.counts["lines"] == 7
    assert stats.counts["rewritten"] == 1


FOUR_SENTENCES = "One two three. Four five six. Seven eight nine. Ten eleven twelve."


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        (FOUR_SENTENCES, "c4_too_few_sentences"),
        (FOUR_SENTENCES + " Go on now.", None),
        ("Lorem ipsum dolor sit amet. " * 5, "c4_lorem_ipsum"),
        ("Call f() with {x: 1} now. " * 5, "c4_curly_bracket"),
        ("a line without a {brace} or stop\n" + "Fine words here. " * 5, None),
    ],
)  # fmt: skip
def test_c4_document_rules(text: str, reason: str | None) -> None:
    f = C4Filter()
    assert f.apply(doc(text), StepStats("c4")) is None if reason else True
    assert f.drop_reason(doc(text)) == reason


# ----------------------------------------------------------------------------- FineWeb


def test_fineweb_rules() -> None:
    f = FineWebQualityFilter()
    long_line = "This is a long enough line of prose for the short line rule"
    # 1 of 9 lines ends in punctuation: 0.111 < 0.12; 1 of 8 = 0.125 passes.
    assert f.drop_reason(doc("\n".join([long_line + "."] + [long_line] * 8))) == (
        "fineweb_line_punct_ratio"
    )
    distinct = [f"{long_line} {i}." for i in range(8)]
    assert f.drop_reason(doc("\n".join(distinct))) is None
    # 7 short of 10 lines (0.7 > 0.67), every line ends a sentence.
    short = "\n".join([f"Short {i}." for i in range(7)] + distinct[:3])
    assert f.drop_reason(doc(short)) == "fineweb_short_line_ratio"
    assert f.drop_reason(doc("\n".join([*distinct, distinct[0]]))) == "fineweb_char_dup_ratio"
    listy = "\n".join(f"Item number{i} is long enough to pass." for i in range(20))
    assert f.drop_reason(doc(listy)) is None
    # Long lines (padded) of two tokens each: 19 newlines / 40 words > 0.3.
    tiny = "\n".join(" " * 30 + f"Go{i}!" for i in range(20))
    assert f.drop_reason(doc(tiny)) == "fineweb_list_ratio"


# ----------------------------------------------------------------------------- URL, language


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        (None, None),
        ("https://www.example.org/news/2024/rivers", None),
        ("https://pornhub.com/view", "url_domain"),
        ("https://de.xhamster.com/x", "url_domain"),
        ("https://example.org/free-porn-videos", "url_banned_word"),
        ("https://example.org/PORN", None),  # words are matched as written, lists are lower case
        ("https://example.org/hot-girls", "url_soft_banned_words"),
        ("https://example.org/hot-stuff", None),
        ("https://myfreepornsite.example/", "url_banned_subword"),
    ],
)
def test_url_filter(url: str | None, reason: str | None) -> None:
    meta = {} if url is None else {"url": url}
    assert URLFilter().drop_reason(doc("text", **meta)) == reason


def test_url_filter_extra_lists_and_threshold() -> None:
    assert URLFilter(extra_domains=["blocked.test"]).drop_reason(
        doc("t", url="http://a.blocked.test/")
    ) == ("url_domain")
    one_soft = doc("t", url="https://example.org/hot-news")
    assert URLFilter(soft_word_threshold=1).drop_reason(one_soft) == "url_soft_banned_words"


def test_language_filter_scores_and_meta() -> None:
    f = LanguageFilter(["en"], 0.65)
    english = doc("The quick brown fox jumps over the lazy dog while the river flows to the sea.")
    assert f.drop_reason(english) is None
    assert english.meta["language"] == "en" and english.meta["language_score"] >= 0.65
    german = doc("Der schnelle braune Fuchs springt über den faulen Hund und läuft zum Fluss.")
    assert f.drop_reason(german) == "language_other"
    assert german.meta["language"] == "de"
    assert LanguageFilter(["en"], 1.0).drop_reason(english) == "language_low_score"


# ----------------------------------------------------------------------------- config


def _cfg(**data: object) -> DataConfig:
    return DataConfig(sources=[DataSource(name="s", path="x.jsonl")], **data)


def test_build_steps_order_and_default_off() -> None:
    assert [s.name for s in build_steps(_cfg())] == ["length", "alpha", "exact_dedup"]
    steps = build_steps(_cfg(filters=["fineweb", "c4", "language", "url", "gopher_quality"]))
    assert [s.name for s in steps] == [
        "length", "alpha", "language", "url", "gopher_quality", "c4", "fineweb", "exact_dedup",
    ]  # fmt: skip


def test_config_thresholds_reach_the_steps() -> None:
    cfg = _cfg(
        filters=["gopher_quality", "language"],
        gopher={"min_words": 10},
        language={"languages": ["de", "fr"], "min_score": 0.5},
    )
    steps = {s.name: s for s in build_steps(cfg)}
    assert steps["gopher_quality"].min_words == 10  # type: ignore[attr-defined]
    assert steps["language"].languages == {"de", "fr"}  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"filters": ["gopher"]}, "gopher_quality"),
        ({"filters": ["c4", "c4"]}, "more than once"),
        ({"gopher": {"min_words": 10, "max_words": 5}}, "exceeds data.gopher.max_words"),
        ({"language": {"languages": ["English"]}}, "not language codes"),
        ({"language": {"min_score": 1.5}}, "less than or equal to 1"),
        ({"fineweb": {"line_punct_thr": -0.1}}, "greater than or equal to 0"),
        ({"c4": {"min_sentence": 3}}, "Extra inputs are not permitted"),
    ],
)
def test_config_validation_messages(data: dict[str, object], message: str) -> None:
    with pytest.raises((ValueError, ConfigError), match=message):
        _cfg(**data)


def test_c4_rewrite_counts_are_named() -> None:
    counts: Counter[str] = Counter()
    C4Filter().rewrite(doc("Too short.\nnope"), counts)
    assert counts == Counter(lines=2, line_too_few_words=1, line_no_terminal_punct=1)
