"""A tiny model laid out as a run (runs/<name>/sft/model + runs/<name>/tokenizer) with the real
BPE tokenizer the tests train from shipped text, and random weights."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="session")
def tiny_run(small_tokenizer, tmp_path_factory):
    from frontierlm.config import ModelConfig
    from frontierlm.model import Transformer
    from frontierlm.tokenizer.train import save_tokenizer
    from frontierlm.train.checkpoint import save_model_dir

    tok, _ = small_tokenizer
    run = tmp_path_factory.mktemp("run")
    save_tokenizer(tok, run / "tokenizer")
    torch.manual_seed(0)
    # Untied head and norm gains away from 1: a random model whose greedy text varies (a tied
    # one repeats a single word), including byte tokens that are not whole UTF-8 characters.
    cfg = ModelConfig(
        d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=128, tie_embeddings=False
    )
    model = Transformer(cfg, tok.get_vocab_size()).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.uniform_(0.5, 1.5)
    (run / "sft").mkdir()
    save_model_dir(run / "sft" / "model", model)
    (run / "sft" / "stage.json").write_text("{}")
    return run / "sft"


@pytest.fixture(scope="session")
def served(tiny_run):
    from frontierlm.inference.loader import load_inference_model

    return load_inference_model(tiny_run)
