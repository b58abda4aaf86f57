"""Benchmark: FrontierLM's attention masks and MoE layer on one GPU, each against its baseline.

Attention (seq 4096 by default, bf16, forward + backward), baseline plain causal SDPA:
  - FlexAttention with a document mask built from a packed batch's document index (what
    pretraining with `document_mask = true` runs), timed with and without building the mask;
  - FlexAttention with a plain causal mask (the kernel against SDPA on equal work), a sliding
    window, and Gemma 2's softcapped scores.
MoE (forward + backward, bf16 autocast), baseline a dense SwiGLU layer of the same active FLOPs
(hidden = top_k * expert_hidden + shared width), both eager and torch.compile'd.
Model: a training step (forward, backward, AdamW) of a dense and an MoE FrontierLM model,
compiled, with tokens/s and MFU against the GPU's bf16 peak.

    python benchmarks/attention_moe.py [--out benchmarks/out/attention_moe.json] [--smoke]

`--smoke` runs tiny shapes on the CPU, to check the script, not to measure.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import torch
import torch.nn.functional as F

from frontierlm.config import ModelConfig
from frontierlm.model import Transformer
from frontierlm.model.attention import _flex_attention, attention_mask
from frontierlm.model.mlp import SwiGLU
from frontierlm.model.moe import MoE

H100_BF16_PEAK = 989e12  # dense bf16 tensor-core peak of an H100 SXM, the MFU denominator


def bench(fn: Callable[[], object], device: torch.device, warmup: int = 3, reps: int = 10) -> float:
    """Median seconds per call, timed with device events on GPU."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def packed_doc_ids(batch: int, seq: int, mean_len: int, device: torch.device) -> torch.Tensor:
    """Document index of a packed batch: lengths drawn from an exponential distribution (web
    documents are mostly short with a long tail), as the pretraining loader packs them."""
    gen = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(batch):
        lengths = []
        while sum(lengths) < seq:
            lengths.append(max(1, int(torch.empty(1).exponential_(1 / mean_len, generator=gen))))
        ids = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))[:seq]
        rows.append(ids)
    return torch.stack(rows).to(device)


def attention_rows(args: argparse.Namespace, device: torch.device) -> list[dict]:
    b, h, t, d = args.batch, args.heads, args.seq, args.head_dim
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    # FlexAttention has no CPU backward: the smoke run times forwards only.
    backward = device.type == "cuda"
    q, k, v = (
        torch.randn(b, h, t, d, device=device, dtype=dtype, requires_grad=backward) for _ in "qkv"
    )
    grad = torch.randn(b, h, t, d, device=device, dtype=dtype)
    flex = _flex_attention(device.type == "cuda")
    doc_ids = packed_doc_ids(b, t, args.mean_doc_len, device)

    def step(attend: Callable[[], torch.Tensor]) -> Callable[[], None]:
        def run() -> None:
            out = attend()
            if backward:
                out.backward(grad)

        return run

    def flex_with(mask_fn: Callable[[], object], score_mod=None) -> Callable[[], torch.Tensor]:
        return lambda: flex(q, k, v, block_mask=mask_fn(), score_mod=score_mod)

    causal_mask = attention_mask(t, None, None, True, device)
    doc_mask = attention_mask(t, doc_ids, None, True, device)
    window_mask = attention_mask(t, None, args.window, True, device)
    cap = 50.0

    def softcap(s, b_, h_, qi, ki):
        return cap * torch.tanh(s / cap)

    cases: dict[str, Callable[[], torch.Tensor]] = {
        "sdpa causal (baseline)": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True),
        "flex causal": flex_with(lambda: causal_mask),
        "flex document mask": flex_with(lambda: doc_mask),
        "flex document mask + building it": flex_with(
            lambda: attention_mask(t, doc_ids, None, True, device)
        ),
        f"flex sliding window {args.window}": flex_with(lambda: window_mask),
        "flex causal + softcap 50": flex_with(lambda: causal_mask, softcap),
    }
    # Causal fwd+bwd FLOPs: 4 * b*h*t*t*d forward halved by the mask, x3.5 with the backward
    # (FlashAttention's convention, which the 327 TFLOP/s SDPA reading also uses).
    flops = 3.5 * 2 * b * h * t * t * d
    base = None
    rows = []
    for name, attend in cases.items():
        seconds = bench(step(attend), device)
        base = base or seconds
        rows.append(
            {
                "section": "attention",
                "case": name,
                "ms": seconds * 1e3,
                "tflops_causal_equiv": flops / seconds / 1e12,
                "speed_vs_baseline": base / seconds,
            }
        )
    docs = int(doc_ids[:, -1].float().mean().item()) + 1
    rows.append({"section": "attention", "case": f"documents per row: {docs}", "ms": None})
    return rows


