"""Hugging Face format in and out: safetensors + config.json (+ tokenizer files).

Our parameter names are transformers' Llama/Qwen3 names without the `model.` prefix, so those
exports are renames plus a config translation. Gemma 2 differs in two places, converted both
ways: its RMSNorm multiplies by (1 + weight), so it stores our norm weights minus one, and it
names the norms of a sandwich block after their position (`GEMMA2_NORMS`).

The family follows from the config: MLA makes a DeepSeek-V3 and routed experts under GQA a
Qwen3-MoE (see the MoE and MLA families section below); otherwise sandwich norm makes a Gemma 2,
QK-norm a Qwen3, and the rest a Llama. A config its family cannot express raises
NotImplementedError naming the switch.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from frontierlm.atomic import atomic_dir, commit_dir
from frontierlm.config import ModelConfig
from frontierlm.model.moe import MoE
from frontierlm.model.norm import RMSNorm
from frontierlm.model.transformer import Transformer

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")

FAMILIES = {
    "llama": "LlamaForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
}

# Our norm names -> Gemma 2's; ours keep Llama's, where `post_attention_layernorm` is the norm
# in front of the MLP.
GEMMA2_NORMS = {
    "post_attention_layernorm": "pre_feedforward_layernorm",
    "attn_out_norm": "post_attention_layernorm",
    "mlp_out_norm": "post_feedforward_layernorm",
}

# Gemma2Config's values (transformers 5.23) for keys a config.json may leave out; layer_types
# defaults to alternating sliding/full, starting with sliding.
GEMMA2_DEFAULTS: dict[str, Any] = {
    "head_dim": 256,
    "hidden_activation": "gelu_pytorch_tanh",
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": True,
    "query_pre_attn_scalar": 256,
    "sliding_window": 4096,
    "final_logit_softcapping": 30.0,
    "attn_logit_softcapping": 50.0,
}

# Our MLP activations by transformers' names (ACT2FN keys).
HF_ACTIVATIONS = {"silu": "silu", "gelu_tanh": "gelu_pytorch_tanh"}

LAYER_TYPES = {"L": "sliding_attention", "G": "full_attention"}

# Switches whose non-default values a pre-norm (Llama/Qwen3) model cannot carry.
PRE_NORM_FIXED = (
    "attn_gate",
    "attn_softcap",
    "final_softcap",
    "sliding_window",
    "rope_pattern",
    "embed_scale",
    "mlp_activation",
    "attn_scale",
)


def _hf_name(name: str, family: str = "llama") -> str:
    if name.startswith("lm_head."):
        return name
    if family == "gemma2":
        parts = name.split(".")  # layers.<i>.<module>.weight
        if len(parts) == 4 and parts[2] in GEMMA2_NORMS:
            name = ".".join([*parts[:2], GEMMA2_NORMS[parts[2]], parts[3]])
    return f"model.{name}"


def _norm_offset(family: str) -> float:
    """What transformers' norm weight lacks of ours: Gemma's RMSNorm scales by (1 + weight)."""
    return 1.0 if family == "gemma2" else 0.0


def _norm_weights(model: Transformer) -> set[str]:
    return {f"{name}.weight" for name, m in model.named_modules() if isinstance(m, RMSNorm)}


def family_of(cfg: ModelConfig) -> str:
    """The transformers model_type that expresses `cfg`; NotImplementedError naming the first
    switch it cannot."""
    if cfg.moe_experts or cfg.attention != "gqa":
        return "deepseek_v3" if cfg.attention == "mla" else "qwen3_moe"
    if cfg.norm == "sandwich":
        # Gemma 2 always scales its embeddings and has no QK-norm, gate or NoPE layer.
        needed = {"embed_scale": True, "qk_norm": False, "attn_gate": False, "rope_pattern": "R"}
        for switch, allowed in needed.items():
            value = getattr(cfg, switch)
            if value != allowed:
                raise NotImplementedError(
                    f"model.{switch}={value!r} has no Gemma 2 equivalent (norm='sandwich' exports "
                    f"as Gemma 2, which needs {switch}={allowed!r})"
                )
        return "gemma2"
    defaults = ModelConfig()
    for switch in PRE_NORM_FIXED:
        value = getattr(cfg, switch)
        if value != getattr(defaults, switch):
            raise NotImplementedError(
                f"model.{switch}={value!r} has no Llama or Qwen3 equivalent, and pre-norm models "
                "export as those (Gemma 2, with norm='sandwich' and embed_scale=true, has "
                "softcaps, sliding windows, gelu_tanh and attn_scale)"
            )
    return "qwen3" if cfg.qk_norm else "llama"


def _query_pre_attn_scalar(cfg: ModelConfig) -> int:
    """Gemma 2 stores the attention scale as an integer s, the scale being s**-0.5."""
    if cfg.attn_scale is None:
        return cfg.head_dim
    scalar = round(cfg.attn_scale**-2)
    if scalar < 1 or not math.isclose(scalar**-0.5, cfg.attn_scale, rel_tol=1e-9):
        raise NotImplementedError(
            f"model.attn_scale={cfg.attn_scale!r} is not s**-0.5 for an integer s, the only "
            "scales Gemma 2's query_pre_attn_scalar can hold"
        )
    return scalar


def hf_config(model: Transformer) -> dict[str, Any]:
    """The transformers config of the family that expresses `model.cfg`."""
    cfg = model.cfg
    family = family_of(cfg)
    if family in MOE_FAMILIES:
        return moe_family_config(model)
    extra: dict[str, Any] = {}
    if family == "qwen3":
        extra = {"use_sliding_window": False, "layer_types": ["full_attention"] * cfg.n_layers}
    if family in ("llama", "qwen3"):
        extra["mlp_bias"] = False
    if family == "gemma2":
        extra = {
            "hidden_activation": HF_ACTIVATIONS[cfg.mlp_activation],
            "query_pre_attn_scalar": _query_pre_attn_scalar(cfg),
            # Written even when None: Gemma2Config's defaults (50, 30) would cap otherwise.
            "attn_logit_softcapping": cfg.attn_softcap,
            "final_logit_softcapping": cfg.final_softcap,
            "layer_types": [
                LAYER_TYPES["L" if cfg.layer_window(i) else "G"] for i in range(cfg.n_layers)
            ],
            # transformers builds the sliding mask even when no layer uses it, and refuses a
            # None window; a window of the whole context is full attention anyway.
            "sliding_window": cfg.sliding_window or cfg.max_seq_len,
        }
    return {
        "architectures": [FAMILIES[family]],
        "model_type": family,
        **extra,
        "vocab_size": model.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.hidden,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.head_dim,
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_parameters": rope_parameters(cfg),
        "tie_word_embeddings": cfg.tie_embeddings,
        "hidden_act": HF_ACTIVATIONS[cfg.mlp_activation],
        "attention_bias": False,
        "initializer_range": cfg.init_std,
        "torch_dtype": "float32",
    }


def rope_parameters(cfg: ModelConfig) -> dict[str, Any]:
    params: dict[str, Any] = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.yarn_factor is not None:
        params |= {
            "rope_type": "yarn",
            "factor": cfg.yarn_factor,
            "original_max_position_embeddings": cfg.yarn_original_max_len,
            "beta_fast": cfg.yarn_beta_fast,
            "beta_slow": cfg.yarn_beta_slow,
        }
        for key, value in [
            ("mscale", cfg.yarn_mscale),
            ("mscale_all_dim", cfg.yarn_mscale_all_dim),
        ]:
            if value is not None:
                params[key] = value
    return params


def export_hf(model: Transformer, out: Path, tokenizer_dir: Path | None = None) -> None:
    """Write `model` as a transformers checkpoint (atomically: temp dir, then rename)."""
    config = hf_config(model)  # first: a config no family expresses fails before any write
    family = config["model_type"]
    offset, norms = _norm_offset(family), _norm_weights(model)
    tmp = atomic_dir(out)
    state = {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and model.cfg.tie_embeddings:
            continue  # tied: transformers rebuilds it from the embedding
        tensor = tensor.detach().to("cpu", torch.float32)
        if name in norms and offset:
            # Exact for weights in [0.5, 2] (Sterbenz), so transformers' 1 + w gives ours back.
            tensor = tensor - offset
        state[_hf_name(name, family)] = tensor.contiguous()
    if family in MOE_FAMILIES:
        state = _moe_family_state(model, family, state)
    save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    if tokenizer_dir is not None:
        for name in TOKENIZER_FILES:
            if (tokenizer_dir / name).is_file():
                shutil.copy2(tokenizer_dir / name, tmp / name)
    commit_dir(tmp, out)


def _require(config: dict[str, Any], key: str, allowed: Any, path: Path) -> None:
    value = config.get(key, allowed)
    if value != allowed:
        raise NotImplementedError(
            f"{path}/config.json: {key}={value!r} is not supported (only {allowed!r}): "
            "FrontierLM has no switch that reproduces it"
        )


def _layer_pattern(layer_types: list[str], n_layers: int, config_file: Path) -> str:
    """transformers' per-layer `layer_types` as our repeating `layer_pattern`, shortest period
    first, so a Gemma 2 reads "LG" rather than one letter per layer."""
    letters = {kind: letter for letter, kind in LAYER_TYPES.items()}
    unknown = sorted(set(layer_types) - letters.keys())
    if unknown:
        raise NotImplementedError(
            f"{config_file}: layer_types has {unknown}; only {sorted(letters)} import"
        )
    if len(layer_types) != n_layers:
        raise ValueError(
            f"{config_file}: layer_types has {len(layer_types)} entries for "
            f"num_hidden_layers={n_layers}"
        )
    pattern = "".join(letters[kind] for kind in layer_types)
    period = next(
        k
        for k in range(1, n_layers + 1)
        if all(pattern[i] == pattern[i % k] for i in range(n_layers))
    )
    return pattern[:period]


def _gemma2_fields(config: dict[str, Any], head_dim: int, config_file: Path) -> dict[str, Any]:
    """The ModelConfig switches a Gemma 2 config sets (defaults already filled in)."""
    if config.get("use_bidirectional_attention"):
        raise NotImplementedError(f"{config_file}: use_bidirectional_attention is not supported")
    activation = config["hidden_activation"]
    ours = {hf: name for name, hf in HF_ACTIVATIONS.items()}
    if activation not in ours:
        raise NotImplementedError(
            f"{config_file}: hidden_activation={activation!r}; only {sorted(ours)} import"
        )
    n_layers = config["num_hidden_layers"]
    layer_types = config.get("layer_types") or [
        LAYER_TYPES["L" if i % 2 == 0 else "G"] for i in range(n_layers)
    ]
    pattern = _layer_pattern(layer_types, n_layers, config_file)
    window = config["sliding_window"] if "L" in pattern else None
    if "L" in pattern and window is None:
        raise ValueError(f"{config_file}: sliding layers in layer_types but sliding_window=None")
    scalar = config["query_pre_attn_scalar"]
    return {
        "norm": "sandwich",
        "embed_scale": True,
        "mlp_activation": ours[activation],
        # The same double transformers computes, so the scores match bit for bit.
        "attn_scale": None if scalar == head_dim else scalar**-0.5,
        "attn_softcap": config["attn_logit_softcapping"],
        "final_softcap": config["final_logit_softcapping"],
        "layer_pattern": pattern,
        "sliding_window": window,
    }


def load_hf(path: str | Path) -> Transformer:
    """A transformers Llama, Qwen3, Gemma 2, Qwen3-MoE or DeepSeek-V3 checkpoint (config.json +
    safetensors) as our Transformer."""
    path = Path(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{path} has no config.json: not a Hugging Face model directory")
    config = json.loads(config_file.read_text())
    family = config.get("model_type")
    if family in MOE_FAMILIES:
        return _load_moe_family(config, path)
    if family not in FAMILIES:
        raise NotImplementedError(
            f"{config_file}: model_type={family!r}; {sorted(FAMILIES | MOE_FAMILIES)} import"
        )
    if family == "qwen3":
        _require(config, "use_sliding_window", False, path)
    _require(config, "attention_bias", False, path)
    if family == "gemma2":
        config = GEMMA2_DEFAULTS | config
    else:
        for key, allowed in [("hidden_act", "silu"), ("mlp_bias", False)]:
            _require(config, key, allowed, path)
    n_heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // n_heads
    family_fields = _gemma2_fields(config, head_dim, config_file) if family == "gemma2" else {}
    cfg = ModelConfig(
        d_model=config["hidden_size"],
        n_layers=config["num_hidden_layers"],
        n_heads=n_heads,
        n_kv_heads=config.get("num_key_value_heads", n_heads),
        # Set only where it differs (every Gemma 2: 8 heads of 256 in a 2304-wide 2B).
        attn_head_dim=None if head_dim * n_heads == config["hidden_size"] else head_dim,
        ffn_hidden=config["intermediate_size"],
        **_rope_fields(config, path),
        max_seq_len=config.get("max_position_embeddings", 2048),
        tie_embeddings=config.get("tie_word_embeddings", False),
        qk_norm=family == "qwen3",
        norm_eps=config.get("rms_norm_eps", 1e-6),
        **family_fields,
    )
    model = Transformer(cfg, config["vocab_size"])
    return _load_weights(model, _read_safetensors(path), path, family)


def _rope_fields(config: dict[str, Any], path: Path) -> dict[str, Any]:
    """The ModelConfig fields of a transformers config's RoPE settings."""
    # transformers 5 keeps RoPE settings in `rope_parameters`; 4.x in `rope_theta`/`rope_scaling`.
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "yarn"):
        raise NotImplementedError(
            f"{path}/config.json: rope_type={rope_type!r}; default and yarn only"
        )
    _require(rope, "attention_factor", None, path)
    _require(rope, "truncate", True, path)
    fields: dict[str, Any] = {
        "rope_theta": config.get("rope_theta") or rope.get("rope_theta", 10000.0)
    }
    if rope_type == "yarn":
        fields |= {
            "yarn_factor": rope["factor"],
            "yarn_original_max_len": rope["original_max_position_embeddings"],
            "yarn_beta_fast": rope.get("beta_fast") or 32.0,
            "yarn_beta_slow": rope.get("beta_slow") or 1.0,
            # 0 and absent mean the same to transformers
            "yarn_mscale": rope.get("mscale") or None,
            "yarn_mscale_all_dim": rope.get("mscale_all_dim") or None,
        }
    return fields


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    files = sorted(path.glob("model*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{path}: no model*.safetensors weights")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        state.update(load_file(str(file)))
    return state


def _load_weights(
    model: Transformer, state: dict[str, torch.Tensor], path: Path, family: str = "llama"
) -> Transformer:
    """`model` in eval mode with the weights of `state` (keyed by transformers' names)."""
    cfg = model.cfg
    offset, norms = _norm_offset(family), _norm_weights(model)
    ours = {}
    for name in model.state_dict():
        key = _hf_name(name, family)
        if key not in state:
            if name == "lm_head.weight" and cfg.tie_embeddings:
                continue
            raise ValueError(f"{path}: weight {key} is missing from the safetensors files")
        # Sum in float32, as transformers' Gemma norm does, so the weight is the one it uses.
        tensor = state[key].to(torch.float32)
        ours[name] = tensor + offset if name in norms and offset else tensor
    model.load_state_dict(ours, strict=not cfg.tie_embeddings)
    return model.eval()


# ----------------------------------------------------------------------------- MoE and MLA families
#
# Routed experts under grouped-query attention export as Qwen3-MoE (softmax routing, QK-norm, no
# shared experts); MLA, with or without routed experts, as DeepSeek-V3 (sigmoid routing, our
# selection bias as its e_score_correction_bias, shared experts, group-limited routing, scaled
# mixing weights).
#
# Experts: our MoE keeps them fused as transformers 5 holds them in memory (`gate_up_proj`
# (experts, 2 * hidden, d), `down_proj` (experts, d, hidden)), but checkpoints on disk, the ones
# `save_pretrained` writes and vLLM and older transformers read, hold one gate/up/down matrix per
# expert (`mlp.experts.{e}.gate_proj.weight`), which transformers 5 fuses while loading
# (conversion_mapping.py). So export splits and import fuses, and import also takes fused tensors
# should a checkpoint hold those.
#
# MLA's RoPE slices: DeepSeek's checkpoints order each slice's rows in interleaved pairs (rows 2i
# and 2i+1 turn together); transformers, told `rope_interleave` (its default), regroups them after
# projecting into the half-split layout it rotates. Our MLA rotates half-split directly, so export
# writes the rows interleaved with rope_interleave true, as DeepSeek's own checkpoints are, and
# import regroups interleaved rows; the regrouping is a row permutation, so logits are unchanged.

MOE_FAMILIES = {"qwen3_moe": "Qwen3MoeForCausalLM", "deepseek_v3": "DeepseekV3ForCausalLM"}

# Switches neither family expresses, whatever the attention.
_MOE_UNEXPRESSED = (
    "attn_gate",
    "attn_softcap",
    "final_softcap",
    "sliding_window",
    "norm",
    "rope_pattern",
    "embed_scale",
    "mlp_activation",
    "attn_scale",
)


def moe_family_config(model: Transformer) -> dict[str, Any]:
    """The transformers config of the MoE/MLA family that expresses `model.cfg`:
    NotImplementedError naming the switch when none does."""
    cfg = model.cfg
    defaults = ModelConfig()
    for switch in _MOE_UNEXPRESSED:
        value = getattr(cfg, switch)
        if value != getattr(defaults, switch):
            raise NotImplementedError(
                f"model.{switch}={value!r} has no Qwen3-MoE or DeepSeek-V3 equivalent"
            )
    if cfg.attention == "mla":
        return _deepseek_v3_config(model)
    return _qwen3_moe_config(model)


def _reject(switch: str, value: Any, family: str, why: str) -> NotImplementedError:
    return NotImplementedError(f"model.{switch}={value!r} has no {family} equivalent: {why}")


def _biased(cfg: ModelConfig) -> bool:
    """Whether the selection bias takes part in the choice of experts."""
    return cfg.moe_balance in ("bias", "smebu")


def _common_config(model: Transformer) -> dict[str, Any]:
    """The keys both families' transformers configs share."""
    cfg = model.cfg
    return {
        "vocab_size": model.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.hidden,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_parameters": rope_parameters(cfg),
        "tie_word_embeddings": cfg.tie_embeddings,
        "hidden_act": "silu",
        "attention_bias": False,
        "initializer_range": cfg.init_std,
        "torch_dtype": "float32",
    }


def _qwen3_moe_config(model: Transformer) -> dict[str, Any]:
    cfg = model.cfg
    family, elsewhere = "Qwen3-MoE", "DeepSeek-V3 has it (with attention='mla')"
    if not cfg.qk_norm:
        raise _reject("qk_norm", False, family, "its attention always normalises q and k")
    if cfg.moe_score != "softmax":
        raise _reject("moe_score", cfg.moe_score, family, f"it routes by softmax; {elsewhere}")
    if cfg.moe_shared_experts:
        raise _reject(
            "moe_shared_experts", cfg.moe_shared_experts, family, f"no shared experts; {elsewhere}"
        )
    if cfg.moe_routed_scale != 1.0:
        raise _reject(
            "moe_routed_scale", cfg.moe_routed_scale, family, f"no routed scaling; {elsewhere}"
        )
    if cfg.moe_groups > 1:
        raise _reject(
            "moe_groups", cfg.moe_groups, family, f"no group-limited routing; {elsewhere}"
        )
    if _biased(cfg) and any(bool(m.selection_bias.any()) for m in model.moe_layers()):
        raise _reject(
            "moe_balance",
            cfg.moe_balance,
            family,
            "it has no selection bias, and this model's non-zero bias changes which experts are "
            f"chosen; {elsewhere}",
        )
    return {
        "architectures": [MOE_FAMILIES["qwen3_moe"]],
        "model_type": "qwen3_moe",
        **_common_config(model),
        "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.head_dim,
        "use_sliding_window": False,
        "sliding_window": None,
        "num_experts": cfg.moe_experts,
        "num_experts_per_tok": cfg.moe_top_k,
        "moe_intermediate_size": cfg.expert_hidden,
        "norm_topk_prob": cfg.moe_norm_topk,
        # The first layers dense, all others MoE; Qwen3-MoE's step rule adds nothing then.
        "decoder_sparse_step": 1,
        "mlp_only_layers": list(range(min(cfg.moe_first_dense, cfg.n_layers))),
        "router_aux_loss_coef": cfg.moe_aux_weight,
        "output_router_logits": False,
    }


def _deepseek_v3_config(model: Transformer) -> dict[str, Any]:
    cfg = model.cfg
    has_moe = any(cfg.layer_is_moe(i) for i in range(cfg.n_layers))
    if has_moe and cfg.moe_score != "sigmoid":
        raise _reject("moe_score", cfg.moe_score, "DeepSeek-V3", "it routes by sigmoid scores")
    return {
        "architectures": [MOE_FAMILIES["deepseek_v3"]],
        "model_type": "deepseek_v3",
        **_common_config(model),
        # Every head has its own keys and values, expanded from the shared latent.
        "num_key_value_heads": cfg.n_heads,
        "q_lora_rank": cfg.mla_q_lora_rank,
        "kv_lora_rank": cfg.mla_kv_lora_rank,
        "qk_nope_head_dim": cfg.mla_qk_nope_head_dim,
        "qk_rope_head_dim": cfg.mla_qk_rope_head_dim,
        "v_head_dim": cfg.mla_v_head_dim,
        "head_dim": cfg.mla_qk_rope_head_dim,  # what transformers sizes its RoPE tables by
        "rope_interleave": True,
        "n_routed_experts": cfg.moe_experts,
        "num_experts_per_tok": cfg.moe_top_k,
        "moe_intermediate_size": cfg.expert_hidden,
        "n_shared_experts": cfg.moe_shared_experts,
        "first_k_dense_replace": min(cfg.moe_first_dense, cfg.n_layers)
        if has_moe
        else cfg.n_layers,
        "norm_topk_prob": cfg.moe_norm_topk,
        "routed_scaling_factor": cfg.moe_routed_scale,
        "n_group": cfg.moe_groups,
        "topk_group": cfg.moe_topk_groups,
        # transformers implies these; DeepSeek's own code and vLLM read them.
        "scoring_func": "sigmoid",
        "topk_method": "noaux_tc",
        "moe_layer_freq": 1,
        "num_nextn_predict_layers": 0,
    }


_MOE_PARAM = re.compile(r"(model\.layers\.\d+\.mlp)\.(gate_up_proj|down_proj)")
_MOE_BUFFER = re.compile(r"(model\.layers\.\d+\.mlp)\.(selection_bias|load|bias_velocity)")
# Our MoE names -> transformers' (after the `model.` prefix), applied in order.
_MOE_RENAMES = (
    (".mlp.selection_bias", ".mlp.gate.e_score_correction_bias"),
    (".mlp.router.", ".mlp.gate."),
    (".mlp.shared.", ".mlp.shared_experts."),
)


def _moe_family_state(
    model: Transformer, family: str, state: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """transformers' checkpoint tensors of an MoE/MLA family from our `model.`-prefixed ones:
    experts split per expert, MoE modules renamed, MLA's RoPE rows interleaved, training-only
    buffers dropped."""
    cfg = model.cfg
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        if match := _MOE_BUFFER.fullmatch(key):
            if family == "deepseek_v3" and match[2] == "selection_bias":
                # DeepSeek-V3 always adds it to the choice scores: zero unless ours does too.
                bias = tensor if _biased(cfg) else torch.zeros_like(tensor)
                out[f"{match[1]}.gate.e_score_correction_bias"] = bias
            continue  # the balancing state has no transformers counterpart
        if match := _MOE_PARAM.fullmatch(key):
            prefix = f"{match[1]}.experts"
            # clone: safetensors refuses tensors that share storage
            if match[2] == "gate_up_proj":
                gate, up = tensor.chunk(2, dim=1)
                for e in range(tensor.shape[0]):
                    out[f"{prefix}.{e}.gate_proj.weight"] = gate[e].clone()
                    out[f"{prefix}.{e}.up_proj.weight"] = up[e].clone()
            else:
                for e in range(tensor.shape[0]):
                    out[f"{prefix}.{e}.down_proj.weight"] = tensor[e].clone()
            continue
        for ours, theirs in _MOE_RENAMES:
            key = key.replace(ours, theirs)
        out[key] = tensor
    if family == "deepseek_v3":
        if not cfg.moe_shared_experts:  # DeepSeek-V3 builds them anyway, zero wide
            for i, layer in enumerate(model.layers):
                if isinstance(layer.mlp, MoE):
                    prefix = f"model.layers.{i}.mlp.shared_experts"
                    out[f"{prefix}.gate_proj.weight"] = torch.zeros(0, cfg.d_model)
                    out[f"{prefix}.up_proj.weight"] = torch.zeros(0, cfg.d_model)
                    out[f"{prefix}.down_proj.weight"] = torch.zeros(cfg.d_model, 0)
        _reorder_mla_rope_rows(cfg, out, to_interleaved=True)
    return out


def _reorder_mla_rope_rows(
    cfg: ModelConfig, state: dict[str, torch.Tensor], to_interleaved: bool
) -> None:
    """Reorder, in place, the rows of the projections that make MLA's RoPE slices (the query
    heads' and the shared key's) between our half-split order and interleaved pairs."""
    rope, half = cfg.mla_qk_rope_head_dim, cfg.mla_qk_rope_head_dim // 2
    if to_interleaved:  # interleaved row 2i is our row i, row 2i + 1 our row half + i
        order = torch.stack([torch.arange(half), torch.arange(half) + half], dim=1).flatten()
    else:
        order = torch.cat([torch.arange(0, rope, 2), torch.arange(1, rope, 2)])
    query = "q_proj" if cfg.mla_q_lora_rank is None else "q_b_proj"
    for i in range(cfg.n_layers):
        prefix = f"model.layers.{i}.self_attn"
        # Each block of rows ends in its rope slice: per query head, and the latent + key one.
        for name, block in [
            (query, cfg.qk_head_dim),
            ("kv_a_proj_with_mqa", cfg.mla_kv_lora_rank + rope),
        ]:
            key = f"{prefix}.{name}.weight"
            if key not in state:
                continue  # reported as missing when the weights load
            weight = state[key]
            rows = weight.reshape(-1, block, weight.shape[-1])
            rows = torch.cat([rows[:, : block - rope], rows[:, block - rope :][:, order]], dim=1)
            state[key] = rows.reshape(weight.shape)


def _config_value(config: dict[str, Any], path: Path, *keys: str) -> Any:
    """The first of `keys` present in `config` (a setting transformers stores under two names)."""
    for key in keys:
        if key in config:
            return config[key]
    raise ValueError(f"{path}/config.json: {' or '.join(keys)} is missing")


def _qwen3_moe_first_dense(config: dict[str, Any], n_experts: int, path: Path) -> int:
    """Qwen3-MoE's dense/MoE layer layout as our `moe_first_dense`; NotImplementedError when the
    MoE layers are not all the layers from some index on."""
    n_layers = config["num_hidden_layers"]
    step = config.get("decoder_sparse_step", 1)
    dense_only = config.get("mlp_only_layers") or []
    is_moe = [
        i not in dense_only and n_experts > 0 and (i + 1) % step == 0 for i in range(n_layers)
    ]
    first = is_moe.index(True) if any(is_moe) else n_layers
    if not all(is_moe[first:]):
        raise NotImplementedError(
            f"{path}/config.json: decoder_sparse_step={step}, mlp_only_layers={dense_only} make "
            f"layers {[i for i, m in enumerate(is_moe) if m]} MoE; FrontierLM expresses only the "
            "first layers dense and all later ones MoE (model.moe_first_dense)"
        )
    return first


def _qwen3_moe_fields(config: dict[str, Any], path: Path) -> dict[str, Any]:
    _require(config, "use_sliding_window", False, path)
    n_heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // n_heads
    n_experts = _config_value(config, path, "num_experts", "num_local_experts")
    first_dense = _qwen3_moe_first_dense(config, n_experts, path)
    return {
        "n_kv_heads": config.get("num_key_value_heads", n_heads),
        # Set only where it differs (Qwen3-30B-A3B: 32 heads of 128 in a 2048-wide model).
        "attn_head_dim": None if head_dim * n_heads == config["hidden_size"] else head_dim,
        "qk_norm": True,
        "moe_experts": n_experts if first_dense < config["num_hidden_layers"] else 0,
        "moe_top_k": config["num_experts_per_tok"],
        "moe_expert_hidden": config["moe_intermediate_size"],
        "moe_first_dense": first_dense,
        "moe_score": "softmax",
        # Defaults, where a config leaves a key out, are transformers' (Qwen3MoeConfig).
        "moe_norm_topk": config.get("norm_topk_prob", False),
        "moe_balance": "aux_loss",
        "moe_aux_weight": config.get("router_aux_loss_coef", 0.001),
    }


def _deepseek_v3_fields(config: dict[str, Any], path: Path) -> dict[str, Any]:
    # transformers ignores these and always routes DeepSeek-V3's way; a config that says
    # otherwise describes a model transformers would not reproduce either.
    for key, allowed in [("scoring_func", "sigmoid"), ("topk_method", "noaux_tc")]:
        _require(config, key, allowed, path)
    _require(config, "moe_layer_freq", 1, path)
    n_layers = config["num_hidden_layers"]
    n_experts = _config_value(config, path, "n_routed_experts", "num_local_experts")
    # Defaults, where a config leaves a key out, are transformers' (DeepseekV3Config).
    first_dense = min(config.get("first_k_dense_replace", 3), n_layers)
    if not n_experts and first_dense < n_layers:
        raise NotImplementedError(
            f"{path}/config.json: n_routed_experts=0 yet MoE layers from first_k_dense_replace="
            f"{first_dense}"
        )
    return {
        "attention": "mla",
        "mla_q_lora_rank": config.get("q_lora_rank"),
        "mla_kv_lora_rank": config["kv_lora_rank"],
        "mla_qk_nope_head_dim": config["qk_nope_head_dim"],
        "mla_qk_rope_head_dim": config["qk_rope_head_dim"],
        "mla_v_head_dim": config["v_head_dim"],
        "moe_experts": n_experts,
        "moe_top_k": config["num_experts_per_tok"],
        "moe_expert_hidden": config["moe_intermediate_size"],
        "moe_shared_experts": config.get("n_shared_experts", 1),
        "moe_first_dense": first_dense,
        "moe_score": "sigmoid",
        "moe_norm_topk": config.get("norm_topk_prob", True),
        "moe_routed_scale": config.get("routed_scaling_factor", 2.5),
        "moe_groups": config.get("n_group", 8) or 1,
        "moe_topk_groups": config.get("topk_group", 4) or 1,
        "moe_balance": "bias",  # e_score_correction_bias: DeepSeek-V3's auxiliary-loss-free bias
    }


def _load_moe_family(config: dict[str, Any], path: Path) -> Transformer:
    family = config["model_type"]
    if "quantization_config" in config:
        raise NotImplementedError(
            f"{path}/config.json: quantized weights ({config['quantization_config']}); "
            "dequantize to a float checkpoint first"
        )
    for key, allowed in [("hidden_act", "silu"), ("attention_bias", False), ("mlp_bias", False)]:
        _require(config, key, allowed, path)
    fields = {"qwen3_moe": _qwen3_moe_fields, "deepseek_v3": _deepseek_v3_fields}[family]
    cfg = ModelConfig(
        d_model=config["hidden_size"],
        n_layers=config["num_hidden_layers"],
        n_heads=config["num_attention_heads"],
        ffn_hidden=config["intermediate_size"],
        max_seq_len=config.get("max_position_embeddings", 2048),
        tie_embeddings=config.get("tie_word_embeddings", False),
        norm_eps=config.get("rms_norm_eps", 1e-6),
        **_rope_fields(config, path),
        **fields(config, path),
    )
    model = Transformer(cfg, config["vocab_size"])
    state = _moe_state_from_hf(model, _read_safetensors(path), path)
    if family == "deepseek_v3" and config.get("rope_interleave", True):
        _reorder_mla_rope_rows(cfg, state, to_interleaved=False)
    return _load_weights(model, state, path)


def _moe_state_from_hf(
    model: Transformer, hf: dict[str, torch.Tensor], path: Path
) -> dict[str, torch.Tensor]:
    """transformers' MoE-family tensors under our `model.`-prefixed names: experts fused (from
    per-expert or already fused tensors), MoE modules renamed; balancing buffers transformers
    lacks keep our fresh values."""
    state = dict(hf)
    for ours, theirs in _MOE_RENAMES:
        for key in [k for k in state if theirs in k]:
            state[key.replace(theirs, ours)] = state.pop(key)
    fresh = model.state_dict()
    for i, layer in enumerate(model.layers):
        if not isinstance(layer.mlp, MoE):
            continue
        prefix = f"model.layers.{i}.mlp"
        state[f"{prefix}.gate_up_proj"], state[f"{prefix}.down_proj"] = _fused_experts(
            hf, f"{prefix}.experts", layer.mlp.n_experts, path
        )
        for buffer in ("selection_bias", "load", "bias_velocity"):
            state.setdefault(f"{prefix}.{buffer}", fresh[f"layers.{i}.mlp.{buffer}"])
    return state


def _fused_experts(
    hf: dict[str, torch.Tensor], prefix: str, n_experts: int, path: Path
) -> tuple[torch.Tensor, torch.Tensor]:
    """(gate_up (experts, 2 * hidden, d), down (experts, d, hidden)) of one MoE layer."""
    if f"{prefix}.gate_up_proj" in hf:
        return hf[f"{prefix}.gate_up_proj"], hf[f"{prefix}.down_proj"]

    def get(key: str) -> torch.Tensor:
        if key not in hf:
            raise ValueError(f"{path}: weight {key} is missing from the safetensors files")
        return hf[key]

    gate_up = [
        torch.cat([get(f"{prefix}.{e}.gate_proj.weight"), get(f"{prefix}.{e}.up_proj.weight")])
        for e in range(n_experts)
    ]
    down = [get(f"{prefix}.{e}.down_proj.weight") for e in range(n_experts)]
    return torch.stack(gate_up), torch.stack(down)
