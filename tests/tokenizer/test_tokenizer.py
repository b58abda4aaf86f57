import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from frontierlm.eval.bpb import UnigramLM, bits_per_byte, sequential_windows
from frontierlm.tokenizer.chat import ChatRenderer, Message
from frontierlm.tokenizer.shards import (
    SourcePlan,
    TokenSplit,
    epoch_copies,
    fit_unigram,
    hash_fraction,
    write_token_shards,
)
from frontierlm.tokenizer.train import (
    BOS,
    CORE_SPECIAL_TOKENS,
    DEVELOPER,
    TOOL,
    load_tokenizer,
    token_byte_lengths,
)

transformers = pytest.importorskip("transformers")


def test_vocab_and_special_tokens(small_tokenizer):
    tok, path = small_tokenizer
    # 1024 trained (core specials, bytes, merges), then the tool- and developer-role tokens.
    assert tok.get_vocab_size() == 1026 and tok.token_to_id(TOOL) == 1024
    assert tok.token_to_id(DEVELOPER) == 1025
    # Core special tokens take the first ids, in order, and never split.
    core = CORE_SPECIAL_TOKENS
    assert [tok.token_to_id(t) for t in core] == list(range(len(core)))
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
    log_probs = fit_unigram(train.tokens, tok.get_vocab_size())
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


def _labelled_docs(sample_texts: list[str]) -> list[tuple[str, str, str]]:
    """The conftest texts as three inputs: Shakespeare, WikiText, GSM8K."""
    names = ["shakespeare"] * 60 + ["wikipedia"] * 60 + ["gsm8k"] * (len(sample_texts) - 120)
    return [(f"doc{i}", t, n) for i, (t, n) in enumerate(zip(sample_texts, names, strict=True))]


def _train_docs(out: Path, tok) -> list[str]:
    """The decoded training documents, in file order."""
    split = TokenSplit.open(out, "train")
    ends = np.append(split.doc_starts[1:], len(split.tokens))
    return [
        tok.decode(np.asarray(split.tokens[a + 1 : b]).tolist())
        for a, b in zip(split.doc_starts, ends, strict=True)
    ]


def test_epochs_repeat_or_subsample_training_documents_only(
    small_tokenizer, sample_texts, tmp_path
):
    tok, _ = small_tokenizer
    docs = _labelled_docs(sample_texts)

    def write(name: str, seed: int = 0, **epochs: float) -> tuple[dict, Path]:
        out = tmp_path / name
        out.mkdir()
        plans = {
            s: SourcePlan(s, epochs.get(s, 1.0)) for s in ("shakespeare", "wikipedia", "gsm8k")
        }
        return write_token_shards(docs, tok, out, 0.1, plans=plans, seed=seed), out

    once, once_dir = write("once")
    # The conftest sample: 55/52/174 training documents, 39 held out by id.
    assert once["train_docs_by_source"] == {"shakespeare": 55, "wikipedia": 52, "gsm8k": 174}
    assert once["val_docs"] == 39
    base = once["train_tokens_by_source"]

    twice, twice_dir = write("twice", wikipedia=2.0, gsm8k=0.5)
    got = twice["train_tokens_by_source"]
    # 2.0: exactly double; the other sources untouched; validation byte-identical.
    assert got["wikipedia"] == 2 * base["wikipedia"]
    assert got["shakespeare"] == base["shakespeare"]
    assert twice["train_docs_by_source"] == {"shakespeare": 55, "wikipedia": 104, "gsm8k": 87}
    for suffix in ("bin", "idx", "src"):
        assert (twice_dir / f"val.{suffix}").read_bytes() == (
            once_dir / f"val.{suffix}"
        ).read_bytes()
    assert twice["val_tokens_by_source"] == once["val_tokens_by_source"]
    # A repeated document comes back in the second pass, after every first copy.
    texts = _train_docs(twice_dir, tok)
    first_pass, second_pass = texts[: 55 + 52 + 87], texts[55 + 52 + 87 :]
    wiki = {t for _, t, n in docs if n == "wikipedia"}
    assert second_pass == [t for t in first_pass if t in wiki]
    val_texts = {t for i, t, _ in docs if hash_fraction(i) < 0.1}
    assert not val_texts & set(texts)  # no copy of a held-out document reaches training

    # 0.5: exactly half of the 174 training documents, picked by seed.
    half = {t for t in texts if t.startswith("Question:")}
    assert len(half) == 87 and got["gsm8k"] < base["gsm8k"]
    again, again_dir = write("again", wikipedia=2.0, gsm8k=0.5)
    assert again == twice
    assert (again_dir / "train.bin").read_bytes() == (twice_dir / "train.bin").read_bytes()
    _, other_dir = write("other", seed=1, wikipedia=2.0, gsm8k=0.5)
    other_half = {t for t in _train_docs(other_dir, tok) if t.startswith("Question:")}
    assert len(other_half) == 87 and other_half != half

    meta = json.loads((twice_dir / "meta.json").read_text())
    report = meta["epochs_by_source"]
    assert report["wikipedia"]["tokens_before"] == base["wikipedia"]
    assert report["wikipedia"]["tokens_after"] == 2 * base["wikipedia"]
    assert report["wikipedia"]["effective_epochs"] == 2.0
    assert report["gsm8k"]["documents"] == 174 and report["gsm8k"]["documents_after"] == 87
    assert report["gsm8k"]["inputs"] == {"gsm8k": 0.5}
    assert 0.4 < report["gsm8k"]["effective_epochs"] < 0.6


