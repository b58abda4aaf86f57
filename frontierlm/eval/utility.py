"""Token utility: which data sources and documents a pretraining run still learns from.

`frontierlm data utility RUN` reads two things about the stretch of training between two
points of the run, `--from` (default: the oldest checkpoint kept; `init` is step 0) and `--to`
(default: the end):

1. From the training log (exact). With `pretrain.source_losses` (on by default) every step of
   metrics.jsonl carries each token source's part of that step's training loss
   (`loss_share.NAME`: the source's token losses summed over all tokens of the step's batch)
   and of its tokens (`token_share.NAME`), computed during training from the same per-token
   losses as the loss itself (train/pretrain.py `source_loss_parts`). Over the last `--window`
   steps up to `--to` each source gets its mean loss (sum of loss shares / sum of token
   shares) and its contribution (mean loss share); the contributions add up to the mean
   logged training loss of those steps to float precision, and the report prints both and
   their difference, per step too. The same over the first `--window` steps after `--from`
   gives each source's loss there; reduction = from - to ranks the sources. The training loss
   of step k is the model after k - 1 updates on batch k, before it trains on it.

2. From the checkpoints (an estimate, `--no-rescore` skips it). The run's training tokens are
   scored again with the `--from` and `--to` models (`init`: rebuilt from the run's seed
   exactly as the stage built it), per token source and per document:

     mean loss (from, to)      nats per predicted token
     reduction                 from - to: how much the stretch of training between the two
                               taught, per token; a source still being learned keeps a high
                               reduction, a learned (or unlearnable, noise-like) one drops to ~0
     tokens                    predicted tokens scored

   Each source's mean is a token-weighted part of the whole. Windows are cut as the pretrain
   stage cuts them (seq_len + 1 tokens, BOS at each document start, document masks when the
   run used them); with `--max-tokens` an evenly spaced subset of windows is scored. Unlike the
   log, these losses are of fixed models over the whole split (not of the moving model on the
   batches it drew), so they come close to the logged loss without matching it; only they rank
   single documents.

The table can steer the next run's data: `--mixture-out FILE` writes a `[[pretrain.mixture]]`
stage whose weights are each source's tokens times its reduction per token (sources that
teach nothing get weight 0), as a recipe fragment (`base = ` the recipe of `--recipe`); and a
later data stage can filter documents by a reference model's losses (data/utility_filter.py).
"""

from __future__ import annotations

import json
import math
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
from frontierlm.train.metrics import MetricsLog


@dataclass
class DocLosses:
    """Per training document: summed loss under each model and tokens scored."""

    loss_from: np.ndarray
    loss_to: np.ndarray
    tokens: np.ndarray


def model_path(run_dir: Path, which: str) -> Path | None:
    """`init` (None: rebuilt from the seed), `final`, `oldest`, `latest`, a step number, or a
    directory -> the model directory it names."""
    ckpts = list_checkpoints(run_dir / "pretrain" / "checkpoints")
    if which == "init":
        return None
    if which == "final":
        return run_dir / "pretrain" / "model"
    if which in ("oldest", "latest"):
        if not ckpts:
            raise FileNotFoundError(f"no checkpoints under {run_dir}/pretrain/checkpoints")
        return ckpts[0] if which == "oldest" else ckpts[-1]
    if which.isdigit():
        path = run_dir / "pretrain" / "checkpoints" / f"step_{int(which):07d}"
        if not path.is_dir():
            have = ", ".join(p.name for p in ckpts) or "none"
            raise FileNotFoundError(f"no checkpoint {path} (kept: {have})")
        return path
    return Path(which)


def resolve_model(run_dir: Path, cfg: RecipeConfig, which: str, vocab: int) -> tuple[Any, str]:
    """As `model_path`, loaded -> (model, label)."""
    path = model_path(run_dir, which)
    if path is None:
        torch.manual_seed(cfg.run.seed)  # the pretrain stage's first random draw is the model
        return Transformer(cfg.model, vocab), "init"
    if which == "final":
        return load_model_dir(path), "final"
    return load_model_dir(path), path.name if path.parent.name == "checkpoints" else str(path)


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


LOSS_SHARE, TOKEN_SHARE = "loss_share.", "token_share."


