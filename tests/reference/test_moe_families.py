"""MoE and MLA families (Qwen3-MoE, DeepSeek-V3) to and from Hugging Face format, checked with
transformers itself."""

import json

import pytest
import torch
from safetensors.torch import save_file

from frontierlm.model import load
from frontierlm.model.hf import export_hf, load_hf

transformers = pytest.importorskip("transformers")

VOCAB = 300
QWEN3_MOE = {
    "d_model": 64,
    "n_layers": 3,
    "n_heads": 4,
    "max_seq_len": 64,
    "rope_theta": 50000.0,
    "qk_norm": True,
    "moe_experts": 8,
    "moe_top_k": 2,
    "moe_expert_hidden": 32,
}

MLA = {
    "attention": "mla",
    "mla_kv_lora_rank": 16,
    "mla_qk_nope_head_dim": 12,
    "mla_qk_rope_head_dim": 8,
    "mla_v_head_dim": 10,
}
DEEPSEEK_V3 = {
    **MLA,
    "d_model": 64,
    "n_layers": 3,
    "n_heads": 4,
    "max_seq_len": 64,
    "rope_theta": 50000.0,
    "moe_experts": 8,
    "moe_top_k": 2,
    "moe_expert_hidden": 16,
    "moe_score": "sigmoid",
}


def max_rel_error(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return ((ours - theirs).abs().max() / theirs.abs().max()).item()


def perturb_selection_bias(model) -> None:
    """A bias big enough to change choices, so a bias applied where it should not be shows."""
    with torch.no_grad():
        for moe in model.moe_layers():
            moe.selection_bias.uniform_(-0.5, 0.5)


def perturb_norms(hf) -> None:
    """transformers initialises norm gains to ones: perturb them so a misplaced one shows."""
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)


def compare_export(model, out) -> tuple[float, float, str]:
    """(export error against transformers, read-back error against the model, the class
    transformers built)."""
    export_hf(model, out)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(0, VOCAB, (2, 48))
    with torch.no_grad():
        ours = model(ids)
        exported = max_rel_error(ours, hf(input_ids=ids).logits)
        back = max_rel_error(load(out)(ids), ours)
    return exported, back, type(hf).__name__


@pytest.mark.parametrize(
    "fields",
    [
        {"moe_norm_topk": True, "moe_first_dense": 1, "n_kv_heads": 2},
        {"moe_norm_topk": False, "moe_first_dense": 0, "tie_embeddings": False},
        # all layers dense: every layer in mlp_only_layers
        {"moe_norm_topk": False, "moe_first_dense": 3, "n_kv_heads": 1},
    ],
)
def test_qwen3_moe_export_loads_in_transformers_with_same_logits(
    tmp_path, make_random_model, fields
):
    model = make_random_model(VOCAB, **QWEN3_MOE, **fields)
    # Balanced by the auxiliary loss, the selection bias steers nothing: it must not leak.
    perturb_selection_bias(model)
    exported, back, family = compare_export(model, tmp_path / "hf")
    assert family == "Qwen3MoeForCausalLM"
    assert exported < 1e-4
    assert back < 1e-6
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["norm_topk_prob"] == fields["moe_norm_topk"]
    assert config["mlp_only_layers"] == list(range(fields["moe_first_dense"]))


def test_qwen3_moe_export_writes_per_expert_weights_as_save_pretrained_does(
    tmp_path, make_random_model
):
    from safetensors.torch import load_file

    model = make_random_model(VOCAB, **QWEN3_MOE, moe_first_dense=1)
    export_hf(model, tmp_path / "hf")
    keys = set(load_file(str(tmp_path / "hf" / "model.safetensors")))
    assert "model.layers.1.mlp.experts.7.gate_proj.weight" in keys
    assert "model.layers.1.mlp.gate.weight" in keys
    assert not any(
        k.endswith(("gate_up_proj", "selection_bias", "load", "router.weight")) for k in keys
    )
    assert "model.layers.0.mlp.gate_proj.weight" in keys  # the dense first layer


