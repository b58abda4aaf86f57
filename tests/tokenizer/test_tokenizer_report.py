"""`frontierlm tokenizer report`: compression counts, the FLOPs arithmetic, files and errors."""

from __future__ import annotations

import json

import pytest

from frontierlm.cli import main
from frontierlm.tokenizer.report import (
    build_report,
    compression,
    held_out_sets,
    tokenizer_encoder,
)
from frontierlm.tokenizer.train import CORE_SPECIAL_TOKENS, save_tokenizer, train_tokenizer


@pytest.fixture(scope="module")
def larger_tokenizer(sample_texts, tmp_path_factory):
    """A second vocab size trained on the same text, so FLOPs ratios have two sizes."""
    tok = train_tokenizer(sample_texts, vocab_size=2048)
    out = tmp_path_factory.mktemp("tokenizer-2048")
    save_tokenizer(tok, out)
    return tok, out


def test_compression_counts_by_hand():
    # A byte-only vocabulary (core specials + 256 bytes, no merges): every ASCII byte is one
    # token, so every count is known by hand.
    tok = train_tokenizer(["abc abc"], vocab_size=len(CORE_SPECIAL_TOKENS) + 256)
    texts = {"tiny": ["the cat sat", "ok\n  go"]}  # 11 + 7 bytes; 3 + 2 words
    row = compression(tokenizer_encoder(tok), texts)["tiny"]
    assert (row["bytes"], row["words"], row["tokens"]) == (18, 5, 18)
    assert row["bytes_per_token"] == 1.0
    assert row["tokens_per_word"] == pytest.approx(18 / 5)


def test_compression_matches_direct_encoding(small_tokenizer):
    tok, _ = small_tokenizer
    texts = ["The cat sat on the mat.", "Question: 12 + 30?\nAnswer: 42"]  # 6 + 6 words
    row = compression(tokenizer_encoder(tok), {"t": texts})["t"]
    tokens = sum(len(tok.encode(t, add_special_tokens=False).ids) for t in texts)
    assert row["tokens"] == tokens and row["words"] == 12
    assert row["bytes"] == sum(len(t.encode()) for t in texts) == 52
    assert row["tokens_per_word"] == pytest.approx(tokens / 12)
    assert row["bytes_per_token"] == pytest.approx(52 / tokens) and row["bytes_per_token"] > 1


def test_held_out_sets_read_the_shipped_domains():
    sets = held_out_sets()
    assert set(sets) == {"english", "code", "math", "non-english"}
    assert len(sets["code"]) == 164 and len(sets["math"]) == 1319
    assert any("Escopete" in t for t in sets["non-english"])  # the Aragonese WET page
    # The benchmark's 30% of WikiText articles: some, not all of its 60.
    assert 5 <= len(sets["english"]) <= 30


def test_report_against_writes_files_and_flops(small_tokenizer, larger_tokenizer, tmp_path):
    small_dir, large_dir = small_tokenizer[1], larger_tokenizer[1]
    out = tmp_path / "report"
    argv = ["tokenizer", "report", str(small_dir), str(large_dir), "--against", str(small_dir)]
    assert main([*argv, "--out", str(out), "--d-model", "512"]) == 0
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(out.glob(".tmp-*"))  # written beside and renamed into place
    report = json.loads((out / "report.json").read_text())
    kinds = [t["kind"] for t in report["tokenizers"]]
    assert kinds == ["tokenizer", "tokenizer", "against"]  # no baseline trained
    small, large, against = report["tokenizers"]
    assert small["compression"] == against["compression"]  # the same tokenizer, measured twice
    for domain, row in large["compression"].items():
        assert row["bytes_per_token"] > 1
        assert row["bytes_per_token"] >= small["compression"][domain]["bytes_per_token"]
    flops_small, flops_large = report["flops"]
    assert flops_small["compute_vs_reference"]["english"] == 1.0
    ratio = (
        small["compression"]["english"]["bytes_per_token"]
        / large["compression"]["english"]["bytes_per_token"]
    )
    assert flops_large["compute_vs_reference"]["english"] == pytest.approx(ratio)
    assert ratio < 1  # the larger vocab needs fewer FLOPs per byte
    english_bpt = large["compression"]["english"]["bytes_per_token"]
    assert flops_large["flops_per_byte"]["english"] == pytest.approx(6 * 1e9 / english_bpt)
    # 2048 trained + the tool and developer role tokens (1024 + 2 for the small one).
    assert flops_large["embedding_head_params"] == 2 * 512 * 2050
    assert flops_large["extra_embedding_head_params"] == 2 * 512 * (2050 - 1026)


def test_default_baseline_is_gpt2_split_of_the_same_vocab(small_tokenizer):
    sets = {"english": ["The quick brown fox jumps over the lazy dog. " * 20]}
    report = build_report([str(small_tokenizer[1])], baseline_chars=400_000, sets=sets)
    ours, baseline = report.subjects
    assert baseline.kind == "baseline" and baseline.name == "gpt2-split-1024"
    assert baseline.trained_vocab == ours.trained_vocab == 1024
    assert "shipped text" in str(baseline.path)  # no curated shards beside the fixture
    assert baseline.compression["english"]["bytes_per_token"] > 1


def test_bad_directory_exits_1_naming_it(small_tokenizer, tmp_path, capsys):
    missing = tmp_path / "no-such-tokenizer"
    argv = ["tokenizer", "report", str(small_tokenizer[1]), str(missing)]
    assert main([*argv, "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err.replace("\n", "")
    assert str(missing) in err and "error in tokenizer report" in err
    assert not (tmp_path / "out").exists()  # failed before writing anything
    assert main(["tokenizer", "report", str(small_tokenizer[1]), "--against", str(missing)]) == 1
    assert str(missing) in capsys.readouterr().err.replace("\n", "")
