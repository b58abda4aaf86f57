"""Benchmark: FrontierLM's pretraining loop against plain compiled PyTorch on one GPU.

Each FrontierLM case runs the real loop (`frontierlm.train.loop.train`: regional compile, fused
AdamW, bf16 autocast or fp8, background batch prefetch, the spike guard) on real tokens and
reads its own per-step metrics. The baseline, in the same run, is a minimal GPT (nanoGPT's:
LayerNorm, GELU MLP, learned positions, tied head, loss inside the forward) compiled whole by
`torch.compile`, trained by a bare loop with fused AdamW and bf16 autocast, on the same batch
shape. Both count FLOPs alike (6 per matmul weight per token plus causal attention, see
Transformer.flops_per_token) against the GPU's dense bf16 peak, so MFU and tokens/s compare.

    python benchmarks/pretrain_throughput.py --tokens runs/<run>/tokenize \\
        [--cases dense-1.3b:bf16,dense-1.3b:fp8,baseline:dense-1.3b] [--steps 30]

Cases: `<model>:<precision>[:<activation checkpointing>[:<compile>]]` for FrontierLM,
`baseline:<model>` for plain PyTorch; models: dense-350m, dense-1.3b (both seq 2048, vocab
50304) and moe-1.3b-a350m (16 experts top-2, the active size of dense-350m). Without `--tokens`,
random tokens (speed only; the loss comparison needs real text).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from _runs import write_gpu_report
from torch import nn

from frontierlm.config import ModelConfig, PretrainConfig, RunConfig
from frontierlm.eval.bpb import sequential_windows
from frontierlm.model import Transformer
from frontierlm.tokenizer.shards import TokenSplit
from frontierlm.train.loop import TrainTask, train
from frontierlm.train.metrics import peak_flops
from frontierlm.train.pretrain import ShuffledWindows, lm_loss

VOCAB, SEQ = 50304, 2048

MODELS = {
    # GPT-3 Medium and XL shapes (d_model, layers, heads of 128 dims), Llama-style blocks whose
    # SwiGLU hidden keeps the parameter count of a 4x GELU MLP.
    "dense-350m": {"d_model": 1024, "n_layers": 24, "n_heads": 8, "ffn_hidden": 2816},
    "dense-1.3b": {"d_model": 2048, "n_layers": 24, "n_heads": 16, "ffn_hidden": 5504},
    "moe-1.3b-a350m": {
        "d_model": 1024,
        "n_layers": 24,
        "n_heads": 8,
        "moe_experts": 16,
        "moe_top_k": 2,
        "moe_expert_hidden": 1408,
    },
}
# The plain GPT of the same width, depth and heads; an MoE compares with its active size.
BASELINE_OF = {
    "dense-350m": "dense-350m",
    "dense-1.3b": "dense-1.3b",
    "moe-1.3b-a350m": "dense-350m",
}


def model_config(name: str) -> ModelConfig:
    return ModelConfig(**MODELS[name], max_seq_len=SEQ, tie_embeddings=True)


# ----------------------------------------------------------------------------- the baseline


class PlainBlock(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d, bias=False), nn.Linear(d, d, bias=False)
        self.up, self.down = nn.Linear(d, 4 * d, bias=False), nn.Linear(4 * d, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads).unbind(2)
        y = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True
        )
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, d))
        return x + self.down(F.gelu(self.up(self.ln2(x)), approximate="tanh"))


class PlainGPT(nn.Module):
    def __init__(self, d: int, layers: int, heads: int) -> None:
        super().__init__()
        self.wte, self.wpe = nn.Embedding(VOCAB, d), nn.Embedding(SEQ, d)
        self.blocks = nn.ModuleList(PlainBlock(d, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, VOCAB, bias=False)
        self.head.weight = self.wte.weight
        for p in self.parameters():
            if p.dim() == 2:
                nn.init.normal_(p, 0.0, 0.02)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = block(x)
        logits = self.head(self.ln_f(x))
        return F.cross_entropy(logits.float().view(-1, VOCAB), targets.reshape(-1))

    def flops_per_token(self, seq: int) -> float:
        embeddings = ("wte", "wpe")  # lookups; the tied head is a matmul, added below
        matmul = sum(
            p.numel()
            for n, p in self.named_parameters()
            if p.dim() == 2 and not n.startswith(embeddings)
        )
        d = self.wte.weight.shape[1]
        return 6.0 * (matmul + VOCAB * d) + 3 * len(self.blocks) * seq * 2 * d


def run_baseline(model_name: str, windows, steps: int, warmup: int, accum: int, device) -> dict:
    cfg = MODELS[BASELINE_OF[model_name]]
    torch.manual_seed(0)
    model = PlainGPT(cfg["d_model"], cfg["n_layers"], cfg["n_heads"]).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.1, fused=True)
    compiled = torch.compile(model)
    times, losses, tokens = [], [], 0
    torch.cuda.reset_peak_memory_stats(device)
    for step in range(steps):
        torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        total = torch.zeros((), device=device)
        for micro in range(accum):
            batch = windows(step * accum + micro)
            x = batch["input_ids"].to(device, non_blocking=True)
            y = batch["targets"].to(device, non_blocking=True)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = compiled(x, y)
            (loss / accum).backward()
            total += loss.detach() / accum
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(total.item())
        times.append(time.perf_counter() - t0)
        tokens = x.numel() * accum
    step_s = statistics.median(times[warmup:])
    return {
        "params": sum(p.numel() for p in model.parameters()),
        "flops_per_token": model.flops_per_token(SEQ),
        "tokens_per_s": tokens / step_s,
        "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30,
        "final_loss": statistics.mean(losses[-10:]),
    }


# ----------------------------------------------------------------------------- FrontierLM


def run_frontierlm(
    model_name: str,
    precision: str,
    checkpointing: str,
    compile_setting: str,
    windows,
    val,
    steps,
    warmup,
    args,
    device,
) -> dict:
    torch.manual_seed(0)
    model = Transformer(model_config(model_name), VOCAB)
    loop = PretrainConfig(
        steps=steps,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        seq_len=SEQ,
        lr=args.lr,
        warmup_steps=min(20, steps // 4),
        precision=precision,
        activation_checkpointing=checkpointing,
        compile=compile_setting,
        eval_every=steps,
        checkpoint_every=0,
    )

    def evaluate(module: nn.Module) -> dict[str, float]:
        losses = [lm_loss(module, {k: v.to(device) for k, v in b.items()})[0].item() for b in val]
        return {"loss": statistics.mean(losses)}

    task = TrainTask("pretrain", windows, lm_loss, evaluate)
    with tempfile.TemporaryDirectory() as work:
        train(model, loop, task, Path(work), device, RunConfig(), export=False)
        records = [json.loads(x) for x in (Path(work) / "metrics.jsonl").read_text().splitlines()]
    timed = records[warmup:]
    return {
        "params": model.num_params(),
        "active_params": model.active_params(),
        "flops_per_token": model.flops_per_token(SEQ),
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in timed),
        "peak_memory_gib": max(r.get("peak_memory_gib", math.nan) for r in timed),
        "final_loss": statistics.mean(r["loss"] for r in records[-10:]),
        "val_loss": records[-1]["val_loss"],
        "loss_curve": [round(r["loss"], 4) for r in records],
    }


def gpu_state() -> str:
    """SM clock, temperature and power as nvidia-smi reports them (empty when it cannot)."""
    query = "--query-gpu=clocks.sm,temperature.gpu,power.draw"
    try:
        out = subprocess.run(
            ["nvidia-smi", query, "--format=csv,noheader", f"--id={torch.cuda.current_device()}"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return out.stdout.strip()


def token_source(args) -> tuple[np.ndarray, np.ndarray]:
    if args.tokens:
        directory = Path(args.tokens)
        return TokenSplit.open(directory, "train").tokens, TokenSplit.open(directory, "val").tokens
    rng = np.random.default_rng(0)
    return rng.integers(0, VOCAB, 4_000_000, dtype=np.int64), rng.integers(0, VOCAB, 100_000)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument(
        "--cases",
        default="baseline:dense-1.3b,dense-1.3b:bf16,dense-1.3b:fp8,"
        "baseline:dense-350m,dense-350m:bf16,dense-350m:fp8,moe-1.3b-a350m:bf16",
    )
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument(
        "--baseline-steps", type=int, default=40, help="the baseline measures speed only"
    )
    parser.add_argument("--warmup", type=int, default=8, help="steps left out of the timing")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per micro-step")
    parser.add_argument("--grad-accum", type=int, default=2, help="micro-steps per step")
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--tokens", default=None, help="a tokenize stage's output directory")
    parser.add_argument("--out", default="benchmarks/out/pretrain_throughput.json")
    args = parser.parse_args()
    device = torch.device("cuda")
    peak = peak_flops(device)
    train_tokens, val_tokens = token_source(args)
    windows = ShuffledWindows(train_tokens, SEQ, args.batch_size, seed=0)
    val = list(sequential_windows(val_tokens, SEQ, args.batch_size, 2))
    rows = {}
    for case in args.cases.split(","):
        parts = case.split(":")
        t0 = time.perf_counter()
        if parts[0] == "baseline":
            row = run_baseline(
                parts[1], windows, args.baseline_steps, args.warmup, args.grad_accum, device
            )
        else:
            ac = parts[2] if len(parts) > 2 else "none"
            compile_setting = parts[3] if len(parts) > 3 else "auto"
            row = run_frontierlm(
                parts[0],
                parts[1],
                ac,
                compile_setting,
                windows,
                val,
                args.steps,
                args.warmup,
                args,
                device,
            )
        row["wall_s"] = time.perf_counter() - t0
        row["mfu"] = row["tokens_per_s"] * row["flops_per_token"] / peak if peak else math.nan
        row["gpu_after"] = gpu_state()
        # A case may run again later in the list: a hot GPU clocks lower, so the order of the
        # cases can bias a comparison; a repeat shows by how much.
        repeat = sum(key.split(" #")[0] == case for key in rows)
        key = f"{case} #{repeat + 1}" if repeat else case
        rows[key] = row
        print(
            f"{key}: {row['tokens_per_s']:,.0f} tok/s, MFU {row['mfu']:.1%}, GPU after: "
            f"{row['gpu_after']}",
            flush=True,
        )
        torch._dynamo.reset()  # free the compiled graphs and their memory before the next case
        gc.collect()
        torch.cuda.empty_cache()
    for case, row in rows.items():
        model = case.split(" #")[0]
        model = model.split(":")[1] if case.startswith("baseline") else model.split(":")[0]
        base = rows.get(f"baseline:{BASELINE_OF[model]}")
        row["vs_baseline"] = row["tokens_per_s"] / base["tokens_per_s"] if base else None
    print(f"\n{'case':<28}{'params':>8}{'tok/s':>10}{'MFU':>7}{'x base':>8}{'GiB':>6}{'loss':>8}")
    for case, r in rows.items():
        ratio = f"{r['vs_baseline']:.3f}" if r["vs_baseline"] else "-"
        print(
            f"{case:<28}{r['params'] / 1e9:>7.2f}B{r['tokens_per_s']:>10,.0f}{r['mfu']:>7.1%}"
            f"{ratio:>8}{r['peak_memory_gib']:>6.1f}{r['final_loss']:>8.4f}"
        )
    write_gpu_report(args.out, rows, peak_tflops=peak / 1e12 if peak else None, args=vars(args))


if __name__ == "__main__":
    main()