def test_epoch_copies_exact_counts_and_seeded_pick():
    ids = [f"d{i}" for i in range(10)]
    assert epoch_copies(ids, 2.0, 0, "a").tolist() == [2] * 10
    for epochs, total in ((1.5, 15), (0.3, 3), (2.25, 23), (0.04, 0)):
        copies = epoch_copies(ids, epochs, 0, "a")
        assert copies.sum() == total and set(copies.tolist()) <= {int(epochs), int(epochs) + 1}
    pick = epoch_copies(ids, 0.5, 0, "a")
    assert (pick == epoch_copies(ids, 0.5, 0, "a")).all()
    # Independent of order: the same documents are picked when the list is reversed.
    assert (epoch_copies(ids[::-1], 0.5, 0, "a")[::-1] == pick).all()
    assert any((epoch_copies(ids, 0.5, seed, "a") != pick).any() for seed in range(1, 4))


def test_mixture_names_merge_inputs_into_one_token_source(small_tokenizer, sample_texts, tmp_path):
    tok, _ = small_tokenizer
    docs = _labelled_docs(sample_texts)
    plain = write_token_shards(docs, tok, tmp_path, 0.1)
    merged_dir = tmp_path / "merged"
    merged_dir.mkdir()
    plans = {"shakespeare": SourcePlan("prose"), "wikipedia": SourcePlan("prose", 2.0)}
    merged = write_token_shards(docs, tok, merged_dir, 0.1, plans=plans)
    before = plain["train_tokens_by_source"]
    assert merged["train_tokens_by_source"] == {
        "prose": before["shakespeare"] + 2 * before["wikipedia"],
        "gsm8k": before["gsm8k"],
    }
    split = TokenSplit.open(merged_dir, "train")
    assert split.source_names == ["prose", "gsm8k"]
    assert split.source_tokens() == merged["train_tokens_by_source"]
    prose = merged["epochs_by_source"]["prose"]
    assert prose["inputs"] == {"shakespeare": 1.0, "wikipedia": 2.0}
    assert prose["tokens_before"] == before["shakespeare"] + before["wikipedia"]
    assert prose["documents"] == 107 and prose["documents_after"] == 159