def qwen3_moe_made_by_transformers(
    tmp_path, norm_topk: bool, fused: bool, dense=(0,), head_dim: int = 8
):
    torch.manual_seed(2)
    config = transformers.Qwen3MoeConfig(
        vocab_size=256,
        hidden_size=48,
        intermediate_size=80,
        moe_intermediate_size=24,
        num_hidden_layers=3,
        num_attention_heads=6,
        num_key_value_heads=2,
        head_dim=head_dim,
        num_experts=8,
        num_experts_per_tok=3,
        norm_topk_prob=norm_topk,
        mlp_only_layers=list(dense),
        max_position_embeddings=64,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
    )
    hf = transformers.Qwen3MoeForCausalLM(config).eval()
    perturb_norms(hf)
    hf.save_pretrained(tmp_path / "made")
    if fused:  # transformers 5's in-memory layout, one tensor for all experts of a layer
        state = {k: v.contiguous() for k, v in hf.state_dict().items()}
        save_file(state, str(tmp_path / "made" / "model.safetensors"), metadata={"format": "pt"})
    return hf


@pytest.mark.parametrize("norm_topk,fused", [(True, False), (False, False), (False, True)])
def test_import_of_a_transformers_made_qwen3_moe(tmp_path, norm_topk, fused):
    hf = qwen3_moe_made_by_transformers(tmp_path, norm_topk, fused)
    ours = load_hf(tmp_path / "made")
    cfg = ours.cfg
    assert (cfg.moe_experts, cfg.moe_top_k, cfg.moe_first_dense) == (8, 3, 1)
    assert cfg.moe_norm_topk == norm_topk and cfg.qk_norm and cfg.kv_heads == 2
    assert (cfg.hidden, cfg.expert_hidden) == (80, 24)
    ids = torch.randint(0, 256, (3, 40))
    with torch.no_grad():
        assert max_rel_error(ours(ids), hf(input_ids=ids).logits) < 1e-4


@pytest.mark.parametrize(
    "fields,switch",
    [
        ({"qk_norm": False}, r"model\.qk_norm=False has no Qwen3-MoE"),
        ({"moe_score": "sigmoid"}, r"model\.moe_score='sigmoid' has no Qwen3-MoE"),
        ({"moe_shared_experts": 1}, r"model\.moe_shared_experts=1 has no Qwen3-MoE"),
        ({"attn_softcap": 30.0}, r"model\.attn_softcap=30\.0 has no"),
        ({"sliding_window": 8, "layer_pattern": "LG"}, r"model\.sliding_window=8 has no"),
        ({"moe_routed_scale": 2.5}, r"model\.moe_routed_scale=2\.5 has no Qwen3-MoE"),
        ({"moe_groups": 4, "moe_topk_groups": 2}, r"model\.moe_groups=4 has no Qwen3-MoE"),
        # MLA exports as DeepSeek-V3, which routes by sigmoid and has no local layers either
        ({"qk_norm": False, **MLA}, r"model\.moe_score='softmax' has no DeepSeek-V3"),
        (
            {"qk_norm": False, **MLA, "sliding_window": 8, "layer_pattern": "LG"},
            r"model\.sliding_window=8 has no Qwen3-MoE or DeepSeek-V3",
        ),
    ],
)
def test_moe_export_names_the_switch_no_family_expresses(
    tmp_path, make_random_model, fields, switch
):
    model = make_random_model(VOCAB, **{**QWEN3_MOE, **fields})
    with pytest.raises(NotImplementedError, match=switch):
        export_hf(model, tmp_path / "out")
    assert not list(tmp_path.iterdir())


def test_a_steering_selection_bias_does_not_export_as_qwen3_moe(tmp_path, make_random_model):
    model = make_random_model(VOCAB, **QWEN3_MOE, moe_balance="bias")
    export_hf(model, tmp_path / "zero")  # a zero bias changes nothing: exportable
    perturb_selection_bias(model)
    with pytest.raises(NotImplementedError, match=r"model\.moe_balance='bias' has no Qwen3-MoE"):
        export_hf(model, tmp_path / "out")


