"""Why DiLoCo's islands trail data parallel at small batches, and one fix tried: a noise-corrected
second moment for the islands' AdamW.

M islands each step AdamW on a 1/M share of the global batch. Adam divides by the root of its
second moment v = E[g^2] = mu^2 + Var(g), and an island's gradient has M times the variance of
the global batch's, so its steps along the signal are smaller and the mean of M islands' steps is
not data parallel's step (RESULTS.md 2026-11-30: averaging after every step already costs +6%).
The corrected variant estimates Var(g) at every step from two half-batch gradients,
Var(g) ~ (g_a - g_b)^2 / 4, and feeds Adam mu^2 + Var(g) / M, what data parallel's v would hold:
v <- beta2 v + (1 - beta2) (g^2 - (1 - 1/M) (g_a - g_b)^2 / 4), floored at v_raw / M (data
parallel's second moment is never below that).

One process simulates the islands one after another (the same arithmetic as
`frontierlm diloco`'s outer step: mean pseudo-gradient, outer Nesterov SGD), against data
parallel on the global batch (one AdamW on the same stream), the quickstart model, the same
held-out windows. Prints a table, writes JSON to $OUT or benchmarks/out/.

    python benchmarks/diloco_local_adam.py --upstream runs/bench-diloco-shared   # ~15 min, CPU
    python benchmarks/diloco_local_adam.py --upstream ... --steps 20 --only dp,adamw   # smoke
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from frontierlm.config import load_config  # noqa: E402
from frontierlm.model import Transformer  # noqa: E402
from frontierlm.tokenizer.shards import TokenSplit  # noqa: E402
from frontierlm.tokenizer.train import BOS, load_tokenizer  # noqa: E402
from frontierlm.train.pretrain import ShuffledWindows, lm_loss  # noqa: E402


class IslandAdamW:
    """AdamW whose second moment is data parallel's estimate when `islands` > 1 (see the module
    docstring); with islands = 1 it is plain AdamW (decoupled weight decay, bias correction)."""

    def __init__(self, params, lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, islands=1):
        self.params = [p for p in params if p.requires_grad]
        self.lr, self.betas, self.eps, self.wd, self.islands = lr, betas, eps, weight_decay, islands
        self.m = [torch.zeros_like(p) for p in self.params]
        self.v = [torch.zeros_like(p) for p in self.params]
        self.v_raw = [torch.zeros_like(p) for p in self.params]
        self.t = 0

    @torch.no_grad()
    def step(self, grads, halves_gap=None) -> None:
        """`grads`: the step's gradients; `halves_gap`: g_a - g_b per parameter (or None)."""
        self.t += 1
        b1, b2 = self.betas
        for i, (p, g) in enumerate(zip(self.params, grads, strict=True)):
            self.m[i].mul_(b1).add_(g, alpha=1 - b1)
            square = g * g
            self.v_raw[i].mul_(b2).add_(square, alpha=1 - b2)
            if halves_gap is not None and self.islands > 1:
                noise = halves_gap[i].square() / 4
                square = square - (1 - 1 / self.islands) * noise
            self.v[i].mul_(b2).add_(square, alpha=1 - b2)
            v = torch.maximum(self.v[i], self.v_raw[i] / self.islands)
            m_hat = self.m[i] / (1 - b1**self.t)
            v_hat = v / (1 - b2**self.t)
            p.mul_(1 - self.lr * self.wd)
            p.addcdiv_(m_hat, v_hat.sqrt().add_(self.eps), value=-self.lr)