def test_pre_tokenizer_splits():
    from frontierlm.tokenizer.train import new_tokenizer

    text = "XMLHttpRequest don't 12345\n\n  x"

    def pieces(name: str) -> list[str]:
        pre = new_tokenizer(name).pre_tokenizer
        # The byte-level step spells a space as "Ġ" and a newline as "Ċ".
        return [p for p, _ in pre.pre_tokenize_str(text)]

    assert pieces("cl100k") == ["XMLHttpRequest", "Ġdon", "'t", "Ġ", "123", "45", "ĊĊ", "Ġ", "Ġx"]
    # o200k: case-aware letter runs keep their contraction.
    assert pieces("o200k")[:4] == ["XMLHttp", "Request", "Ġdon't", "Ġ"]
    assert pieces("o200k")[4:6] == ["123", "45"]
    # GPT-2: one piece per digit run, a space glued to it.
    assert "Ġ12345" in pieces("gpt2")
    with pytest.raises(ValueError, match="pre_tokenizer"):
        new_tokenizer("llama")


def test_streamed_training_reserved_slots_and_wide_vocab(sample_texts, tmp_path):
    from frontierlm.tokenizer.train import reserved_token, train_tokenizer

    consumed = []

    def stream():
        for text in sample_texts:
            consumed.append(1)
            yield text

    tok = train_tokenizer(stream(), 600, pre_tokenizer="o200k", reserved_special_tokens=3)
    assert len(consumed) == len(sample_texts)
    same = train_tokenizer(list(sample_texts), 600, pre_tokenizer="o200k")

    # Reserved slots sit between TOOL and DEVELOPER, which is last: no other id moves.
    def kept(vocab: dict[str, int]) -> dict[str, int]:
        return {k: v for k, v in vocab.items() if not k.startswith("<|reserved") and k != DEVELOPER}

    assert kept(same.get_vocab()) == kept(tok.get_vocab())
    assert (same.token_to_id(DEVELOPER), tok.token_to_id(DEVELOPER)) == (601, 604)
    # Appended after the trained vocabulary, special (never split, no bytes), in order.
    assert [tok.token_to_id(reserved_token(i)) for i in range(3)] == [601, 602, 603]
    ids = tok.encode(f"a{reserved_token(1)}b", add_special_tokens=False).ids
    assert 602 in ids and token_byte_lengths(tok)[602] == 0
    assert tok.decode(ids, skip_special_tokens=False) == f"a{reserved_token(1)}b"
    # A vocabulary past 65536 ids writes uint32 shards that decode back.
    wide = train_tokenizer(sample_texts[:50], 600, reserved_special_tokens=70_000)
    assert wide.get_vocab_size() == 600 + 1 + 70_000 + 1
    assert wide.token_to_id(DEVELOPER) == 600 + 1 + 70_000
    write_token_shards([(f"d{i}", t) for i, t in enumerate(sample_texts[:60])], wide, tmp_path, 0.2)
    train = TokenSplit.open(tmp_path, "train")
    assert train.tokens.dtype == np.uint32
    assert wide.decode(np.asarray(train.tokens[1 : train.doc_starts[1]]).tolist()) in sample_texts


def _as_dicts(messages: list[Message]) -> list[dict[str, str]]:
    return [{"role": m.role, "content": m.content} for m in messages]


