import math

import numpy as np
import pytest
import torch

from frontierlm.eval.bpb import UnigramLM, bits_per_byte, sequential_windows
from frontierlm.tokenizer.chat import ChatRenderer, Message
from frontierlm.tokenizer.shards import TokenSplit, fit_unigram, write_token_shards
from frontierlm.tokenizer.train import (
    BOS,
    SPECIAL_TOKENS,
    load_tokenizer,
    token_byte_lengths,
)

transformers = pytest.importorskip("transformers")


def test_vocab_and_special_tokens(small_tokenizer):
    tok, path = small_tokenizer
    assert tok.get_vocab_size() == 1024
    # Special tokens take the first ids, in order, and never split.
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    ids = tok.encode("hi <|user|> there<|end|>", add_special_tokens=False).ids
    assert tok.token_to_id("<|user|>") in ids and tok.token_to_id("<|end|>") in ids
    assert load_tokenizer(path).get_vocab().keys() == tok.get_vocab().keys()


def test_roundtrip_is_lossless(small_tokenizer, sample_texts):
    tok, _ = small_tokenizer
    for text in [
        *sample_texts[:20],
        "naïve café — 日本語 😀\n\tdef f(x):\n        return x**2  # 12345",
    ]:
        assert tok.decode(tok.encode(text, add_special_tokens=False).ids) == text


def test_byte_lengths_sum_to_utf8_length(small_tokenizer, sample_texts):
    tok, _ = small_tokenizer
    lengths = np.array(token_byte_lengths(tok))
    assert lengths[tok.token_to_id(BOS)] == 0
    for text in [*sample_texts[:10], "€ and 日本"]:
        ids = tok.encode(text, add_special_tokens=False).ids
        assert lengths[ids].sum() == len(text.encode("utf-8"))


def test_transformers_loads_and_encodes_identically(small_tokenizer, sample_texts):
    tok, path = small_tokenizer
    hf = transformers.PreTrainedTokenizerFast(tokenizer_file=str(path / "tokenizer.json"))
    for text in sample_texts[::7]:
        assert (
            hf.encode(text, add_special_tokens=False)
            == tok.encode(text, add_special_tokens=False).ids
        )
    auto = transformers.AutoTokenizer.from_pretrained(str(path))
    assert auto.bos_token == "<|bos|>" and auto.pad_token == "<|pad|>"


def test_chat_mask_matches_transformers_template(small_tokenizer):
    tok, path = small_tokenizer
    hf = transformers.AutoTokenizer.from_pretrained(str(path))
    messages = [
        Message("system", "You are terse."),
        Message("user", "What is 2 + 3?"),
        Message("assistant", "2 + 3 = 5.\n#### 5"),
        Message("user", "And 4 + 4?"),
        Message("assistant", "8"),
    ]
    ours = ChatRenderer(tok).render(messages)
    theirs = hf.apply_chat_template(
        [{"role": m.role, "content": m.content} for m in messages],
        tokenize=True,
        return_dict=True,
        return_assistant_tokens_mask=True,
    )
    assert ours.ids == theirs["input_ids"]
    assert ours.mask == theirs["assistant_masks"]
    # Assistant text plus its <|end|> is learned, nothing else.
    learned = [i for i, m in zip(ours.ids, ours.mask, strict=True) if m]
    assert tok.decode(learned, skip_special_tokens=False) == "2 + 3 = 5.\n#### 5<|end|>8<|end|>"
    prompt = ChatRenderer(tok).render(messages[:2], add_generation_prompt=True)
    assert (
        prompt.ids
        == hf.apply_chat_template(
            [{"role": m.role, "content": m.content} for m in messages[:2]],
            tokenize=True,
            add_generation_prompt=True,
            return_dict=True,
        )["input_ids"]
    )
    last = ChatRenderer(tok).render(messages, last_turn_only=True)
    assert (
        tok.decode(
            [i for i, m in zip(last.ids, last.mask, strict=True) if m], skip_special_tokens=False
        )
        == "8<|end|>"
    )


