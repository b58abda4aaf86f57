"""Hugging Face format in and out: safetensors + config.json (+ tokenizer files).

Our parameter names are transformers' Llama/Qwen3 names without the `model.` prefix, so export
and import are renames plus a config translation. The family follows from the config: QK-norm
makes a Qwen3, otherwise a Llama. Gemma 2, DeepSeek-V3 and Qwen3-MoE (issue 3) raise
NotImplementedError.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from frontierlm.atomic import atomic_dir, commit_dir
from frontierlm.config import ModelConfig
from frontierlm.model.transformer import Transformer

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def _hf_name(name: str) -> str:
    return name if name.startswith("lm_head.") else f"model.{name}"


FAMILIES = {"llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM"}


def hf_config(model: Transformer) -> dict[str, Any]:
    """The transformers config of the family that expresses `model.cfg`."""
    cfg = model.cfg
    if cfg.moe_experts:
        raise NotImplementedError(
            f"model.moe_experts={cfg.moe_experts}: MoE exports (Qwen3-MoE, DeepSeek-V3) arrive "
            "with issue 3"
        )
    # Switches only other families express; each is named in the error.
    defaults = ModelConfig()
    switches = (
        "attn_gate",
        "attn_softcap",
        "final_softcap",
        "sliding_window",
        "norm",
        "rope_pattern",
    )
    for switch in switches:
        value = getattr(cfg, switch)
        if value != getattr(defaults, switch):
            raise NotImplementedError(
                f"model.{switch}={value!r} has no Llama or Qwen3 equivalent; the families that "
                "express it (Gemma 2, SmolLM3, Llama 4, Qwen3-Next) export once issue 3 adds them"
            )
    family = "qwen3" if cfg.qk_norm else "llama"
    extra: dict[str, Any] = {}
    if family == "qwen3":
        extra = {"use_sliding_window": False, "layer_types": ["full_attention"] * cfg.n_layers}
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
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
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
    tmp = atomic_dir(out)
    state = {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and model.cfg.tie_embeddings:
            continue  # tied: transformers rebuilds it from the embedding
        state[_hf_name(name)] = tensor.detach().to("cpu", torch.float32).contiguous()
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


def load_hf(path: str | Path) -> Transformer:
    """A transformers Llama or Qwen3 checkpoint (config.json + safetensors) as our Transformer."""
    path = Path(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{path} has no config.json: not a Hugging Face model directory")
    config = json.loads(config_file.read_text())
    family = config.get("model_type")
    if family not in FAMILIES:
        raise NotImplementedError(
            f"{config_file}: model_type={family!r}; {sorted(FAMILIES)} import so far "
            "(Gemma 2, DeepSeek-V3 and Qwen3-MoE arrive with issue 3)"
        )
    if family == "qwen3":
        _require(config, "use_sliding_window", False, path)
    for key, allowed in [("hidden_act", "silu"), ("attention_bias", False), ("mlp_bias", False)]:
        _require(config, key, allowed, path)
    n_heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // n_heads
    if head_dim * n_heads != config["hidden_size"]:
        raise NotImplementedError(f"{config_file}: head_dim * num_attention_heads != hidden_size")
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
    )
    model = Transformer(cfg, config["vocab_size"])
    files = sorted(path.glob("model*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{path}: no model*.safetensors weights")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        state.update(load_file(str(file)))
    ours = {}
    for name in model.state_dict():
        key = _hf_name(name)
        if key not in state:
            if name == "lm_head.weight" and cfg.tie_embeddings:
                continue
            raise ValueError(f"{path}: weight {key} is missing from the safetensors files")
        ours[name] = state[key].to(torch.float32)
    model.load_state_dict(ours, strict=not cfg.tie_embeddings)
    return model.eval()
