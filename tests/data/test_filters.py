from __future__ import annotations

from frontierlm.console import console
from frontierlm.data.dedup import ExactDedup, normalize
from frontierlm.data.documents import Document
from frontierlm.data.filters import AlphaFilter, LengthFilter
from frontierlm.data.pipeline import run_steps, steps_table


def doc(text: str, source: str = "s") -> Document:
    return Document(id=text[:10], text=text, meta={"source": source})


def test_length_filter_reasons() -> None:
    f = LengthFilter(min_chars=20, min_words=5)
    assert f.drop_reason(doc("")) == "empty"
    assert f.drop_reason(doc(" \n\t ")) == "empty"
    assert f.drop_reason(doc("one two three")) == "too_short_chars"  # 13 chars
    assert f.drop_reason(doc("supercalifragilistic word")) == "too_few_words"  # 25 chars, 2 words
    assert f.drop_reason(doc("the cat sat on the mat today")) is None  # 28 chars, 7 words


def test_alpha_filter_fraction_and_meta() -> None:
    f = AlphaFilter(min_alpha_fraction=0.5)
    d = doc("abc 12345")  # 3 letters of 8 non-space chars
    assert f.drop_reason(d) == "mostly_non_text"
    assert d.meta["alpha_fraction"] == 0.375
    d = doc("héllo wörld 42!")  # 10 letters (accents count) of 13 non-space chars
    assert f.drop_reason(d) is None
    assert d.meta["alpha_fraction"] == round(10 / 13, 4)
    assert f.drop_reason(doc("   ")) == "mostly_non_text"


def test_exact_dedup_collapses_formatting_variants_only() -> None:
    texts = [
        "Hello   World.\nThis is a test.",
        "hello world. this IS a test.  ",
        "Ｈｅｌｌｏ World. This is a test.",  # full-width letters: NFKC folds them
        "Hello World. This is a test!",  # different punctuation: kept
        "There are 3 apples.",
        "There are 4 apples.",  # digits matter (GSM8K variants)
    ]
    docs = [doc(t) for t in texts]
    out, (stats,) = run_steps(docs, [ExactDedup()])
    kept = [d.text for d in out]
    assert kept == [texts[0], texts[3], texts[4], texts[5]]
    assert stats.dropped == {"exact_duplicate": 2}
    assert (stats.docs_in, stats.docs_out) == (6, 4)
    assert docs[0].meta["dedup_hash"] == docs[1].meta["dedup_hash"]
    assert len(docs[0].meta["dedup_hash"]) == 32  # 128-bit digest
    assert normalize(" A\u00a0 B ") == "a b"


def test_steps_chain_counts_per_step_and_source() -> None:
    docs = [
        doc("", "web"),
        doc("%%%% #### 1234 5678 !!!! ????", "web"),
        doc("a perfectly normal sentence with words", "books"),
        doc("A perfectly normal sentence with   words", "books"),
    ]
    out, stats = run_steps(docs, [LengthFilter(10, 3), AlphaFilter(0.5), ExactDedup()])
    assert [d.meta["source"] for d in out] == ["books"]
    assert [(s.name, s.docs_in, s.docs_out) for s in stats] == [
        ("length", 4, 3),
        ("alpha", 3, 2),
        ("exact_dedup", 2, 1),
    ]
    assert stats[0].dropped_by_source == {("web", "empty"): 1}
    record = stats[1].to_dict()
    assert record.pop("seconds") >= 0.0
    assert record == {
        "step": "alpha",
        "in": 3,
        "out": 2,
        "dropped": {"mostly_non_text": 1},
        "counts": {},
    }
    with console.capture() as cap:
        console.print(steps_table(stats))
    assert "exact_duplicate 1" in cap.get()


def test_words_are_split_once() -> None:
    d = doc("a b  c")
    assert d.words is d.words
    assert d.words == ["a", "b", "c"]


def test_count_letters_equals_isalpha_on_any_text(repo_data) -> None:
    from frontierlm.data.filters import count_letters

    tricky = [
        "",
        "plain ASCII, digits 123 and _underscores_ @ [ ` { \x7f",
        "ÀÉ ñ café",  # Latin-1 letters: bytes >= 128 in UTF-8
        "½²³ ǅ Ⅻ ٣",  # numbers that are not letters, a titlecase letter, a Roman numeral
        "x\u0301y 日本語テキスト 🙂",  # combining mark, CJK, emoji
        "a\udc80b\ud800c",  # lone surrogates carried in a str
    ]
    shakespeare = (repo_data / "tinyshakespeare/input.txt").read_text(encoding="utf-8")
    pieces = [shakespeare[i : i + 5000] for i in range(0, len(shakespeare), 5000)]
    for text in tricky + pieces:
        assert count_letters(text) == sum(map(str.isalpha, text)), text[:40]