def test_token_shards_and_unigram_baseline(small_tokenizer, sample_texts, tmp_path):
    tok, _ = small_tokenizer
    docs = [(f"doc{i}", t) for i, t in enumerate(sample_texts)]
    counts = write_token_shards(docs, tok, tmp_path, val_fraction=0.1)
    train, val = TokenSplit.open(tmp_path, "train"), TokenSplit.open(tmp_path, "val")
    assert counts["train_docs"] + counts["val_docs"] == len(docs)
    assert 0.03 < counts["val_docs"] / len(docs) < 0.2
    assert train.tokens.dtype == np.uint16
    bos = tok.token_to_id(BOS)
    # Every document starts with BOS, and the index points at each one.
    assert (train.tokens[train.doc_starts] == bos).all()
    assert int((np.asarray(train.tokens) == bos).sum()) == counts["train_docs"]
    # Decoding one stored document gives its text back.
    first_end = train.doc_starts[1]
    stored = tok.decode(np.asarray(train.tokens[1:first_end]).tolist())
    assert stored in {t for _, t in docs}
    lengths = np.array(token_byte_lengths(tok))
    log_probs = fit_unigram(train.tokens, 1024)
    assert np.exp(log_probs).sum() == pytest.approx(1.0)
    windows = list(sequential_windows(val.tokens, 32, 4, max_batches=1000))
    bpb = bits_per_byte(UnigramLM(log_probs), windows, torch.tensor(lengths), torch.device("cpu"))[
        "bpb"
    ]
    # The same number computed directly: -sum log2 p(target) / bytes, over targets with bytes.
    targets = np.concatenate([w["targets"].numpy().ravel() for w in windows])
    scored = lengths[targets] > 0
    direct = -log_probs[targets[scored]].sum() / math.log(2) / lengths[targets[scored]].sum()
    assert bpb == pytest.approx(direct, rel=1e-5)
    # A unigram model over ~1k BPE tokens of English: a few bits per byte, well under 8.
    assert 1.5 < bpb < 4.0


def test_token_shards_record_each_documents_source(small_tokenizer, sample_texts, tmp_path):
    import json

    tok, _ = small_tokenizer
    # The conftest texts: Shakespeare, then WikiText, then GSM8K; interleave them in file order.
    names = ["shakespeare"] * 60 + ["wikipedia"] * 60 + ["gsm8k"] * (len(sample_texts) - 120)
    docs = [(f"doc{i}", t, n) for i, (t, n) in enumerate(zip(sample_texts, names, strict=True))]
    docs = docs[::2] + docs[1::2]
    counts = write_token_shards(docs, tok, tmp_path, val_fraction=0.1)
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert meta["sources"] == ["shakespeare", "wikipedia", "gsm8k"]  # first appearance
    for split in ("train", "val"):
        by_source = counts[f"{split}_tokens_by_source"]
        assert sum(by_source.values()) == counts[f"{split}_tokens"]
        assert sum(counts[f"{split}_docs_by_source"].values()) == counts[f"{split}_docs"]
        assert meta[f"{split}_tokens_by_source"] == by_source
        opened = TokenSplit.open(tmp_path, split)
        assert opened.source_names == meta["sources"]
        assert opened.source_tokens() == by_source
    train = TokenSplit.open(tmp_path, "train")
    texts = {t: n for _, t, n in docs}
    # Every merged range of a source decodes to that source's documents only.
    bos = tok.token_to_id(BOS)
    for index, name in enumerate(train.source_names):
        spans = train.source_spans(index)
        assert int((spans[:, 1] - spans[:, 0]).sum()) == counts["train_tokens_by_source"][name]
        start, end = spans[len(spans) // 2]
        pieces = np.split(
            np.asarray(train.tokens[start:end]),
            np.flatnonzero(np.asarray(train.tokens[start:end]) == bos)[1:],
        )
        assert {texts[tok.decode(p[1:].tolist())] for p in pieces} == {name}
    # Documents given without a source fall under "?"; shards from before sources were
    # recorded (no .src, no "sources") still open, for training without a mixture.
    two = tmp_path / "two"
    two.mkdir()
    plain = write_token_shards([(i, t) for i, t, _ in docs], tok, two, val_fraction=0.1)
    assert plain["train_tokens_by_source"] == {"?": plain["train_tokens"]}
    (two / "train.src").unlink()
    old = TokenSplit.open(two, "train")
    assert old.doc_sources is None and old.source_tokens() == {}
    assert len(old.doc_starts) == plain["train_docs"]
