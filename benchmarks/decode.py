"""Benchmark: batched decode of the KV-cache engine against transformers' `generate`.

GPU (default): a ~1.2B dense model shaped like Llama 3.2 1B (d_model 2048, 16 layers, 32 heads,
8 KV heads, SwiGLU 8192, vocab 128256, tied), random weights, bf16; batch 64, prompts of 128
tokens, 512 new tokens each (greedy, no stop token: every sequence runs the full length).

  engine        frontierlm.inference.engine.generate with CUDA graphs (and, as a second row,
                with the decode step torch.compiled)
  baseline      transformers' `generate` on the exported model (frontierlm/model/hf.py) with
                cache_implementation="static", eager (disable_compile) and with transformers'
                own compilation of the static-cache decode step

Each is run twice, the second run timed (graph capture and compilation are paid by the first).
Reported: tokens/s (batch * new tokens / wall time, prefill included), the ratio to each
baseline, and the decode step's fraction of the HBM-bandwidth floor: bytes of weights read per
step (every weight once; the embedding table only as the tied output head) plus the KV cache
the sequences have filled, over the step time, against the GPU's HBM bandwidth (H100 3.35 TB/s,
H200 4.8 TB/s, by device name). Two step times: the whole run's (wall time / new tokens, with
prefill and host work) and the bare replay of the captured decode step at the final length.

  python benchmarks/decode.py                  # GPU, about 5 minutes on one H100/H200
  python benchmarks/decode.py --tiny           # CPU, a tiny model: a tokens/s table, ~1 minute

Acceptance (issue 8): engine >= 3x transformers' static-cache generate, and >= 50% of the
bandwidth floor. JSON goes to $OUT/decode.json when OUT is set, else benchmarks/out/decode.json.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from frontierlm.config import ModelConfig
from frontierlm.inference import engine as engine_module
from frontierlm.inference.engine import generate, generate_reference
from frontierlm.inference.sampling import SamplingParams
from frontierlm.model import Transformer
from frontierlm.model import attention as attention_module
from frontierlm.model.hf import export_hf
from frontierlm.model.rope import rope_tables

ROOT = Path(__file__).resolve().parents[1]
HBM_TB_S = {"H200": 4.8, "H100": 3.35, "A100": 2.0}  # by device-name substring

GPU_MODEL = {
    "d_model": 2048,
    "n_layers": 16,
    "n_heads": 32,
    "n_kv_heads": 8,
    "ffn_hidden": 8192,
    "max_seq_len": 2048,
    "rope_theta": 500000.0,
    "tie_embeddings": True,
}
TINY_MODEL = {"d_model": 128, "n_layers": 4, "n_heads": 4, "n_kv_heads": 2, "max_seq_len": 256}


def timed(fn: Callable[[], object], device: torch.device) -> tuple[float, object]:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, out


def weight_bytes(model: Transformer) -> int:
    """Bytes one decode step reads of the weights: each parameter once, the embedding table
    only when it is also the output head (otherwise a step gathers a few rows of it)."""
    unique = {p.data_ptr(): p for p in model.parameters()}.values()
    total = sum(p.numel() * p.element_size() for p in unique)
    if not model.cfg.tie_embeddings:
        total -= model.embed_tokens.weight.numel() * model.embed_tokens.weight.element_size()
    return total


def hf_generate(hf, ids: torch.Tensor, new: int, compiled: bool, static: bool = True):
    kwargs = {"cache_implementation": "static"} if static else {}
    if not compiled:
        kwargs["disable_compile"] = True
    out = hf.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=new,
        min_new_tokens=new,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=0,
        **kwargs,
    )
    return out[:, ids.shape[1] :]


def bandwidth_rows(model, args, ours_s: float, device: torch.device) -> dict[str, float]:
    """Fraction of the HBM floor: the whole run's mean step and one bare decode-step replay."""
    name = torch.cuda.get_device_name(device)
    bandwidth = next((tb for key, tb in HBM_TB_S.items() if key in name), None)
    per_token_kv = model.cfg.kv_cache_bytes_per_token(2)
    weights = weight_bytes(model)
    mean_len = args.prompt + args.new / 2
    run_bytes = weights + args.batch * mean_len * per_token_kv
    run_step = ours_s / args.new
    # The bare step, replayed at the final length (the span its graph attends over).
    engine = engine_module._ENGINES[model]
    final = args.prompt + args.new - 1
    engine.positions.fill_(final - 1)
    engine._decode(final)  # capture if missing
    torch.cuda.synchronize()
    reps = 50
    start = time.perf_counter()
    for _ in range(reps):
        engine._decode(final)
    torch.cuda.synchronize()
    step = (time.perf_counter() - start) / reps
    step_size = engine_module.GRAPH_SPAN_STEP
    span = min(-(-final // step_size) * step_size, engine.cache.length)
    step_bytes = weights + args.batch * final * per_token_kv
    row = {
        "gpu": name,
        "hbm_tb_s": bandwidth,
        "weight_gb": weights / 1e9,
        "kv_gb_per_step_mean": args.batch * mean_len * per_token_kv / 1e9,
        "run_step_ms": run_step * 1e3,
        "replay_step_ms": step * 1e3,
        "replay_span": span,
    }
    if bandwidth is not None:
        row["run_fraction_of_floor"] = run_bytes / run_step / (bandwidth * 1e12)
        row["replay_fraction_of_floor"] = step_bytes / step / (bandwidth * 1e12)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="CPU, a tiny model")
    parser.add_argument("--batch", type=int)
    parser.add_argument("--prompt", type=int)
    parser.add_argument("--new", type=int)
    parser.add_argument("--vocab", type=int)
    parser.add_argument("--layers", type=int)
    parser.add_argument("--no-hf-compile", action="store_true", help="skip the compiled baseline")
    parser.add_argument("--no-engine-compile", action="store_true", help="skip the compiled row")
    parser.add_argument(
        "--ablate",
        action="store_true",
        help="also time the compiled engine with SDPA decode attention and without packing",
    )
    args = parser.parse_args()
    args.ablations = []
    if args.ablate:
        args.ablations = [("sdpa attention", "sdpa", True), ("unpacked projections", "flex", False)]
    tiny = args.tiny or not torch.cuda.is_available()
    defaults = (8, 32, 32, 1024) if tiny else (64, 128, 512, 128256)
    args.batch = args.batch or defaults[0]
    args.prompt = args.prompt or defaults[1]
    args.new = args.new or defaults[2]
    args.vocab = args.vocab or defaults[3]
    fields = dict(TINY_MODEL if tiny else GPU_MODEL)
    if args.layers:
        fields["n_layers"] = args.layers
    device = torch.device("cpu" if tiny else "cuda")
    dtype = torch.float32 if tiny else torch.bfloat16
    cfg = ModelConfig(**fields)

    torch.manual_seed(0)
    with torch.device(device):
        model = Transformer(cfg, args.vocab).eval()
    model.to(dtype)
    cos, sin = rope_tables(cfg)  # rotary tables stay float32, as in training
    model.rope_cos, model.rope_sin = cos.to(device), sin.to(device)
    prompts = torch.randint(0, args.vocab, (args.batch, args.prompt), device=device)
    params = SamplingParams(max_new_tokens=args.new, temperature=0)
    tokens = args.batch * args.new
    print(
        f"model {model.num_params() / 1e9:.2f}B params, {cfg.n_layers} layers, vocab "
        f"{args.vocab}, {dtype}, batch {args.batch}, prompt {args.prompt}, new {args.new}, "
        f"{torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU'}"
    )

    rows: dict[str, dict] = {}
    outputs: dict[str, torch.Tensor] = {}

    def record(
        name: str, fn: Callable[[], torch.Tensor], runs: int = 2, count: int = tokens
    ) -> None:
        for _ in range(runs - 1):
            fn()
        seconds, out = timed(fn, device)
        rows[name] = {"seconds": seconds, "tokens_per_s": count / seconds}
        outputs[name] = out.cpu()
        print(f"  {name:<36} {seconds:8.2f} s   {count / seconds:10.0f} tokens/s")

    def ours(compile: bool, pack: bool = True) -> torch.Tensor:
        done = generate(
            model,
            prompts.tolist(),
            params,
            max_batch=args.batch,
            compile=compile,
            pack_projections=pack,
        )
        return torch.tensor([c.ids for c in done])

    record("frontierlm engine" + ("" if tiny else " (cuda graphs)"), lambda: ours(False))
    ours_s = next(iter(rows.values()))["seconds"]
    bandwidth = None
    if not tiny:
        bandwidth = bandwidth_rows(model, args, ours_s, device)
        if not args.no_engine_compile:
            engine_module._ENGINES.pop(model, None)
            try:
                record("frontierlm engine (graphs+compile)", lambda: ours(True))
                bandwidth["compiled"] = bandwidth_rows(
                    model, args, rows["frontierlm engine (graphs+compile)"]["seconds"], device
                )
            except Exception as error:  # reported, never hidden: the row says why it is absent
                rows["frontierlm engine (graphs+compile)"] = {"error": repr(error)[:500]}
                print(f"  compiled engine failed: {error!r}"[:300])
        for name, kernel, pack in args.ablations:
            # What each part of the compiled step buys: the same row without it.
            engine_module._ENGINES.pop(model, None)
            attention_module.DECODE_KERNEL = kernel
            row = f"frontierlm engine (graphs+compile, {name})"
            try:
                record(row, lambda pack=pack: ours(True, pack))
                bandwidth[row] = bandwidth_rows(model, args, rows[row]["seconds"], device)
            except Exception as error:
                rows[row] = {"error": repr(error)[:500]}
                print(f"  {row} failed: {error!r}"[:300])
            attention_module.DECODE_KERNEL = "flex"
            engine_module._ENGINES.pop(model, None)
    else:

        def reference() -> torch.Tensor:  # two prompts: it is slow
            done = generate_reference(model, prompts[:2].tolist(), params)
            return torch.tensor([c.ids for c in done])

        record("full-recompute reference (2 prompts)", reference, 1, 2 * args.new)

    import transformers  # the baseline, imported only here (never at run time of the package)

    with tempfile.TemporaryDirectory() as tmp:
        export_hf(model, Path(tmp) / "hf")
        hf = transformers.AutoModelForCausalLM.from_pretrained(Path(tmp) / "hf", dtype=dtype)
    hf = hf.to(device).eval()
    with torch.no_grad():
        record("transformers static cache", lambda: hf_generate(hf, prompts, args.new, False))
        if tiny:
            record(
                "transformers dynamic cache",
                lambda: hf_generate(hf, prompts, args.new, False, static=False),
            )
        if not tiny and not args.no_hf_compile:
            try:
                record(
                    "transformers static cache, compiled",
                    lambda: hf_generate(hf, prompts, args.new, True),
                )
            except Exception as error:
                rows["transformers static cache, compiled"] = {"error": repr(error)[:500]}
                print(f"  compiled transformers failed: {error!r}"[:300])

    timed_rows = [k for k in rows if "tokens_per_s" in rows[k]]
    engine_rows = [k for k in timed_rows if k.startswith("frontierlm engine")]
    best = max(engine_rows, key=lambda k: rows[k]["tokens_per_s"])
    ratios = {
        f"{best} / {k}": rows[best]["tokens_per_s"] / rows[k]["tokens_per_s"]
        for k in timed_rows
        if k.startswith("transformers")
    }
    for key, ratio in ratios.items():
        print(f"  ratio {key}: {ratio:.2f}x")
    hf_tokens = outputs["transformers static cache"]
    agree = (outputs[engine_rows[0]] == hf_tokens).int().cumprod(1).sum(1).float().mean().item()
    print(f"  leading tokens equal to transformers' greedy tokens: {agree:.1f} of {args.new}")
    if bandwidth is not None:
        for key, value in bandwidth.items():
            print(f"  {key}: {value}")
    report = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "model": fields | {"vocab": args.vocab, "params": model.num_params()},
        "batch": args.batch,
        "prompt": args.prompt,
        "new": args.new,
        "rows": rows,
        "ratios": ratios,
        "leading_tokens_equal_to_transformers": agree,
        "bandwidth": bandwidth,
    }
    out_dir = Path(os.environ["OUT"]) if os.environ.get("OUT") else ROOT / "benchmarks" / "out"
    out_dir.mkdir(parents=True, exist_ok=True)
    import json

    (out_dir / ("decode_tiny.json" if tiny else "decode.json")).write_text(
        json.dumps(report, indent=2)
    )
    print(f"wrote {out_dir}")


if __name__ == "__main__":
    main()
