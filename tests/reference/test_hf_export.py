"""Export to and import from Hugging Face format, checked with transformers itself."""

import json
import math

import pytest
import torch

from frontierlm.cli import main
from frontierlm.model import load
from frontierlm.model.hf import export_hf, load_hf
from frontierlm.train.checkpoint import save_model_dir

transformers = pytest.importorskip("transformers")


SMALL = {"d_model": 64, "n_layers": 2, "n_heads": 4, "max_seq_len": 64, "rope_theta": 50000.0}


def max_rel_error(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return ((ours - theirs).abs().max() / theirs.abs().max()).item()


@pytest.mark.parametrize(
    "tie,kv,qk_norm,family",
    [
        (True, 4, False, "LlamaForCausalLM"),
        (False, 2, False, "LlamaForCausalLM"),
        (False, 1, False, "LlamaForCausalLM"),
        (True, 2, True, "Qwen3ForCausalLM"),
        (False, 4, True, "Qwen3ForCausalLM"),
    ],
)
def test_export_loads_in_transformers_with_same_logits(
    tmp_path, make_random_model, tie, kv, qk_norm, family
):
    model = make_random_model(**SMALL, n_kv_heads=kv, tie_embeddings=tie, qk_norm=qk_norm)
    export_hf(model, tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert type(hf).__name__ == family
    ids = torch.randint(0, 300, (2, 48))
    with torch.no_grad():
        assert max_rel_error(model(ids), hf(input_ids=ids).logits) < 1e-4
    # And back: our loader reads the exported directory to the same logits.
    with torch.no_grad():
        assert max_rel_error(load(tmp_path / "hf")(ids), model(ids)) < 1e-6


@pytest.mark.parametrize("family", ["Llama", "Qwen3"])
def test_import_of_a_transformers_made_model(tmp_path, family):
    torch.manual_seed(1)
    config = getattr(transformers, f"{family}Config")(
        vocab_size=256,
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=6,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=64,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
    )
    hf = getattr(transformers, f"{family}ForCausalLM")(config).eval()
    if family == "Qwen3":  # fresh norms are all ones: perturb them so a misplaced one shows
        with torch.no_grad():
            for name, p in hf.named_parameters():
                if "norm" in name:
                    p.uniform_(0.5, 1.5)
    hf.save_pretrained(tmp_path / "made")
    ours = load_hf(tmp_path / "made")
    assert ours.cfg.kv_heads == 2 and ours.cfg.qk_norm == (family == "Qwen3")
    assert not ours.training
    ids = torch.randint(0, 256, (3, 40))
    with torch.no_grad():
        assert max_rel_error(ours(ids), hf(input_ids=ids).logits) < 1e-4


@pytest.mark.parametrize(
    "fields,message",
    [
        # Pre-norm models are Llama or Qwen3, which have none of Gemma 2's switches.
        ({"attn_softcap": 50.0}, r"model\.attn_softcap=50\.0 has no Llama or Qwen3"),
        ({"mlp_activation": "gelu_tanh"}, r"model\.mlp_activation='gelu_tanh' has no Llama"),
        ({"embed_scale": True}, r"model\.embed_scale=True has no Llama or Qwen3"),
        ({"attn_scale": 0.25}, r"model\.attn_scale=0\.25 has no Llama or Qwen3"),
        ({"attn_gate": True}, r"model\.attn_gate=True has no Llama or Qwen3"),
        # Sandwich norm is Gemma 2, which always scales its embeddings and has no QK-norm.
        ({"norm": "sandwich"}, r"model\.embed_scale=False has no Gemma 2"),
        ({"norm": "sandwich", "embed_scale": True, "qk_norm": True}, r"model\.qk_norm=True"),
        ({"norm": "sandwich", "embed_scale": True, "rope_pattern": "RN"}, r"rope_pattern='RN'"),
        # Gemma 2 stores the attention scale as query_pre_attn_scalar**-0.5, an integer scalar.
        ({"norm": "sandwich", "embed_scale": True, "attn_scale": 0.3}, r"model\.attn_scale=0\.3"),
    ],
)
def test_export_names_the_switch_no_family_expresses(tmp_path, make_random_model, fields, message):
    model = make_random_model(**SMALL, **fields)
    with pytest.raises(NotImplementedError, match=message):
        export_hf(model, tmp_path / "out")
    assert not list(tmp_path.iterdir())


def test_unsupported_family_and_switch_fail_clearly(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(NotImplementedError, match="model_type='gpt2'"):
        load_hf(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "mlp_bias": True}))
    with pytest.raises(NotImplementedError, match="mlp_bias=True"):
        load_hf(tmp_path)
    gemma = transformers.Gemma2Config(hidden_size=64, num_attention_heads=4, head_dim=16)
    gemma = gemma.to_dict() | {"hidden_activation": "gelu"}
    (tmp_path / "config.json").write_text(json.dumps(gemma))
    with pytest.raises(NotImplementedError, match="hidden_activation='gelu'"):
        load_hf(tmp_path)


def test_export_command_includes_the_tokenizer(tmp_path, small_tokenizer, make_random_model):
    _, tok_dir = small_tokenizer
    run = tmp_path / "run"
    model = make_random_model(vocab_size=1024, **SMALL, n_kv_heads=2)
    save_model_dir(run / "sft" / "model", model)
    (run / "tokenizer").mkdir()
    for f in tok_dir.iterdir():
        (run / "tokenizer" / f.name).write_bytes(f.read_bytes())
    assert main(["export", str(run / "sft"), str(tmp_path / "out"), "--to", "hf"]) == 0
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    ids = tokenizer("ROMEO: hello there", return_tensors="pt").input_ids
    with torch.no_grad():
        assert max_rel_error(model(ids), hf(input_ids=ids).logits) < 1e-4
    assert main(["export", str(tmp_path / "nowhere"), str(tmp_path / "x")]) == 1


@pytest.mark.parametrize(
    "head_dim,theta,factor,orig,mscales",
    [
        (16, 10000.0, 4.0, 32, {}),
        (64, 500000.0, 8.0, 4096, {}),
        (64, 10000.0, 40.0, 4096, {"mscale": 1.0, "mscale_all_dim": 1.0}),  # DeepSeek-V3
        (64, 10000.0, 40.0, 4096, {"mscale": 0.707, "mscale_all_dim": 0.5}),
        (64, 10000.0, 40.0, 4096, {"mscale_all_dim": 0.707}),  # alone: the plain factor
    ],
)
def test_yarn_frequencies_match_transformers(head_dim, theta, factor, orig, mscales):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from frontierlm.model.rope import yarn_frequencies

    config = transformers.LlamaConfig(
        hidden_size=head_dim * 4,
        num_attention_heads=4,
        max_position_embeddings=int(orig * factor),
        rope_parameters={
            "rope_type": "yarn",
            "rope_theta": theta,
            "factor": factor,
            "original_max_position_embeddings": orig,
            **mscales,
        },
    )
    theirs, their_factor = ROPE_INIT_FUNCTIONS["yarn"](config, "cpu")
    ours, our_factor = yarn_frequencies(
        head_dim,
        theta,
        factor,
        orig,
        mscale=mscales.get("mscale"),
        mscale_all_dim=mscales.get("mscale_all_dim"),
    )
    assert torch.allclose(ours, theirs, rtol=1e-6)
    assert our_factor == pytest.approx(their_factor)
    if len(mscales) < 2:
        assert our_factor == pytest.approx(0.1 * math.log(factor) + 1)


def test_yarn_model_exports_and_imports_with_same_logits(tmp_path, make_random_model):
    model = make_random_model(
        vocab_size=300,
        d_model=64,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        max_seq_len=128,
        yarn_factor=4.0,
        yarn_original_max_len=32,
    )
    export_hf(model, tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ids = torch.randint(0, 300, (2, 120))  # far past the original 32-token context
    with torch.no_grad():
        assert max_rel_error(model(ids), hf(input_ids=ids).logits) < 1e-4
        assert max_rel_error(load_hf(tmp_path / "hf")(ids), model(ids)) < 1e-6