def test_chat_template_matches_on_the_shipped_chats(small_tokenizer):
    """Every other chosen HH dialogue, 300 rejected ones and 300 GSM8K chats, as SFT and DPO
    read them, plus tool turns: transformers' template gives our ids and assistant mask. (All
    12,092 chats of both files match too, checked once; a subset keeps the test to seconds.)"""
    from frontierlm.config import ChatSource
    from frontierlm.posttrain.chat_data import load_conversations, load_pairs

    tok, path = small_tokenizer
    hf = transformers.AutoTokenizer.from_pretrained(str(path))
    renderer = ChatRenderer(tok)
    data = Path(__file__).resolve().parents[2] / "data"
    hh = str(data / "hh-rlhf" / "harmless-base-test.jsonl.gz")
    gsm = str(data / "gsm8k" / "train.jsonl.gz")
    chats = load_conversations(ChatSource(name="hh", path=hh, format="hh"))[::2]
    chats += [
        [*p.prompt, Message("assistant", p.rejected)]
        for p in load_pairs(ChatSource(name="hh", path=hh, format="hh", max_examples=300))
    ]
    chats += load_conversations(ChatSource(name="gsm", path=gsm, format="qa", max_examples=300))
    chats.append(
        [
            Message("system", "Tools: calc(expr) returns a number."),
            Message("user", "What is 17 * 23?"),
            Message("assistant", '{"tool": "calc", "expr": "17 * 23"}'),
            Message("tool", "391"),
            Message("assistant", "17 × 23 = 391 😀"),
        ]
    )
    assert len(chats) > 1700
    for chat in chats:
        ours = renderer.render(chat)
        theirs = hf.apply_chat_template(
            _as_dicts(chat), tokenize=True, return_dict=True, return_assistant_tokens_mask=True
        )
        assert ours.ids == theirs["input_ids"]
        assert ours.mask == theirs["assistant_masks"]
    tool_chat = chats[-1]
    ours = renderer.render(tool_chat)
    learned = [i for i, m in zip(ours.ids, ours.mask, strict=True) if m]
    assert tok.decode(learned, skip_special_tokens=False) == (
        '{"tool": "calc", "expr": "17 * 23"}<|end|>17 × 23 = 391 😀<|end|>'
    )
    assert tok.token_to_id(TOOL) in ours.ids
    with pytest.raises(ValueError, match="chat role"):
        renderer.render([Message("narrator", "x")])
    with pytest.raises(Exception, match="unknown chat role"):
        hf.apply_chat_template([{"role": "narrator", "content": "x"}], tokenize=False)


def test_tokenizer_without_tool_token_refuses_tool_turns(sample_texts):
    from tokenizers import trainers

    from frontierlm.tokenizer.train import CORE_SPECIAL_TOKENS, new_tokenizer

    old = new_tokenizer()  # as trained before the tool role: core special tokens only
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=CORE_SPECIAL_TOKENS)
    old.train_from_iterator(sample_texts[:20], trainer=trainer)
    renderer = ChatRenderer(old)
    assert renderer.render([Message("user", "hi"), Message("assistant", "yo")]).mask[-1] == 1
    with pytest.raises(ValueError, match="tool"):
        renderer.render([Message("tool", "42")])


@pytest.mark.parametrize("pre_tokenizer", ["cl100k", "o200k", "gpt2"])
def test_tiktoken_export_matches(small_tokenizer, sample_texts, tmp_path, pre_tokenizer):
    import tiktoken

    from frontierlm.tokenizer.export import export_tiktoken, to_tiktoken
    from frontierlm.tokenizer.train import train_tokenizer

    if pre_tokenizer == "cl100k":  # through the command line
        from frontierlm.cli import main

        tok, path = small_tokenizer
        assert main(["export-tokenizer", str(path), str(tmp_path)]) == 0
    else:
        tok = train_tokenizer(sample_texts, 1024, pre_tokenizer=pre_tokenizer)
        export_tiktoken(tok, tmp_path)
    enc = to_tiktoken(tmp_path)  # from the written files, as a user would load them
    assert isinstance(enc, tiktoken.Encoding) and enc.n_vocab == tok.get_vocab_size()
    texts = [
        *sample_texts,
        "naïve café — 日本語 😀👍🏽\n\tdef f(x):\n        return x**2  # 12345",
        "XMLHttpRequest don't WE'LL  \r\n\r\n  x/y/z",
    ]
    if pre_tokenizer != "gpt2":
        # Every code point outside the surrogates, in contexts that exercise each branch of the
        # regex: the two regex engines (onig, fancy-regex) agree on every Unicode class, not
        # only the sample's. (Python's `regex` module does not: newer letters differ.)
        chars = [chr(c) for c in range(1, 0x30000) if not 0xD800 <= c < 0xE000]
        texts += [
            "".join(f"a{c}1 {c}{c}\n{c}'s B{c}" for c in chars[i : i + 64])
            for i in range(0, len(chars), 64)
        ]
    ours = [e.ids for e in tok.encode_batch(texts, add_special_tokens=False)]
    assert enc.encode_ordinary_batch(texts) == ours
    chat = "<|bos|><|user|>hi<|end|><|tool|>42<|end|>"
    assert enc.encode(chat, allowed_special="all") == tok.encode(chat).ids
    assert enc.decode(ours[300]) == texts[300]


