"""Benchmark: peak memory and time of the token loss, forward + backward, from final hidden
states and the output head: the plain loss (bf16 logits, float32 cross-entropy) against the
chunked loss (train/losses.py `chunked_cross_entropy`, never holding the [tokens, vocab]
logits). Baseline in the same run: the plain loss. Claim: >= 4x less peak memory at vocab
131,072 and 16,384 tokens (d_model 2048, bf16).

    python benchmarks/chunked_ce.py            # GPU, the claim's size (~1 minute on an H100)
    python benchmarks/chunked_ce.py --tiny     # CPU, small shapes: checks it runs and agrees

Peak memory is measured above what the inputs (hidden states, head weight, targets) already
hold, with torch.cuda.max_memory_allocated; on CPU it is not measured. Writes JSON to
$OUT/chunked_ce.json when OUT is set, else benchmarks/out/chunked_ce.json.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from datetime import UTC, datetime
from pathlib import Path

import torch
import torch.nn.functional as F

from frontierlm.train.losses import chunked_cross_entropy


def plain_loss(hidden, weight, targets, softcap):
    logits = F.linear(hidden, weight)
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    return F.cross_entropy(logits.float(), targets, reduction="none")


def chunked_loss(hidden, weight, targets, softcap):
    return chunked_cross_entropy(hidden, weight, targets, softcap)


def measure(fn, hidden, weight, targets, softcap, device, repeats):
    """(peak bytes above the inputs, median seconds, loss, hidden grad, weight grad)."""
    times, peak = [], 0
    for _ in range(repeats):
        hidden.grad = weight.grad = None
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = fn(hidden, weight, targets, softcap).mean()
        loss.backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() - base
        times.append(time.perf_counter() - t0)
    times.sort()
    return peak, times[len(times) // 2], loss.item(), hidden.grad.clone(), weight.grad.clone()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tiny", action="store_true", help="small shapes, runs on CPU")
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--vocab", type=int, default=131072)
    parser.add_argument("--d-model", type=int, default=2048)
    parser.add_argument("--softcap", type=float, default=None, help="Gemma-style final cap")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if args.tiny:
        args.tokens, args.vocab, args.d_model = 512, 4096, 128
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    torch.manual_seed(0)
    hidden = torch.randn(args.tokens, args.d_model, device=device, dtype=torch.bfloat16)
    hidden.requires_grad_()
    weight = torch.randn(args.vocab, args.d_model, device=device, dtype=torch.bfloat16) * 0.02
    weight.requires_grad_()
    targets = torch.randint(0, args.vocab, (args.tokens,), device=device)

    results = {}
    for name, fn in (("plain", plain_loss), ("chunked", chunked_loss)):
        results[name] = measure(fn, hidden, weight, targets, args.softcap, device, args.repeats)
    (p_peak, p_time, p_loss, p_gh, p_gw), (c_peak, c_time, c_loss, c_gh, c_gw) = (
        results["plain"],
        results["chunked"],
    )
    rows = [
        {"loss": "plain", "peak_gib": p_peak / 2**30, "seconds": p_time, "value": p_loss},
        {"loss": "chunked", "peak_gib": c_peak / 2**30, "seconds": c_time, "value": c_loss},
    ]
    memory_ratio = p_peak / c_peak if c_peak else None
    agreement = {
        "loss_abs_diff": abs(p_loss - c_loss),
        "hidden_grad_max_abs_diff": (p_gh.float() - c_gh.float()).abs().max().item(),
        "weight_grad_max_abs_diff": (p_gw.float() - c_gw.float()).abs().max().item(),
    }
    shape = f"{args.tokens} tokens x vocab {args.vocab}, d_model {args.d_model}, bf16"
    print(f"token loss, forward + backward: {shape}, on {device.type}")
    print(f"{'loss':<8} {'peak above inputs (GiB)':>24} {'time (ms)':>10}")
    for row in rows:
        peak = f"{row['peak_gib']:.3f}" if device.type == "cuda" else "n/a (CPU)"
        print(f"{row['loss']:<8} {peak:>24} {1000 * row['seconds']:>10.1f}")
    if memory_ratio:
        print(f"peak memory ratio plain / chunked: {memory_ratio:.2f}x (claim: >= 4x)")
    print(f"time ratio chunked / plain: {c_time / p_time:.2f}x")
    print("agreement:", {k: f"{v:.2e}" for k, v in agreement.items()})

    out = Path(os.environ.get("OUT", "benchmarks/out")) / "chunked_ce.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "shape": vars(args),
        "rows": rows,
        "peak_memory_ratio": memory_ratio,
        "time_ratio": c_time / p_time,
        "agreement": agreement,
    }
    out.write_text(json.dumps(payload, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
