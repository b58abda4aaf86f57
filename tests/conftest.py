"""Shared fixtures: small slices of the real data the project ships under data/."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data"


@pytest.fixture(scope="session")
def sample_texts() -> list[str]:
    """~300 KB of real prose, math and wiki text in ~2 KB documents."""
    shakespeare = (DATA / "tinyshakespeare" / "input.txt").read_text()[:120_000]
    wiki = (DATA / "wikitext-2" / "valid.txt").read_text()[:120_000]
    with gzip.open(DATA / "gsm8k" / "train.jsonl.gz", "rt") as f:
        gsm = [json.loads(next(f)) for _ in range(200)]
    texts = [shakespeare[i : i + 2000] for i in range(0, len(shakespeare), 2000)]
    texts += [wiki[i : i + 2000] for i in range(0, len(wiki), 2000)]
    texts += [f"Question: {r['question']}\nAnswer: {r['answer']}" for r in gsm]
    return texts


@pytest.fixture(scope="session")
def small_tokenizer(sample_texts, tmp_path_factory):
    from frontierlm.tokenizer.train import save_tokenizer, train_tokenizer

    tok = train_tokenizer(sample_texts, vocab_size=1024)
    out = tmp_path_factory.mktemp("tokenizer")
    save_tokenizer(tok, out)
    return tok, out


@pytest.fixture
def make_random_model():
    """Build a small Transformer in eval mode with random weights and non-trivial norm gains, so
    that a misplaced norm weight shows in logit comparisons."""
    import torch

    from frontierlm.config import ModelConfig
    from frontierlm.model import Transformer

    def make(vocab_size: int = 300, seed: int = 0, **model_fields) -> Transformer:
        torch.manual_seed(seed)
        model = Transformer(ModelConfig(**model_fields), vocab_size).eval()
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() == 1:
                    p.uniform_(0.5, 1.5)
        return model

    return make


@pytest.fixture
def flex_path_logits():
    """The logits of a model run layer by layer with FlexAttention BlockMasks (the GPU path),
    forward-only, so CPU tests can compare it with the dense-mask path."""
    import torch

    from frontierlm.model.attention import attention_mask

    def run(model, ids, doc_ids):
        seq = ids.shape[1]
        cos, sin = model.rope_cos[:seq], model.rope_sin[:seq]
        with torch.no_grad():
            x = model.embed_tokens(ids)
            for i, layer in enumerate(model.layers):
                mask = attention_mask(seq, doc_ids, model.cfg.layer_window(i), True, ids.device)
                x = layer(x, cos, sin, mask)
            return model.lm_head(model.norm(x))

    return run