def test_tiktoken_export_refuses_what_does_not_map(small_tokenizer):
    from tokenizers import Tokenizer, normalizers

    from frontierlm.tokenizer.export import tiktoken_spec

    tok = Tokenizer.from_str(small_tokenizer[0].to_str())
    tok.normalizer = normalizers.NFC()
    with pytest.raises(ValueError, match="normaliser"):
        tiktoken_spec(tok)
    tok.normalizer = None
    tok.pre_tokenizer = None
    with pytest.raises(ValueError, match="pre-tokenizer"):
        tiktoken_spec(tok)


def test_tokenize_resumes_per_shard_and_matches_one_pass(
    small_tokenizer, sample_texts, tmp_path, monkeypatch
):
    """Shards encoded before a kill are kept; the result equals encoding everything at once."""
    from frontierlm.data.documents import Document, write_shards
    from frontierlm.tokenizer import stage
    from frontierlm.tokenizer.shards import assemble_token_shards

    tok, _ = small_tokenizer
    docs = _labelled_docs(sample_texts)
    (tmp_path / "data").mkdir()
    shards = write_shards(
        (Document(i, t, {"source": n}) for i, t, n in docs), tmp_path / "data", shard_docs=70
    )
    assert len(shards) == 5
    whole = tmp_path / "whole"
    whole.mkdir()
    plans = {"wikipedia": SourcePlan("wikipedia", 2.0)}
    expected = write_token_shards(docs, tok, whole, 0.1, plans=plans)

    calls: list[str] = []
    real = stage.encode_part

    def dying(docs, tok, meta, **kw):
        calls.append(meta.name)
        if len(calls) == 3:  # killed while writing the third shard's tokens
            meta.with_suffix(".bin.tmp").write_bytes(b"half")
            raise KeyboardInterrupt
        return real(docs, tok, meta, **kw)

    monkeypatch.setattr(stage, "encode_part", dying)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        stage.encode_shards(shards, tok, out / "parts")
    assert sorted(p.name for p in (out / "parts").glob("*.json")) == [
        "shard-00000.json",
        "shard-00001.json",
    ]
    calls.clear()
    monkeypatch.setattr(stage, "encode_part", real)
    monkeypatch.setattr(
        stage, "encode_part", lambda *a, **kw: calls.append(a[2].name) or real(*a, **kw)
    )
    parts = stage.encode_shards(shards, tok, out / "parts")
    assert calls == ["shard-00002.json", "shard-00003.json", "shard-00004.json"]
    counts = assemble_token_shards(parts, tok, out, 0.1, plans=plans)
    assert counts == expected
    for name in ("train.bin", "train.idx", "train.src", "val.bin", "val.idx", "val.src"):
        assert (out / name).read_bytes() == (whole / name).read_bytes()


def _shipped_documents() -> list[str]:
    """Text of every kind the project ships: prose, wiki, math, code, non-English web text."""
    import gzip

    data = Path(__file__).resolve().parents[2] / "data"
    with gzip.open(data / "humaneval" / "HumanEval.jsonl.gz", "rt") as f:
        code = [(r := json.loads(line))["prompt"] + r["canonical_solution"] for line in f]
    with (data / "web" / "cc_en_head-0091.jsonl").open() as f:
        web = [json.loads(line)["text"] for line in f]
    return code + web