def logged_ce(record: dict[str, Any]) -> float:
    """The cross-entropy part of a record's loss (the loss without z-loss and MoE aux loss):
    what the per-source loss shares add up to."""
    if "ce" in record:
        return float(record["ce"])
    return float(record["loss"]) - float(record.get("moe_aux_loss", 0.0))


def source_losses_from_log(
    records: list[dict[str, Any]], tokens_per_step: int
) -> dict[str, dict[str, float]]:
    """Per source, over `records` (steps of one metrics log): tokens, share of the tokens,
    mean loss per token, and contribution to the mean logged loss of the records."""
    names = [k[len(LOSS_SHARE) :] for k in records[0] if k.startswith(LOSS_SHARE)]
    out = {}
    for name in names:
        loss = math.fsum(r[LOSS_SHARE + name] for r in records)
        share = math.fsum(r[TOKEN_SHARE + name] for r in records)
        out[name] = {
            "tokens": round(share * tokens_per_step),
            "share": share / len(records),
            "loss": loss / share if share else math.nan,
            "contribution": loss / len(records),
        }
    return out


def logged_utility(
    run_dir: Path,
    from_step: int,
    to_step: int | None,
    window: int,
    tokens_per_step: int,
    min_tokens: int = 2048,
) -> dict[str, Any] | None:
    """Part 1 of the module docstring: the per-source table from metrics.jsonl, or None when
    the run logged no per-source losses (pretrain.source_losses off, or shards without
    sources). Sources with under `min_tokens` in a window rank last (`few_tokens`)."""
    path = run_dir / "pretrain" / "metrics.jsonl"
    records = [r for r in MetricsLog(path).read() if "loss" in r]
    tracked = [r for r in records if any(k.startswith(LOSS_SHARE) for k in r)]
    if not tracked:
        return None
    last = tracked[-1]["step"] if to_step is None else to_step
    span = [r for r in tracked if from_step < r["step"] <= last]
    if not span:
        raise ValueError(f"{path}: no step with per-source losses in {from_step + 1}-{last}")
    # Two windows that do not overlap: the first after `from`, the last up to `to`.
    window = max(1, min(window, len(span) // 2 or 1))
    early, late = span[:window], span[-window:]
    at_from = source_losses_from_log(early, tokens_per_step)
    at_to = source_losses_from_log(late, tokens_per_step)
    rows = []
    for name, r in at_to.items():
        rows.append(
            {
                "source": name,
                "tokens": r["tokens"],
                "share": r["share"],
                "loss_from": at_from[name]["loss"],
                "loss_to": r["loss"],
                "reduction": at_from[name]["loss"] - r["loss"],
                "contribution": r["contribution"],
            }
        )
    # A source with few tokens in either window has a noisy reduction (NaN with none): it is
    # ranked after the others.
    for r in rows:
        r["few_tokens"] = min(r["tokens"], at_from[r["source"]]["tokens"]) < min_tokens
    rows.sort(key=lambda r: (r["few_tokens"] or r["reduction"] != r["reduction"], -r["reduction"]))
    logged = math.fsum(logged_ce(r) for r in late) / len(late)
    parts = math.fsum(r["contribution"] for r in rows)
    per_step = [
        abs(math.fsum(v for k, v in r.items() if k.startswith(LOSS_SHARE)) - logged_ce(r))
        for r in span
    ]
    return {
        "steps_from": [early[0]["step"], early[-1]["step"]],
        "steps_to": [late[0]["step"], late[-1]["step"]],
        "tokens": round(len(late) * tokens_per_step),
        "logged_loss": logged,
        "sum_of_contributions": parts,
        "difference": parts - logged,
        "max_step_difference": max(per_step),
        "steps_checked": len(span),
        "sources": rows,
    }


def step_of(run_dir: Path, which: str) -> int | None:
    """The training step `--from`/`--to` names (init: 0; final: None, the last logged step)."""
    if which == "init":
        return 0
    if which == "final":
        return None
    if which.isdigit():
        return int(which)
    if which in ("oldest", "latest"):
        ckpts = list_checkpoints(run_dir / "pretrain" / "checkpoints")
        if not ckpts:
            raise FileNotFoundError(f"no checkpoints under {run_dir}/pretrain/checkpoints")
        return int((ckpts[0] if which == "oldest" else ckpts[-1]).name.split("_")[1])
    name = Path(which).name
    if name.startswith("step_") and name[5:].isdigit():
        return int(name[5:])
    raise ValueError(f"{which!r}: the training log is read by step; name a step or checkpoint")


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
    window: int = 20,
    rescore: bool = True,
) -> dict[str, Any]:
    """Both parts of the module docstring: `logged` (None when the run logged no per-source
    losses) and, with `rescore`, the checkpoint scoring's keys."""
    config = run_dir / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"{config} missing: is {run_dir} a run directory (runs/NAME)?")
    cfg = RecipeConfig.model_validate_json(config.read_text())
    loop = cfg.pretrain
    tokens_per_step = loop.batch_size * loop.seq_len * loop.grad_accum
    logged = logged_utility(
        run_dir, step_of(run_dir, frm), step_of(run_dir, to), window, tokens_per_step
    )
    if not rescore:
        if logged is None:
            raise ValueError(
                f"{run_dir}/pretrain/metrics.jsonl holds no per-source losses (a run with "
                "pretrain.source_losses off, or token shards without sources): drop "
                "--no-rescore to score the checkpoints instead"
            )
        return {"from": frm, "to": to, "logged": logged}
    report = rescored_report(run_dir, cfg, frm, to, max_tokens, top_docs, min_doc_tokens)
    return {**report, "logged": logged}


