"""Hugging Face format in and out: safetensors + config.json (+ tokenizer files).

Our parameter names are transformers' Llama/Qwen3 names without the `model.` prefix, so those
exports are renames plus a config translation. Gemma 2 differs in two places, converted both
ways: its RMSNorm multiplies by (1 + weight), so it stores our norm weights minus one, and it
names the norms of a sandwich block after their position (`GEMMA2_NORMS`).

The family follows from the config: sandwich norm makes a Gemma 2; otherwise QK-norm makes a
Qwen3, and the rest a Llama. A config its family cannot express raises NotImplementedError naming
the switch. MoE exports (DeepSeek-V3, Qwen3-MoE) arrive with issue 3.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from frontierlm.atomic import atomic_dir, commit_dir
from frontierlm.config import ModelConfig
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


def _hf_name(name: str, family: str) -> str:
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
    if cfg.moe_experts:
        raise NotImplementedError(
            f"model.moe_experts={cfg.moe_experts}: MoE exports (Qwen3-MoE, DeepSeek-V3) arrive "
            "with issue 3"
        )
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
            f"{path}/config.json: {key}={value!r} is not supported yet (only {allowed!r}); "
            "more switches arrive with issue 3"
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
    """A transformers Llama, Qwen3 or Gemma 2 checkpoint (config.json + safetensors) as our
    Transformer."""
    path = Path(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{path} has no config.json: not a Hugging Face model directory")
    config = json.loads(config_file.read_text())
    family = config.get("model_type")
    if family not in FAMILIES:
        raise NotImplementedError(
            f"{config_file}: model_type={family!r}; {sorted(FAMILIES)} import so far "
            "(DeepSeek-V3 and Qwen3-MoE arrive with issue 3)"
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
    # transformers 5 keeps RoPE settings in `rope_parameters`; 4.x in `rope_theta`/`rope_scaling`.
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "yarn"):
        raise NotImplementedError(f"{config_file}: rope_type={rope_type!r}; default and yarn only")
    for key in ("attention_factor", "mscale", "mscale_all_dim"):
        _require(rope, key, None, path)
    _require(rope, "truncate", True, path)
    rope_theta = config.get("rope_theta") or rope.get("rope_theta", 10000.0)
    yarn = rope_type == "yarn"
    cfg = ModelConfig(
        d_model=config["hidden_size"],
        n_layers=config["num_hidden_layers"],
        n_heads=n_heads,
        n_kv_heads=config.get("num_key_value_heads", n_heads),
        # Set only where it differs (every Gemma 2: 8 heads of 256 in a 2304-wide 2B).
        attn_head_dim=None if head_dim * n_heads == config["hidden_size"] else head_dim,
        ffn_hidden=config["intermediate_size"],
        rope_theta=rope_theta,
        yarn_factor=rope["factor"] if yarn else None,
        yarn_original_max_len=rope["original_max_position_embeddings"] if yarn else None,
        yarn_beta_fast=rope.get("beta_fast") or 32.0 if yarn else 32.0,
        yarn_beta_slow=rope.get("beta_slow") or 1.0 if yarn else 1.0,
        max_seq_len=config.get("max_position_embeddings", 2048),
        tie_embeddings=config.get("tie_word_embeddings", False),
        qk_norm=family == "qwen3",
        norm_eps=config.get("rms_norm_eps", 1e-6),
        **family_fields,
    )
    model = Transformer(cfg, config["vocab_size"])
    files = sorted(path.glob("model*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{path}: no model*.safetensors weights")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        state.update(load_file(str(file)))
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
