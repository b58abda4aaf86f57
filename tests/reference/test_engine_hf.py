"""The KV-cache engine's greedy output equals transformers' `generate` on the exported model,
dense (Llama, Qwen3) and MoE (Qwen3-MoE; DeepSeek-V3 with MLA)."""

from __future__ import annotations

import pytest
import torch

from frontierlm.inference.engine import generate
from frontierlm.inference.sampling import SamplingParams
from frontierlm.model.hf import export_hf

transformers = pytest.importorskip("transformers")

SMALL = {"d_model": 64, "n_layers": 2, "n_heads": 4, "max_seq_len": 64, "rope_theta": 50000.0}
FAMILIES = {
    "LlamaForCausalLM": {**SMALL, "n_kv_heads": 2, "tie_embeddings": False},
    "Qwen3ForCausalLM": {**SMALL, "n_kv_heads": 1, "qk_norm": True},
    "Qwen3MoeForCausalLM": {
        **SMALL,
        "qk_norm": True,
        "moe_experts": 8,
        "moe_top_k": 2,
        "moe_expert_hidden": 32,
        "moe_first_dense": 1,
    },
    "DeepseekV3ForCausalLM": {
        **SMALL,
        "attention": "mla",
        "mla_kv_lora_rank": 16,
        "mla_qk_nope_head_dim": 12,
        "mla_qk_rope_head_dim": 8,
        "mla_v_head_dim": 10,
        "moe_experts": 8,
        "moe_top_k": 2,
        "moe_expert_hidden": 16,
        "moe_score": "sigmoid",
        "moe_shared_experts": 1,
    },
}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_greedy_equals_transformers_generate(tmp_path, make_random_model, family):
    model = make_random_model(**FAMILIES[family])
    with torch.no_grad():  # peaked logits: no greedy choice is a float-rounding near-tie
        for p in model.parameters():
            if p.dim() >= 2:
                p.mul_(4)
    export_hf(model, tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert type(hf).__name__ == family
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 300, (n,), generator=g).tolist() for n in (5, 12, 2)]
    new = 16
    ours = generate(model, prompts, SamplingParams(max_new_tokens=new, temperature=0), max_batch=2)
    for prompt, completion in zip(prompts, ours, strict=True):
        with torch.no_grad():
            out = hf.generate(
                torch.tensor([prompt]),
                attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                max_new_tokens=new,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=0,
            )
        assert completion.ids == out[0, len(prompt) :].tolist()
