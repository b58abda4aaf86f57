"""`frontierlm`: one entry point, one subcommand per stage, `run` for the whole pipeline.

frontierlm run RECIPE [--section.key=value ...] [--force]
frontierlm STAGE RECIPE [--section.key=value ...] [--force]
frontierlm export CKPT OUT | frontierlm export-tokenizer TOKENIZER OUT
frontierlm [data] train-classifier OUT (tools outside the pipeline)
frontierlm tokenizer report TOKENIZER_DIR [...] [--against DIR_OR_NAME] [--out DIR]
frontierlm generate|chat|serve MODEL [...] (sampling from a model, inference/commands.py)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from frontierlm.config import ConfigError, load_config
from frontierlm.console import console
from frontierlm.inference import commands as inference_commands
from frontierlm.stages import STAGES, run_pipeline, run_stage
from frontierlm.train.parallel import launched_world_size, shutdown_distributed


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="frontierlm",
        description="Raw text to an aligned chat model. Overrides: --section.key=value "
        "(e.g. --model.n_layers=4 --pretrain.steps=100).",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands = {"run": "run every stage in order, skipping those already done"}
    commands |= {name: stage.summary for name, stage in STAGES.items()}
    for name, help_text in commands.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("recipe", help="TOML recipe, e.g. recipes/quickstart.toml")
        p.add_argument("--force", action="store_true", help="rerun even if the output is current")
    export = sub.add_parser(
        "export",
        help="write a model in Hugging Face format (loads with transformers)",
        description="frontierlm export runs/quickstart/align OUT --to hf",
    )
    export.add_argument("ckpt", help="a model directory, or a stage directory holding model/")
    export.add_argument("out", help="output directory")
    export.add_argument("--to", choices=["hf"], default="hf")
    export.add_argument(
        "--tokenizer", help="tokenizer directory to include (default: the run's tokenizer/)"
    )
    export_tok = sub.add_parser(
        "export-tokenizer",
        help="write a trained tokenizer in tiktoken's format (byte-level BPE only)",
        description="frontierlm export-tokenizer runs/quickstart/tokenizer OUT: writes "
        "OUT/tokenizer.tiktoken (mergeable ranks) and OUT/tiktoken.json (split pattern, special "
        "tokens); tiktoken then encodes exactly as the tokenizer does",
    )
    export_tok.add_argument("tokenizer", help="tokenizer directory or tokenizer.json")
    export_tok.add_argument("out", help="output directory")
    export_tok.add_argument("--to", choices=["tiktoken"], default="tiktoken")
    export_tok.add_argument("--name", default="frontierlm", help="the tiktoken Encoding's name")
    inference_commands.add_parsers(sub)
    train_clf = sub.add_parser(
        "train-classifier",
        help="train the quality classifier (reference text vs random web) for data.quality_model",
        description="frontierlm train-classifier runs/quality-model: hashed uni+bigram logistic "
        "regression (DCLM-style); prints and stores the held-out AUC",
    )
    train_clf.add_argument("out", help="model directory to write (weights.npz + meta.json)")
    train_clf.add_argument(
        "--positive",
        action="append",
        help="reference-text file (.txt split into WikiText articles, .jsonl, .warc.gz); "
        "repeatable; default: data/wikitext-2/valid.txt",
    )
    train_clf.add_argument(
        "--negative",
        action="append",
        help="random-web file, repeatable; default: the shipped Common Crawl samples",
    )
    train_clf.add_argument("--bits", type=int, default=20, help="2^bits hash buckets")
    train_clf.add_argument("--steps", type=int, default=300, help="full-batch Adam steps")
    train_clf.add_argument("--seed", type=int, default=0, help="seed of the held-out split")
    return parser


def tokenizer_report_parser() -> argparse.ArgumentParser:
    """`frontierlm tokenizer report`: its own parser, since `frontierlm tokenizer RECIPE` is
    the stage and argparse cannot tell a recipe path from the word `report`."""
    from frontierlm.tokenizer.report import DEFAULT_BASELINE_CHARS, DEFAULT_D_MODEL, DEFAULT_PARAMS

    parser = argparse.ArgumentParser(
        prog="frontierlm tokenizer report",
        description="bytes/token and tokens/word of trained tokenizers on held-out English, "
        "code, math and non-English text, against a GPT-2-split BPE of the same vocab size "
        "(or --against), with the training FLOPs per byte each one implies",
    )
    parser.add_argument("tokenizers", nargs="+", metavar="TOKENIZER_DIR")
    parser.add_argument(
        "--against",
        metavar="DIR_OR_NAME",
        help="baseline tokenizer directory (or tiktoken encoding name) instead of training "
        "GPT-2-split baselines",
    )
    parser.add_argument(
        "--out", default="runs/tokenizer-report", help="directory for report.json + report.png"
    )
    parser.add_argument(
        "--d-model",
        type=int,
        default=DEFAULT_D_MODEL,
        help="model width for the 2 * d_model * vocab embedding + head parameters",
    )
    parser.add_argument(
        "--params", type=float, default=DEFAULT_PARAMS, help="N in 6N FLOPs per token"
    )
    parser.add_argument(
        "--baseline-chars",
        type=int,
        default=DEFAULT_BASELINE_CHARS,
        help="cap on the text a GPT-2-split baseline trains on",
    )
    return parser


def tokenizer_report_command(argv: list[str]) -> int:
    from frontierlm.tokenizer.report import build_report, print_report, write_report

    args = tokenizer_report_parser().parse_args(argv)
    try:
        report = build_report(
            args.tokenizers,
            args.against,
            d_model=args.d_model,
            params=args.params,
            baseline_chars=args.baseline_chars,
            log=lambda msg: console.print(f"  {msg}"),
        )
        paths = write_report(report, Path(args.out))
    except (FileNotFoundError, ValueError) as err:
        console.print(f"[red]error in tokenizer report:[/] {err}")
        return 1
    print_report(report, paths)
    return 0


def train_classifier_command(args: argparse.Namespace) -> int:
    from frontierlm.data.quality import (
        DEFAULT_NEGATIVES,
        DEFAULT_POSITIVES,
        read_texts,
        train_classifier,
    )

    positives = args.positive or list(DEFAULT_POSITIVES)
    negatives = args.negative or list(DEFAULT_NEGATIVES)
    for path in positives + negatives:
        if not Path(path).is_file():
            raise FileNotFoundError(f"classifier input {path} does not exist")
    result = train_classifier(
        read_texts(positives),
        read_texts(negatives),
        bits=args.bits,
        steps=args.steps,
        seed=args.seed,
    )
    result.model.meta.update(positives=positives, negatives=negatives)
    result.model.save(Path(args.out))
    meta = result.model.meta
    console.print(
        f"[green]✓ quality classifier[/] -> {args.out}: held-out AUC {result.heldout_auc:.4f} "
        f"({meta['heldout_windows']} windows of unseen documents), train AUC "
        f"{result.train_auc:.4f}, {meta['nonzero']:,} non-zero weights"
    )
    return 0


def export_tokenizer_command(args: argparse.Namespace) -> int:
    from frontierlm.tokenizer.export import export_tiktoken
    from frontierlm.tokenizer.train import load_tokenizer

    out = Path(args.out)
    spec = export_tiktoken(load_tokenizer(Path(args.tokenizer)), out, args.name)
    console.print(
        f"[green]✓ exported[/] {args.tokenizer} -> {out}/tokenizer.tiktoken + tiktoken.json "
        f"({len(spec.mergeable_ranks):,} ranks, {len(spec.special_tokens)} special tokens); "
        "load with frontierlm.tokenizer.export.to_tiktoken(Path(OUT)) or "
        "tiktoken.load.load_tiktoken_bpe"
    )
    return 0


def export_command(args: argparse.Namespace) -> int:
    from frontierlm.model import load
    from frontierlm.model.hf import export_hf

    ckpt = Path(args.ckpt)
    model = load(ckpt)
    tokenizer = Path(args.tokenizer) if args.tokenizer else None
    if tokenizer is None:  # runs/<name>/<stage>[/model] -> runs/<name>/tokenizer
        for parent in (ckpt.parent, ckpt.parent.parent):
            if (parent / "tokenizer" / "tokenizer.json").is_file():
                tokenizer = parent / "tokenizer"
                break
    export_hf(model, Path(args.out), tokenizer)
    family = json.loads((Path(args.out) / "config.json").read_text())["model_type"]
    console.print(f"[green]✓ exported[/] {ckpt} -> {args.out} ({family}, tokenizer: {tokenizer})")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:2] == ["tokenizer", "report"]:
        return tokenizer_report_command(argv[2:])
    if argv[:2] == ["data", "train-classifier"]:
        argv = argv[1:]  # also spelled as a tool of the data stage
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    commands = {
        "export": export_command,
        "export-tokenizer": export_tokenizer_command,
        "train-classifier": train_classifier_command,
        **inference_commands.COMMANDS,
    }
    if args.command in commands:
        if rest:
            parser.error(f"unrecognised arguments {rest}")
        try:
            return commands[args.command](args)
        except (FileNotFoundError, ValueError, NotImplementedError) as err:
            console.print(f"[red]error in {args.command}:[/] {err}")
            return 1
    bad = [a for a in rest if not (a.startswith("--") and "." in a.split("=")[0] and "=" in a)]
    if bad:
        parser.error(f"unrecognised arguments {bad}; overrides look like --model.n_layers=4")
    try:
        cfg = load_config(args.recipe, rest)
    except ConfigError as err:
        console.print(f"[red]error:[/] {err}")
        return 2
    try:
        if args.command == "run":
            run_pipeline(cfg, force=args.force)
        else:
            run_stage(cfg, args.command, force=args.force)
    except KeyboardInterrupt:
        console.print("[yellow]interrupted; run the same command again to resume")
        return 130
    except (FileNotFoundError, ValueError, RuntimeError) as err:
        # Under torchrun every process reports its own error: the one that failed first may
        # not be rank 0, the only process that speaks otherwise.
        console.quiet = False
        rank = f" (rank {os.environ['RANK']})" if launched_world_size() > 1 else ""
        console.print(f"[red]error in {args.command}{rank}:[/] {err}")
        return 1
    finally:
        shutdown_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
