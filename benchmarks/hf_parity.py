"""Benchmark: logit parity with transformers for every exported family, at the size of its
recipe (`recipes/dense-*.toml`, `recipes/moe-*.toml`), float32 on CPU.

For each family recipe: random weights (norm gains and MoE selection biases perturbed, so a
misplaced one shows) -> `export_hf` -> `transformers.AutoModelForCausalLM.from_pretrained` ->
logits compared (export); then transformers' own `save_pretrained` of that model -> `load_hf`
-> logits compared (import). The reference is transformers itself, in the same run.

    python benchmarks/hf_parity.py [--out benchmarks/out/hf_parity.json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from datetime import UTC, datetime
from pathlib import Path

import torch
import transformers

from frontierlm.config import load_config
from frontierlm.model import Transformer
from frontierlm.model.hf import export_hf, load_hf

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ["dense-llama", "dense-qwen3", "dense-gemma2", "moe-qwen3", "moe-deepseek-v3"]


def max_rel_error(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return ((ours - theirs).abs().max() / theirs.abs().max()).item()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="benchmarks/out/hf_parity.json")
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = {}
    for recipe in RECIPES:
        cfg = load_config(ROOT / "recipes" / f"{recipe}.toml")
        model = Transformer(cfg.model, cfg.tokenizer.vocab_size).eval()
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() == 1:
                    p.uniform_(0.5, 1.5)
            for moe in model.moe_layers():
                moe.selection_bias.uniform_(-0.05, 0.05)
        ids = torch.randint(0, cfg.tokenizer.vocab_size, (2, cfg.pretrain.seq_len))
        with tempfile.TemporaryDirectory() as tmp:
            export_hf(model, Path(tmp) / "ours")
            hf = transformers.AutoModelForCausalLM.from_pretrained(Path(tmp) / "ours").eval()
            hf.save_pretrained(Path(tmp) / "theirs")
            imported = load_hf(Path(tmp) / "theirs")
            with torch.no_grad():
                ours, theirs = model(ids), hf(input_ids=ids).logits
                back = imported(ids)
        rows[recipe] = {
            "transformers_class": type(hf).__name__,
            "params": model.num_params(),
            "export_max_rel_error": max_rel_error(ours, theirs),
            "import_max_rel_error": max_rel_error(back, theirs),
        }
    print(
        f"\n{'recipe':<17}{'transformers class':<24}{'params':>11}"
        f"{'export err':>12}{'import err':>12}"
    )
    for recipe, r in rows.items():
        print(
            f"{recipe:<17}{r['transformers_class']:<24}{r['params']:>11,}"
            f"{r['export_max_rel_error']:>12.2e}{r['import_max_rel_error']:>12.2e}"
        )
    out = ROOT / args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "rows": rows,
    }
    out.write_text(json.dumps(payload, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