def schedule(step: int, steps: int, warmup: int, floor: float = 0.1) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def gradients(model, batch, halves: bool, clip: float):
    """The batch's gradient (and g_a - g_b of its two halves), clipped by the global norm."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not halves:
        loss = lm_loss(model, batch)[0]
        grads = torch.autograd.grad(loss, params)
        gap = None
    else:
        n = batch["input_ids"].shape[0] // 2
        parts = [{k: v[:n] for k, v in batch.items()}, {k: v[n:] for k, v in batch.items()}]
        pair = [torch.autograd.grad(lm_loss(model, part)[0], params) for part in parts]
        grads = [(a + b) / 2 for a, b in zip(*pair, strict=True)]
        gap = [a - b for a, b in zip(*pair, strict=True)]
    norm = torch.sqrt(sum(g.square().sum() for g in grads))
    scale = min(1.0, clip / (float(norm) + 1e-6))
    grads = [g * scale for g in grads]
    if gap is not None:
        gap = [g * scale for g in gap]
    return grads, gap


@torch.no_grad()
def val_loss(model, val) -> float:
    model.eval()
    losses = [lm_loss(model, batch)[0].item() for batch in val]
    model.train()
    return sum(losses) / len(losses)


def run(args, name: str, cfg, vocab, train, val, bos) -> dict:
    corrected = name.startswith("corrected")
    dp = name == "dp"
    m = 1 if dp else args.islands
    h = 1 if name.endswith("-h1") else args.inner_steps
    lr = args.dp_lr if dp else args.inner_lr
    torch.manual_seed(cfg.run.seed)
    global_model = Transformer(cfg.model, vocab)
    models = [Transformer(cfg.model, vocab) for _ in range(m)]
    for model in models:
        model.load_state_dict(global_model.state_dict())
    batch = args.batch // m
    windows = ShuffledWindows(train, args.seq_len, batch, cfg.run.seed, bos)
    optims = [IslandAdamW(mo.parameters(), lr, islands=m if corrected else 1) for mo in models]
    global_params = [p for p in global_model.parameters() if p.requires_grad]
    outer = torch.optim.SGD(
        global_params,
        lr=args.outer_lr,
        momentum=args.outer_momentum,
        nesterov=args.outer_momentum > 0,
    )
    warmup = max(1, args.steps // 10)
    t0 = time.perf_counter()
    for step in range(args.steps):
        for i, (model, opt) in enumerate(zip(models, optims, strict=True)):
            opt.lr = lr * schedule(step, args.steps, warmup)
            grads, gap = gradients(model, windows(step * m + i), corrected, 1.0)
            opt.step(grads, gap)
        if not dp and ((step + 1) % h == 0 or step + 1 == args.steps):
            with torch.no_grad():
                local = [[q for q in mo.parameters() if q.requires_grad] for mo in models]
                for p, copies in zip(global_params, zip(*local, strict=True), strict=True):
                    p.grad = p - torch.stack(copies).mean(dim=0)
                outer.step()
                outer.zero_grad(set_to_none=True)
                for model in models:
                    model.load_state_dict(global_model.state_dict())
    final = models[0] if dp else global_model
    return {
        "run": name,
        "islands": m,
        "inner_steps": h if not dp else None,
        "lr": lr,
        "val_loss": val_loss(final, val),
        "wall_s": round(time.perf_counter() - t0, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--upstream", required=True, help="a run with tokenizer/ and tokenize/")
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--islands", type=int, default=4)
    parser.add_argument("--inner-steps", type=int, default=50)
    parser.add_argument("--dp-lr", type=float, default=2.5e-3)
    parser.add_argument("--inner-lr", type=float, default=1.25e-3)
    parser.add_argument("--outer-lr", type=float, default=0.5)
    parser.add_argument("--outer-momentum", type=float, default=0.8)
    parser.add_argument("--only", default="dp,adamw,corrected,adamw-h1,corrected-h1")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = load_config(str(ROOT / "recipes/quickstart.toml"), [])
    upstream = Path(args.upstream)
    tok = load_tokenizer(upstream / "tokenizer")
    bos = tok.token_to_id(BOS) if cfg.pretrain.document_mask else None
    train = TokenSplit.open(upstream / "tokenize", "train").tokens
    val_windows = ShuffledWindows(
        TokenSplit.open(upstream / "tokenize", "val").tokens, args.seq_len, 16, 0, bos
    )
    val = [val_windows(i) for i in range(8)]
    rows = []
    for name in args.only.split(","):
        row = run(args, name, cfg, tok.get_vocab_size(), train, val, bos)
        rows.append(row)
        print(json.dumps(row), flush=True)
    base = next((r["val_loss"] for r in rows if r["run"] == "dp"), None)
    print("\n| run | islands | H | inner lr | val loss | vs data parallel | wall s |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        gap = f"{r['val_loss'] / base - 1:+.1%}" if base else "-"
        print(f"| {r['run']} | {r['islands']} | {r['inner_steps'] or '-'} | {r['lr']:g} "
              f"| {r['val_loss']:.4f} | {gap} | {r['wall_s']:.0f} |")  # fmt: skip
    out = Path(os.environ.get("OUT", ROOT / "benchmarks" / "out")) / "diloco_local_adam.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
