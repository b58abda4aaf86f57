"""Token utility: which data sources and documents a pretraining run still learns from.

`frontierlm data utility RUN` scores the run's training tokens with two models of its pretrain
stage, `--from` (default: the oldest checkpoint kept; `init` is the model before any step,
rebuilt from the run's seed exactly as the stage built it) and `--to` (default: the final
model), and aggregates the per-token losses by token source and by document:

  mean loss (from, to)      nats per predicted token
  reduction                 from - to: how much the stretch of training between the two
                            taught, per token; a source still being learned keeps a high
                            reduction, a learned (or unlearnable, noise-like) one drops to ~0
  tokens                    predicted tokens scored

Sources and documents are ranked by reduction (the signal that they still teach). Each source's
mean is a token-weighted part of the whole: sum(tokens_s * loss_s) / sum(tokens_s) is the mean
over every scored token, printed beside the training loss metrics.jsonl logged around the `--to`
step so the two can be compared. Windows are cut as the pretrain stage cuts them
(seq_len + 1 tokens, BOS at each document start, document masks when the run used them); with
`--max-tokens` an evenly spaced subset of windows is scored.

The table can steer the next run's data: `--mixture-out FILE` writes a `[[pretrain.mixture]]`
stage whose weights are each source's training tokens times its reduction per token (sources
that teach nothing get weight 0), as a recipe fragment (`base = ` the recipe of `--recipe`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from frontierlm.config import RecipeConfig
from frontierlm.model import Transformer
from frontierlm.tokenizer.shards import TokenSplit, window_batch
from frontierlm.tokenizer.train import BOS, load_tokenizer
from frontierlm.train.checkpoint import list_checkpoints, load_model_dir
from frontierlm.train.losses import token_cross_entropy


@dataclass
class DocLosses:
    """Per training document: summed loss under each model and tokens scored."""

    loss_from: np.ndarray
    loss_to: np.ndarray
    tokens: np.ndarray


def resolve_model(run_dir: Path, cfg: RecipeConfig, which: str, vocab: int) -> tuple[Any, str]:
    """`init`, `final`, `oldest`, `latest`, a step number, or a directory -> (model, label)."""
    ckpts = list_checkpoints(run_dir / "pretrain" / "checkpoints")
    if which == "init":
        torch.manual_seed(cfg.run.seed)  # the pretrain stage's first random draw is the model
        return Transformer(cfg.model, vocab), "init"
    if which == "final":
        return load_model_dir(run_dir / "pretrain" / "model"), "final"
    if which in ("oldest", "latest"):
        if not ckpts:
            raise FileNotFoundError(f"no checkpoints under {run_dir}/pretrain/checkpoints")
        path = ckpts[0] if which == "oldest" else ckpts[-1]
        return load_model_dir(path), path.name
    if which.isdigit():
        path = run_dir / "pretrain" / "checkpoints" / f"step_{int(which):07d}"
        if not path.is_dir():
            have = ", ".join(p.name for p in ckpts) or "none"
            raise FileNotFoundError(f"no checkpoint {path} (kept: {have})")
        return load_model_dir(path), path.name
    path = Path(which)
    return load_model_dir(path), str(path)


@torch.no_grad()
def document_losses(
    models: tuple[torch.nn.Module, torch.nn.Module],
    split: TokenSplit,
    seq_len: int,
    batch_size: int,
    max_tokens: int | None,
    bos_id: int | None,
) -> DocLosses:
    n_windows = (len(split.tokens) - 1) // seq_len
    picked = np.arange(n_windows)
    if max_tokens is not None and n_windows * seq_len > max_tokens:
        picked = np.linspace(0, n_windows - 1, max(1, max_tokens // seq_len)).astype(np.int64)
    n_docs = len(split.doc_starts)
    sums = [np.zeros(n_docs), np.zeros(n_docs)]
    counts = np.zeros(n_docs)
    for model in models:
        model.eval()
    for first in range(0, len(picked), batch_size):
        starts = picked[first : first + batch_size] * seq_len
        rows = np.stack([np.asarray(split.tokens[s : s + seq_len + 1], np.int64) for s in starts])
        batch = window_batch(torch.from_numpy(rows), bos_id)
        # The document of each predicted token (the target at position s + 1 + i).
        target_pos = starts[:, None] + 1 + np.arange(seq_len)[None, :]
        docs = np.searchsorted(split.doc_starts, target_pos, side="right") - 1
        for k, model in enumerate(models):
            logits = model(batch["input_ids"], doc_ids=batch.get("doc_ids"))
            losses = token_cross_entropy(logits, batch["targets"]).float().numpy()
            sums[k] += np.bincount(docs.ravel(), weights=losses.ravel(), minlength=n_docs)
        counts += np.bincount(docs.ravel(), minlength=n_docs)
    return DocLosses(sums[0], sums[1], counts)


def source_table(split: TokenSplit, doc: DocLosses) -> list[dict[str, Any]]:
    names = split.source_names or ["all"]
    index = split.doc_sources if split.doc_sources is not None else np.zeros(len(doc.tokens), int)
    rows = []
    for s, name in enumerate(names):
        mine = index == s
        tokens = float(doc.tokens[mine].sum())
        if not tokens:
            continue
        loss_from = float(doc.loss_from[mine].sum() / tokens)
        loss_to = float(doc.loss_to[mine].sum() / tokens)
        rows.append(
            {
                "source": name,
                "tokens": int(tokens),
                "documents": int((doc.tokens[mine] > 0).sum()),
                "loss_from": loss_from,
                "loss_to": loss_to,
                "reduction": loss_from - loss_to,
            }
        )
    return sorted(rows, key=lambda r: -r["reduction"])


def logged_train_loss(run_dir: Path, step: int | None, window: int = 20) -> float | None:
    """The mean training loss metrics.jsonl logged over the `window` steps up to `step`."""
    path = run_dir / "pretrain" / "metrics.jsonl"
    if not path.is_file():
        return None
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    losses = [r["loss"] for r in records if "loss" in r and (step is None or r["step"] <= step)]
    return float(np.mean(losses[-window:])) if losses else None


def utility_report(
    run_dir: Path,
    frm: str = "oldest",
    to: str = "final",
    max_tokens: int | None = 400_000,
    top_docs: int = 10,
    min_doc_tokens: int = 32,
) -> dict[str, Any]:
    config = run_dir / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"{config} missing: is {run_dir} a run directory (runs/NAME)?")
    cfg = RecipeConfig.model_validate_json(config.read_text())
    tok = load_tokenizer(run_dir / "tokenizer")
    split = TokenSplit.open(run_dir / "tokenize", "train")
    vocab = tok.get_vocab_size()
    model_from, label_from = resolve_model(run_dir, cfg, frm, vocab)
    model_to, label_to = resolve_model(run_dir, cfg, to, vocab)
    loop = cfg.pretrain
    bos_id = tok.token_to_id(BOS) if loop.document_mask else None
    doc = document_losses(
        (model_from, model_to), split, loop.seq_len, loop.batch_size, max_tokens, bos_id
    )
    sources = source_table(split, doc)
    # Documents with too few scored tokens give noisy means: ranked only from min_doc_tokens.
    scored = doc.tokens >= min(min_doc_tokens, max(1, int(doc.tokens.max())))
    per_doc_reduction = np.where(
        scored, (doc.loss_from - doc.loss_to) / np.maximum(doc.tokens, 1), 0
    )
    order = np.argsort(-per_doc_reduction[scored])
    doc_index = np.flatnonzero(scored)[order]
    names = split.source_names

    def describe(i: int) -> dict[str, Any]:
        start = int(split.doc_starts[i])
        preview = tok.decode([int(t) for t in split.tokens[start + 1 : start + 17]])
        return {
            "document": int(i),
            "source": names[int(split.doc_sources[i])] if split.doc_sources is not None else "all",
            "tokens": int(doc.tokens[i]),
            "loss_from": float(doc.loss_from[i] / doc.tokens[i]),
            "loss_to": float(doc.loss_to[i] / doc.tokens[i]),
            "reduction": float(per_doc_reduction[i]),
            "preview": " ".join(preview.split())[:60],
        }

    total = float(doc.tokens.sum())
    to_step = int(label_to.split("_")[1]) if label_to.startswith("step_") else None
    return {
        "from": label_from,
        "to": label_to,
        "tokens_scored": int(total),
        "loss_from": float(doc.loss_from.sum() / total),
        "loss_to": float(doc.loss_to.sum() / total),
        "logged_train_loss": logged_train_loss(run_dir, to_step),
        "sources": sources,
        "top_documents": [describe(i) for i in doc_index[:top_docs]],
        "bottom_documents": [describe(i) for i in doc_index[::-1][:top_docs]],
    }


def mixture_weights(report: dict[str, Any]) -> dict[str, float]:
    """Tokens times reduction per token (= the loss the source took off in total), >= 0,
    normalised: what the next run might weight each source by."""
    raw = {r["source"]: max(r["reduction"], 0.0) * r["tokens"] for r in report["sources"]}
    total = sum(raw.values())
    if total <= 0:
        raise ValueError("no source's loss went down between the two models: nothing to weight")
    return {name: round(value / total, 4) for name, value in raw.items()}


def mixture_toml(report: dict[str, Any], base: str | None) -> str:
    weights = ", ".join(f'"{k}" = {v}' for k, v in mixture_weights(report).items())
    head = f'base = "{base}"\n\n' if base else ""
    return (
        f"{head}# From `frontierlm data utility` ({report['from']} -> {report['to']}): each token "
        "source weighted by the loss it took off.\n"
        f'[[pretrain.mixture]]\nname = "utility"\nweights = {{ {weights} }}\n'
    )


def print_report(report: dict[str, Any]) -> None:
    from rich.table import Table

    from frontierlm.console import console

    table = Table(title=f"token utility: {report['from']} -> {report['to']} (nats/token)")
    for col in ("rank", "source", "tokens", "docs", "loss from", "loss to", "reduction"):
        table.add_column(col, justify="left" if col == "source" else "right")
    for rank, r in enumerate(report["sources"], 1):
        table.add_row(
            str(rank),
            r["source"],
            f"{r['tokens']:,}",
            f"{r['documents']:,}",
            f"{r['loss_from']:.4f}",
            f"{r['loss_to']:.4f}",
            f"{r['reduction']:+.4f}",
        )
    table.add_row(
        "",
        "all (token-weighted)",
        f"{report['tokens_scored']:,}",
        "",
        f"{report['loss_from']:.4f}",
        f"{report['loss_to']:.4f}",
        f"{report['loss_from'] - report['loss_to']:+.4f}",
    )
    console.print(table)
    logged = report["logged_train_loss"]
    if logged is not None:
        console.print(
            f"  training loss logged over the last 20 steps up to {report['to']}: {logged:.4f} "
            f"(scored here: {report['loss_to']:.4f})"
        )
    docs = Table(title="documents that teach the most / the least (reduction per token)")
    for col in ("document", "source", "tokens", "loss to", "reduction", "starts with"):
        docs.add_column(col)
    for d in report["top_documents"][:5] + report["bottom_documents"][:5]:
        docs.add_row(
            str(d["document"]),
            d["source"],
            str(d["tokens"]),
            f"{d['loss_to']:.3f}",
            f"{d['reduction']:+.3f}",
            d["preview"],
        )
    console.print(docs)