def moe_rows(args: argparse.Namespace, device: torch.device) -> list[dict]:
    rows = []
    for experts, top_k, hidden, shared in args.moe_shapes:
        cfg = ModelConfig(
            d_model=args.d_model,
            n_heads=args.d_model // 128 if args.d_model >= 128 else 1,
            moe_experts=experts,
            moe_top_k=top_k,
            moe_expert_hidden=hidden,
            moe_shared_experts=shared,
            moe_score="sigmoid",
            moe_balance="bias",
        )
        moe = MoE(cfg).to(device)
        for p in (moe.gate_up_proj, moe.down_proj):
            torch.nn.init.normal_(p, 0.0, 0.02)
        dense = SwiGLU(args.d_model, (top_k + shared) * hidden).to(device)
        tokens = args.moe_tokens
        x = torch.randn(1, tokens, args.d_model, device=device, requires_grad=True)
        grad = torch.randn(1, tokens, args.d_model, device=device)
        label = f"E={experts} top{top_k} h={hidden} shared={shared}"
        # fp32 master weights under bf16 autocast (single-GPU training: every call casts all
        # weights, the routed experts' included) and bf16 weights (what FSDP2's param_dtype
        # gives each forward: the cast happens once per step, outside the layer).
        variants = [(False, "fp32"), (True, "fp32"), (True, "bf16")]
        for compiled, weights in variants if device.type == "cuda" else [(False, "fp32")]:
            timings = {}
            dtype = torch.bfloat16 if weights == "bf16" else torch.float32
            for name, layer in (("dense", dense), ("moe", moe)):
                layer = copy.deepcopy(layer).to(dtype)
                module = torch.compile(layer) if compiled else layer
                inputs = x.detach().to(dtype).requires_grad_()

                def run(module=module, inputs=inputs, grad=grad) -> None:
                    with torch.autocast(device.type, dtype=torch.bfloat16):
                        out = module(inputs)
                    out.backward(grad.to(out.dtype))

                timings[name] = bench(run, device)
                if args.profile and compiled and name == "moe":
                    profile(run, f"{label} {weights} weights")
            flops = 6 * tokens * 3 * args.d_model * (top_k + shared) * hidden
            mode = "compiled" if compiled else "eager"
            rows.append(
                {
                    "section": "moe",
                    "case": f"{label} {mode}, {weights} weights",
                    "dense_ms": timings["dense"] * 1e3,
                    "moe_ms": timings["moe"] * 1e3,
                    "dense_tflops": flops / timings["dense"] / 1e12,
                    "moe_tflops": flops / timings["moe"] / 1e12,
                    "moe_over_dense_time": timings["moe"] / timings["dense"],
                }
            )
    return rows


def profile(run: Callable[[], None], label: str) -> None:
    """Where an MoE layer's time goes: the GPU kernels that take the most of it."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            run()
        torch.cuda.synchronize()
    print(f"profile of {label} (5 calls):")
    print(
        prof.key_averages().table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=70)
    )


def model_rows(args: argparse.Namespace, device: torch.device) -> list[dict]:
    rows = []
    base = {"d_model": args.model_d, "n_layers": args.model_layers, "n_heads": args.model_d // 128}
    shapes = {
        "dense": {},
        "moe (E=64 top8 shared=1, first dense 1)": {
            "moe_experts": 64,
            "moe_top_k": 8,
            "moe_expert_hidden": args.model_d // 2,
            "moe_shared_experts": 1,
            "moe_first_dense": 1,
            "moe_score": "sigmoid",
            "moe_balance": "bias",
        },
    }
    for name, extra in shapes.items():
        cfg = ModelConfig(**base, **extra, max_seq_len=args.model_seq, tie_embeddings=False)
        model = Transformer(cfg, args.vocab).to(device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
        compiled = torch.compile(model) if device.type == "cuda" else model
        ids = torch.randint(0, args.vocab, (args.model_batch, args.model_seq + 1), device=device)

        def step(compiled=compiled, optimizer=optimizer, model=model, ids=ids) -> None:
            with torch.autocast(device.type, dtype=torch.bfloat16):
                logits = compiled(ids[:, :-1])
            loss = F.cross_entropy(logits.flatten(0, 1).float(), ids[:, 1:].flatten())
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            model.after_optimizer_step()

        seconds = bench(step, device, warmup=3, reps=8)
        tokens = args.model_batch * args.model_seq
        mfu = model.flops_per_token(args.model_seq) * tokens / seconds / H100_BF16_PEAK
        rows.append(
            {
                "section": "model",
                "case": name,
                "params_m": model.num_params() / 1e6,
                "active_params_m": model.active_params() / 1e6,
                "tokens_per_s": tokens / seconds,
                "mfu": mfu,
                "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30
                if device.type == "cuda"
                else None,
            }
        )
        del model, optimizer, compiled
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
    return rows


def print_table(rows: list[dict]) -> None:
    for row in rows:
        cells = [f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()]
        print(" | ".join(cells))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="benchmarks/out/attention_moe.json")
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--sections", default="attention,moe,model")
    parser.add_argument("--profile", action="store_true", help="kernel breakdown of the MoE")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    if args.smoke:
        args.batch, args.heads, args.seq, args.head_dim = 1, 2, 256, 16
        args.mean_doc_len, args.window = 64, 64
        args.d_model, args.moe_tokens, args.moe_shapes = 64, 512, [(8, 2, 32, 1)]
        args.model_d, args.model_layers, args.model_seq, args.model_batch = 128, 2, 128, 2
        args.vocab = 512
    else:
        args.batch, args.heads, args.seq, args.head_dim = 4, 16, 4096, 128
        args.mean_doc_len, args.window = 1024, 1024
        # Fine-grained DeepSeek-style and coarse Mixtral-style experts, 16k tokens a step.
        args.d_model, args.moe_tokens = 2048, 16384
        args.moe_shapes = [(64, 8, 768, 1), (8, 2, 2816, 0)]
        args.model_d, args.model_layers, args.model_seq, args.model_batch = 1024, 12, 2048, 8
        args.vocab = 32768
    rows: list[dict] = []
    sections = args.sections.split(",")
    for section, fn in (("attention", attention_rows), ("moe", moe_rows), ("model", model_rows)):
        if section in sections:
            new = fn(args, device)
            print_table(new)
            rows += new
    result = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor(),
        "torch": torch.__version__,
        "rows": rows,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