def test_qwen3_moe_layouts_beyond_first_k_dense_fail_clearly(tmp_path):
    qwen3_moe_made_by_transformers(tmp_path, True, False)
    config_file = tmp_path / "made" / "config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, "decoder_sparse_step": 2, "mlp_only_layers": []}))
    with pytest.raises(NotImplementedError, match=r"decoder_sparse_step=2.*moe_first_dense"):
        load_hf(tmp_path / "made")
    # Any first-k-dense spelling is fine: here layers 0 and 1 in mlp_only_layers.
    hf = qwen3_moe_made_by_transformers(tmp_path, True, False, dense=(1, 0))
    ours = load_hf(tmp_path / "made")
    assert ours.cfg.moe_first_dense == 2
    ids = torch.randint(0, 256, (1, 20))
    with torch.no_grad():
        assert max_rel_error(ours(ids), hf(input_ids=ids).logits) < 1e-4


@pytest.mark.parametrize(
    "fields",
    [
        # DeepSeek-V3's routing in full: first layer dense, bias steering the choice, groups,
        # shared expert, renormalised then scaled weights, low-rank queries
        {
            "mla_q_lora_rank": 24,
            "moe_first_dense": 1,
            "moe_shared_experts": 1,
            "moe_balance": "bias",
            "moe_groups": 4,
            "moe_topk_groups": 2,
            "moe_routed_scale": 2.5,
            "tie_embeddings": False,
        },
        # no shared experts, raw sigmoid weights, aux-loss balancing (the bias must not leak)
        {"moe_top_k": 3, "moe_norm_topk": False, "moe_balance": "aux_loss"},
        # two shared experts, smebu bias, YaRN on the rope slices
        {
            "moe_shared_experts": 2,
            "moe_balance": "smebu",
            "moe_first_dense": 2,
            "max_seq_len": 128,
            "yarn_factor": 4.0,
            "yarn_original_max_len": 32,
        },
        # DeepSeek-V3's YaRN: cos/sin unscaled (mscale / mscale_all_dim = 1), scores sharpened
        {
            "moe_balance": "bias",
            "max_seq_len": 128,
            "yarn_factor": 4.0,
            "yarn_original_max_len": 32,
            "yarn_mscale": 1.0,
            "yarn_mscale_all_dim": 1.0,
        },
        # dense MLA: every layer dense (first_k_dense_replace = num_hidden_layers)
        {"moe_experts": 0, "moe_score": "softmax", "mla_q_lora_rank": 24, "mla_v_head_dim": 16},
    ],
)
@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")  # zero shared experts
def test_deepseek_v3_export_loads_in_transformers_with_same_logits(
    tmp_path, make_random_model, fields
):
    model = make_random_model(VOCAB, **{**DEEPSEEK_V3, **fields})
    perturb_selection_bias(model)
    exported, back, family = compare_export(model, tmp_path / "hf")
    assert family == "DeepseekV3ForCausalLM"
    assert exported < 1e-4
    assert back < 1e-6
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["rope_interleave"] is True
    if model.cfg.moe_balance == "bias":  # the bias is what makes the match: dropped, it breaks
        from safetensors.torch import load_file, save_file

        weights = load_file(str(tmp_path / "hf" / "model.safetensors"))
        for key in [k for k in weights if k.endswith("e_score_correction_bias")]:
            weights[key] = torch.zeros_like(weights[key])
        save_file(weights, str(tmp_path / "hf" / "model.safetensors"), metadata={"format": "pt"})
        hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
        ids = torch.randint(0, VOCAB, (2, 48))
        with torch.no_grad():
            assert max_rel_error(model(ids), hf(input_ids=ids).logits) > 1e-3