def rescored_report(
    run_dir: Path,
    cfg: RecipeConfig,
    frm: str,
    to: str,
    max_tokens: int | None,
    top_docs: int,
    min_doc_tokens: int,
) -> dict[str, Any]:
    """Part 2 of the module docstring: the training split scored with two models."""
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
    normalised: what the next run might weight each source by. From the checkpoint scoring
    when the report has it, else from the training log."""
    rows = report["sources"] if "sources" in report else report["logged"]["sources"]
    raw = {
        r["source"]: max(r["reduction"], 0.0) * r["tokens"]
        if r["reduction"] == r["reduction"]
        else 0.0
        for r in rows
    }
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


def print_logged(logged: dict[str, Any]) -> None:
    from rich.table import Table

    from frontierlm.console import console

    a, b = logged["steps_from"]
    c, d = logged["steps_to"]
    table = Table(
        title=f"token utility from the training log: steps {a}-{b} -> {c}-{d} (nats/token)"
    )
    columns = ("rank", "source", "tokens", "share", "loss from", "loss to", "reduction", "of loss")
    for col in columns:
        table.add_column(col, justify="left" if col == "source" else "right")
    for rank, r in enumerate(logged["sources"], 1):
        table.add_row(
            "-" if r["few_tokens"] else str(rank),
            r["source"],
            f"{r['tokens']:,}",
            f"{r['share']:.1%}",
            f"{r['loss_from']:.4f}",
            f"{r['loss_to']:.4f}",
            f"{r['reduction']:+.4f}",
            f"{r['contribution']:.5f}",
        )
    table.add_row(
        "", "sum", f"{logged['tokens']:,}", "", "", "", "", f"{logged['sum_of_contributions']:.5f}"
    )
    console.print(table)
    if any(r["few_tokens"] for r in logged["sources"]):
        console.print("  -: too few tokens in a window to rank (--window wider to rank them)")
    ok = abs(logged["difference"]) < 1e-5 and logged["max_step_difference"] < 1e-5
    mark = "[green]adds up[/]" if ok else "[red]does NOT add up[/]"
    console.print(
        f"  sum of the sources' parts {logged['sum_of_contributions']:.6f} vs logged training "
        f"loss {logged['logged_loss']:.6f} (steps {c}-{d}): difference "
        f"{logged['difference']:+.1e}; largest per-step difference over "
        f"{logged['steps_checked']} steps {logged['max_step_difference']:.1e}: {mark}"
    )


def print_report(report: dict[str, Any]) -> None:
    from rich.table import Table

    from frontierlm.console import console

    if report.get("logged") is not None:
        print_logged(report["logged"])
    elif "sources" in report:
        console.print(
            "[yellow]  the run's metrics.jsonl holds no per-source losses (pretrain.source_losses "
            "off, or shards without sources): checkpoint scoring only"
        )
    if "sources" not in report:
        return
    title = f"token utility, checkpoints rescored: {report['from']} -> {report['to']} (nats/token)"
    table = Table(title=title)
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
