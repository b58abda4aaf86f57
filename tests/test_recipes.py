"""Every shipped recipe loads, builds its model, and the family recipes export as their family."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from frontierlm.config import load_config
from frontierlm.model import Transformer
from frontierlm.model.hf import hf_config

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
FAMILIES = {
    "dense-llama": "LlamaForCausalLM",
    "dense-qwen3": "Qwen3ForCausalLM",
    "dense-gemma2": "Gemma2ForCausalLM",
    "moe-qwen3": "Qwen3MoeForCausalLM",
    "moe-deepseek-v3": "DeepseekV3ForCausalLM",
}


@pytest.mark.parametrize("recipe", sorted(p.stem for p in RECIPES.glob("*.toml")))
def test_recipe_builds_a_model_that_runs(recipe):
    cfg = load_config(RECIPES / f"{recipe}.toml")
    assert cfg.run.name == recipe  # each recipe writes to its own run directory
    model = Transformer(cfg.model, cfg.tokenizer.vocab_size).eval()
    ids = torch.randint(0, cfg.tokenizer.vocab_size, (1, cfg.pretrain.seq_len))
    with torch.no_grad():
        logits = model(ids)
    assert logits.shape == (1, cfg.pretrain.seq_len, cfg.tokenizer.vocab_size)
    assert torch.isfinite(logits).all()
    if recipe in FAMILIES:
        assert hf_config(model)["architectures"] == [FAMILIES[recipe]]


def test_every_family_has_a_recipe():
    assert set(FAMILIES) <= {p.stem for p in RECIPES.glob("*.toml")}