def deepseek_v3_made_by_transformers(tmp_path, **overrides):
    torch.manual_seed(3)
    settings = {
        "vocab_size": 256,
        "hidden_size": 48,
        "intermediate_size": 80,
        "moe_intermediate_size": 24,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "q_lora_rank": 32,
        "kv_lora_rank": 24,
        "qk_nope_head_dim": 16,
        "qk_rope_head_dim": 8,
        "v_head_dim": 12,
        "n_routed_experts": 12,
        "num_experts_per_tok": 3,
        "n_shared_experts": 1,
        "n_group": 4,
        "topk_group": 2,
        "first_k_dense_replace": 1,
        "routed_scaling_factor": 2.5,
        "norm_topk_prob": True,
        "max_position_embeddings": 64,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False,
        "num_nextn_predict_layers": 0,
        **overrides,
    }
    hf = transformers.DeepseekV3ForCausalLM(transformers.DeepseekV3Config(**settings)).eval()
    perturb_norms(hf)
    with torch.no_grad():
        for name, buffer in hf.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buffer.uniform_(-0.3, 0.3)
    hf.save_pretrained(tmp_path / "made")
    return hf


@pytest.mark.parametrize(
    "overrides",
    [
        {},  # rope_interleave true, transformers' default and DeepSeek's checkpoints
        {"rope_interleave": False, "q_lora_rank": None, "norm_topk_prob": False},
        {"n_group": 1, "topk_group": 1, "n_shared_experts": 2, "routed_scaling_factor": 1.0},
        {  # DeepSeek-V3's own rope settings (here extending 16 tokens to 64)
            "rope_parameters": {
                "rope_type": "yarn",
                "rope_theta": 10000.0,
                "factor": 4.0,
                "original_max_position_embeddings": 16,
                "beta_fast": 32,
                "beta_slow": 1,
                "mscale": 1.0,
                "mscale_all_dim": 1.0,
            }
        },
    ],
)
def test_import_of_a_transformers_made_deepseek_v3(tmp_path, overrides):
    hf = deepseek_v3_made_by_transformers(tmp_path, **overrides)
    ours = load_hf(tmp_path / "made")
    cfg = ours.cfg
    assert cfg.attention == "mla" and cfg.moe_score == "sigmoid" and cfg.moe_balance == "bias"
    assert (cfg.moe_experts, cfg.moe_top_k, cfg.moe_first_dense) == (12, 3, 1)
    assert (cfg.hidden, cfg.expert_hidden) == (80, 24)
    assert cfg.moe_groups == overrides.get("n_group", 4)
    assert cfg.mla_q_lora_rank == overrides.get("q_lora_rank", 32)
    ids = torch.randint(0, 256, (3, 40))
    with torch.no_grad():
        assert max_rel_error(ours(ids), hf(input_ids=ids).logits) < 1e-4
    # The imported correction bias steers the choice: without it the logits move.
    with torch.no_grad():
        for moe in ours.moe_layers():
            moe.selection_bias.zero_()
        assert max_rel_error(ours(ids), hf(input_ids=ids).logits) > 1e-3


def test_deepseek_v3_configs_transformers_would_not_reproduce_fail_clearly(tmp_path):
    deepseek_v3_made_by_transformers(tmp_path)
    config_file = tmp_path / "made" / "config.json"
    config = json.loads(config_file.read_text())
    for key, value in [("scoring_func", "softmax"), ("moe_layer_freq", 2)]:
        config_file.write_text(json.dumps({**config, key: value}))
        with pytest.raises(NotImplementedError, match=f"{key}={value!r}"):
            load_hf(tmp_path / "made")
    config_file.write_text(json.dumps({**config, "quantization_config": {"quant_method": "fp8"}}))
    with pytest.raises(NotImplementedError, match="dequantize"):
        load_hf(tmp_path / "made")


def test_import_of_qwen3_moe_with_heads_wider_than_hidden_over_heads(tmp_path):
    # As Qwen3-30B-A3B: 32 heads of 128 in a 2048-wide model; here 6 heads of 16 in 48.
    hf = qwen3_moe_made_by_transformers(tmp_path, True, False, head_dim=16)
    ours = load_hf(tmp_path / "made")
    assert ours.cfg.head_dim == 16 and ours.cfg.attn_head_dim == 16
    ids = torch.randint(0, 256, (2, 30))
    with torch.no_grad():
        assert max_rel_error(ours(ids), hf(input_ids=ids).logits) < 1e-4
    export_hf(ours, tmp_path / "again")  # and back out, as transformers' class
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "again").eval()
    with torch.no_grad():
        assert max_rel_error(ours(ids), again(input_ids=ids).logits) < 1e-4