def test_roundtrip_every_document_valid_or_not(small_tokenizer, sample_texts, tmp_path):
    from frontierlm.tokenizer.codec import ByteCodec

    tok, _ = small_tokenizer
    codec = ByteCodec(tok)
    docs = [*sample_texts, *_shipped_documents()]
    assert len(docs) > 400
    for text, enc in zip(docs, tok.encode_batch(docs, add_special_tokens=False), strict=True):
        assert tok.decode(enc.ids) == text
        assert codec.encode_text(text) == enc.ids  # valid text: the tokenizer's own ids
        assert codec.decode_text(enc.ids) == text

    # Emojis (with skin tone and ZWJ joins) are several byte tokens in a 1k vocabulary: no
    # single token decodes to valid UTF-8, the sequence does.
    emoji = "family 👨‍👩‍👧 thumbs 👍🏽 flag 🇺🇦!"
    ids = tok.encode(emoji, add_special_tokens=False).ids
    thumb = codec.encode_bytes("👍".encode())
    assert len(thumb) > 1 and all(codec.decode_bytes([i]) != "👍".encode() for i in thumb)
    assert tok.decode(ids) == emoji and codec.decode_text(ids) == emoji

    # Invalid UTF-8: a stray continuation byte, 0xFF, an overlong "/", an encoded surrogate and
    # a sequence cut short at the end. Each invalid byte becomes its byte token.
    raw = b"ok \x80 caf\xc3\xa9 \xff\xc0\xaf \xed\xa0\x80 \xf0\x9f\x98"
    ids = codec.encode_bytes(raw)
    assert codec.decode_bytes(ids) == raw
    escaped = raw.decode("utf-8", "surrogateescape")  # how Python carries such bytes in a str
    assert codec.encode_text(escaped) == ids and codec.decode_text(ids) == escaped
    # A lone surrogate from a JSON "\ud800" escape is kept as its three surrogatepass bytes.
    lone = "a\ud800b"
    assert codec.decode_bytes(codec.encode_text(lone)).decode("utf-8", "surrogatepass") == lone

    # Token shards take such documents too, and count their real bytes.
    shard_docs = [(f"d{i}", t) for i, t in enumerate([escaped, *sample_texts[:40]])]
    counts = write_token_shards(shard_docs, tok, tmp_path, val_fraction=0.2)
    stored = []
    for name in ("train", "val"):
        split = TokenSplit.open(tmp_path, name)
        ends = np.append(split.doc_starts[1:], len(split.tokens))
        stored += [
            codec.decode_bytes(np.asarray(split.tokens[a + 1 : b]).tolist())
            for a, b in zip(split.doc_starts, ends, strict=True)
        ]
    assert sorted(stored) == sorted([raw, *(t.encode() for t in sample_texts[:40])])
    assert counts["train_bytes"] + counts["val_bytes"] == len(raw) + sum(
        len(t.encode()) for t in sample_texts[:40]
    )


def test_tiktoken_engine_gives_the_tokenizers_ids(small_tokenizer, sample_texts):
    from frontierlm.tokenizer.codec import ByteCodec

    tok, _ = small_tokenizer
    fast, slow = ByteCodec(tok), ByteCodec(tok, engine="tokenizers")
    assert fast.fast is not None and slow.fast is None
    docs = [
        *sample_texts,
        *_shipped_documents(),
        "a literal <|user|> marker and <|endoftext|>-like text",  # spells a special token
        "ok \udc80 escaped byte",  # undecodable byte carried in a str
        "",
    ]
    expected = slow.encode_batch(docs)
    assert fast.encode_batch(docs) == expected
    # The special-token spelling keeps tokenizers' special id whichever engine runs.
    user_id = tok.token_to_id("<|user|>")
    assert user_id in expected[-3]
