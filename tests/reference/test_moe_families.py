"""MoE families (Qwen3-MoE) to and from Hugging Face format, checked with transformers itself."""

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


def qwen3_moe_made_by_transformers(tmp_path, norm_topk: bool, fused: bool, dense=(0,)):
    torch.manual_seed(2)
    config = transformers.Qwen3MoeConfig(
        vocab_size=256,
        hidden_size=48,
        intermediate_size=80,
        moe_intermediate_size=24,
        num_hidden_layers=3,
        num_attention_heads=6,
        num_key_value_heads=2,
        head_dim=8,
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
