from __future__ import annotations

import gzip
import json
import typing
from pathlib import Path

import pytest

from frontierlm.config import DataConfig, DataSource, load_config
from frontierlm.data import build_steps
from frontierlm.data.decontam import (
    EVAL_SETS,
    Decontaminate,
    NgramIndex,
    eval_set_files,
    normalized_words,
)
from frontierlm.data.documents import Document
from frontierlm.data.pipeline import StepStats, run_steps
from frontierlm.stages import external_files

REPO = Path(__file__).resolve().parents[2]

# Real prose around the pasted items: the start of a Common Crawl page the repo ships.
PAGE_HEAD = (
    "Welcome to our homework help forum. Members post the problems they are stuck on and "
    "volunteers answer within a day. Here is the one from this week's thread:\n\n"
)
PAGE_TAIL = "\n\nReply below with your working, and please be kind to new members of the forum."


def _records(path: Path) -> list[dict]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def index() -> NgramIndex:
    return NgramIndex(["gsm8k_test", "humaneval", "mmlu_test"], 13)


def test_config_names_are_the_shipped_eval_sets() -> None:
    hint = typing.get_type_hints(DataConfig)["decontaminate"]
    (literal,) = typing.get_args(hint)
    assert set(typing.get_args(literal)) == set(EVAL_SETS)
    for path in eval_set_files(list(EVAL_SETS)):
        assert path.is_file(), path
    assert DataConfig(sources=[DataSource(name="x", path="x")]).decontaminate == []


def test_pasted_gsm8k_test_questions_are_caught_with_their_item(
    index: NgramIndex, repo_data: Path
) -> None:
    test = _records(repo_data / "gsm8k/test.jsonl.gz")
    assert len(test) == 1319
    step = Decontaminate([], index=index)
    docs = []
    # Every 40th real test question, re-typed: upper case, extra spaces, punctuation moved.
    for i in range(0, len(test), 40):
        pasted = "  ".join(test[i]["question"].upper().replace(",", " ,").split())
        docs.append(Document(f"page-{i}", PAGE_HEAD + pasted + PAGE_TAIL, {"source": "web"}))
    kept, stats = run_steps(iter(docs), [step])
    assert list(kept) == []
    (st,) = stats
    assert st.dropped == {"contaminated:gsm8k_test": len(docs)}
    assert st.counts["gsm8k_test"] == len(docs)
    for doc, i in zip(docs, range(0, len(test), 40), strict=True):
        assert str(i) in doc.meta["contaminated"]["gsm8k_test"]


def test_twelve_shared_words_are_not_contamination(index: NgramIndex, repo_data: Path) -> None:
    test = _records(repo_data / "gsm8k/test.jsonl.gz")
    step = Decontaminate([], index=index)
    checked = 0
    for i, record in enumerate(test[:200]):
        words = normalized_words(record["question"])
        if len(words) < 13:
            continue
        near = Document(f"near-{i}", PAGE_HEAD + " ".join(words[:12]) + PAGE_TAIL)
        exact = Document(f"hit-{i}", PAGE_HEAD + " ".join(words[:13]) + PAGE_TAIL)
        assert step.apply(near, _stats()) is not None, record["question"]
        assert step.apply(exact, _stats()) is None, record["question"]
        checked += 1
    assert checked > 190


def test_gsm8k_train_is_not_flagged_except_real_overlaps(
    index: NgramIndex, repo_data: Path
) -> None:
    """The quickstart pretrains on GSM8K train: its documents must pass, except those that
    really share 13 words in a row with a test problem (found here by brute force)."""
    train = _records(repo_data / "gsm8k/train.jsonl.gz")
    test = _records(repo_data / "gsm8k/test.jsonl.gz")

    def grams(text: str) -> set[tuple[str, ...]]:
        w = normalized_words(text)
        return {tuple(w[i : i + 13]) for i in range(len(w) - 12)}

    test_grams = set().union(*(grams(r["question"]) | grams(r["answer"]) for r in test))
    step = Decontaminate([], index=index)
    flagged, expected = set(), set()
    for i, r in enumerate(train):
        text = f"Question: {r['question']}\nAnswer: {r['answer']}"
        if step.apply(Document(str(i), text), _stats()) is None:
            flagged.add(i)
        # The template's words join question and answer: check them as the document has them.
        if grams(text) & test_grams:
            expected.add(i)
    assert flagged == expected
    # GSM8K's own train/test overlap: a handful of near-identical problems (0.13%).
    assert 0 < len(flagged) <= 12


def test_humaneval_and_mmlu_items_are_attributed(index: NgramIndex, repo_data: Path) -> None:
    with gzip.open(repo_data / "humaneval/HumanEval.jsonl.gz", "rt", encoding="utf-8") as f:
        problem = [json.loads(line) for line in f][17]
    # Solution code pasted with different indentation into a blog post.
    source = problem["prompt"] + problem["canonical_solution"]
    code = "\n".join(line.strip() for line in source.splitlines())
    blog = Document("blog", PAGE_HEAD + code.replace("\n", " ") + PAGE_TAIL)
    quiz = Document(
        "quiz",
        PAGE_HEAD
        + "A lesion causing compression of the facial nerve at the stylomastoid foramen will "
        "cause ipsilateral: (a) paralysis of the facial muscles. (b) paralysis of the facial "
        "muscles and loss of taste." + PAGE_TAIL,
    )
    step = Decontaminate([], index=index, mode="flag")
    kept, stats = run_steps(iter([blog, quiz]), [step])
    assert [d.id for d in kept] == ["blog", "quiz"]  # flag mode keeps them
    assert blog.meta["contaminated"] == {"humaneval": [problem["task_id"]]}
    assert quiz.meta["contaminated"] == {"mmlu_test": ["anatomy/0"]}
    assert stats[0].counts == {"humaneval": 1, "mmlu_test": 1}
    assert not stats[0].dropped


def test_build_steps_orders_decontamination_and_fingerprints_eval_files(tmp_path: Path) -> None:
    cfg = DataConfig(
        sources=[DataSource(name="x", path="x")],
        minhash=True,
        decontaminate=["gsm8k_test"],
        decontam_mode="flag",
        pii=True,
    )
    names = [s.name for s in build_steps(cfg, tmp_path)]
    assert names == ["length", "alpha", "exact_dedup", "minhash", "decontam", "pii"]
    recipe = load_config(REPO / "recipes/quickstart.toml", [])
    recipe.data.decontaminate = ["gsm8k_test"]
    files = external_files(recipe, "data")
    assert any(f.endswith("gsm8k/test.jsonl.gz") for f in files)
    assert not any("humaneval" in f for f in files)


def _stats() -> StepStats:
    return StepStats("t")
