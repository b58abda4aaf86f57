"""`frontierlm`: one entry point, one subcommand per stage, `run` for the whole pipeline.

frontierlm run RECIPE [--section.key=value ...] [--force]
frontierlm STAGE RECIPE [--section.key=value ...] [--force]
frontierlm export CKPT OUT | frontierlm export-tokenizer TOKENIZER OUT
frontierlm [data] train-classifier OUT (tools outside the pipeline)
frontierlm tokenizer report TOKENIZER_DIR [...] [--against DIR_OR_NAME] [--out DIR]
frontierlm data utility RUN [--from A] [--to B] [--window N] [--no-rescore] [--mixture-out FILE]
frontierlm safety RUN [--model align] [--judge-model DIR]
frontierlm doctor [--path DIR] [thresholds]   (preflight; under torchrun also all-reduce)
frontierlm plan [--flops C | --gpu-hours H | --dollars USD] [--params N | --recipe R] [--tokens D]
frontierlm sweep RECIPE --sizes 64x2,128x3 --tokens 0.2M,0.4M  (then: plan --law sweep.json)
frontierlm generate|chat|serve MODEL [...] (sampling from a model, inference/commands.py)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from frontierlm.atomic import write_text
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
    from frontierlm.plan.planner import add_plan_arguments

    plan = sub.add_parser(
        "plan",
        help="scaling-law and cost arithmetic: any two of compute, parameters, tokens give the "
        "third; compute-optimal N and D, batch size and lr, GPU-hours, days, energy, dollars",
        description="frontierlm plan --flops 5.76e23 | --params 405e9 --tokens 15.6e12 | "
        "--gpu-hours 1e6 --gpu H100 --mfu 0.4 | --dollars 1e7 --price 2.5 [--law sweep.json]",
    )
    add_plan_arguments(plan)
    sweep = sub.add_parser(
        "sweep",
        help="a grid of small pretraining runs, the scaling law L(N, D) fitted to them, a plot",
        description="frontierlm sweep recipes/quickstart.toml --sizes 64x2,128x3,192x4 "
        "--tokens 0.2M,0.4M,0.8M (or --flops 1e12,4e12 for IsoFLOP profiles) "
        "[--section.key=value ...]; writes runs/<name>/sweep/sweep.json, read by "
        "`frontierlm plan --law`",
    )
    sweep.add_argument("recipe", help="TOML recipe whose data, tokenizer and model family to use")
    sweep.add_argument("--sizes", required=True, help="D_MODELxN_LAYERS,... e.g. 64x2,128x3")
    sweep.add_argument("--tokens", help="training tokens per run, e.g. 0.2M,0.4M,0.8M")
    sweep.add_argument(
        "--flops", help="compute budgets per run instead of --tokens, e.g. 1e12,4e12"
    )
    sweep.add_argument(
        "--lr-search",
        help="learning rates tried per size on its smallest budget, the best used for its other "
        "budgets, e.g. 5e-3,1e-2,2e-2 (default: the recipe's pretrain.lr for every size)",
    )
    sweep.add_argument(
        "--lr-width-exponent",
        type=float,
        default=0.0,
        help="lr per size = pretrain.lr x (recipe d_model / d_model)^p; 1 = muP's 1/width for "
        "hidden matrices (default 0: the recipe's lr for every size)",
    )
    sweep.add_argument(
        "--warmup-fraction", type=float, default=0.1, help="warmup as a share of each run's steps"
    )
    sweep.add_argument(
        "--n-count",
        choices=["non-embedding", "total"],
        default="total",
        help="the parameters the law's N counts: total active parameters, embeddings included "
        "(Hoffmann et al., and what `plan` counts; default) or non-embedding (Kaplan et al.)",
    )
    sweep.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="points trained at once, each in its own process (one GPU each where there are "
        "several; on CPU cores / jobs threads each unless run.threads is set)",
    )
    sweep.add_argument("--force", action="store_true", help="retrain points already done")
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


def safety_command(argv: list[str]) -> int:
    """`frontierlm safety RUN`: instruction hierarchy and refusals (frontierlm/eval/safety.py)."""
    from rich.table import Table

    from frontierlm.eval.safety import HH_RED_TEAM, ChatModel, evaluate_safety
    from frontierlm.model import load
    from frontierlm.tokenizer.train import load_tokenizer

    parser = argparse.ArgumentParser(
        prog="frontierlm safety",
        description="instruction-hierarchy (conflicting instructions at two privilege levels) "
        "and refusal (HH red-team requests) evaluation of a run's chat model; writes "
        "RUN/safety/results.json and samples.md, which the report includes",
    )
    parser.add_argument("run", help="run directory, e.g. runs/quickstart")
    parser.add_argument("--model", default="align", help="stage (align, sft) or model directory")
    parser.add_argument("--n-refusal", type=int, default=100, help="red-team prompts scored")
    parser.add_argument("--seed", type=int, default=0, help="seed of the prompt sample")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--judge-model", help="a chat model directory as the refusal judge")
    parser.add_argument("--hh", default=str(HH_RED_TEAM), help="HH harmless-base JSONL.gz")
    args = parser.parse_args(argv)
    run = Path(args.run)
    try:
        stage_model = run / args.model / "model"
        model = load(stage_model if stage_model.is_dir() else Path(args.model))
        tok = load_tokenizer(run / "tokenizer")
        chat = ChatModel(model, tok, args.max_new_tokens)
        judge = None
        if args.judge_model:
            judge = ChatModel(load(Path(args.judge_model)), tok, max_new_tokens=3)
        results, samples = evaluate_safety(chat, args.n_refusal, args.seed, judge, Path(args.hh))
    except (FileNotFoundError, ValueError) as err:
        console.print(f"[red]error in safety:[/] {err}")
        return 1
    results["model"] = args.model
    out = run / "safety"
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "results.json", json.dumps(results, indent=2))
    write_text(out / "samples.md", "\n".join(samples))
    table = Table(title=f"safety: {run.name} / {args.model}")
    for col in ("evaluation", "score", "95% CI", "n"):
        table.add_column(col)
    rows = [("instruction hierarchy: followed the higher level", results["instruction_hierarchy"])]
    rows += [(f"  {k}", v) for k, v in results["instruction_hierarchy"]["by_pair"].items()]
    rows += [("refusal of HH red-team requests (rule judge)", results["refusal"]["rule_judge"])]
    if "model_judge" in results["refusal"]:
        rows += [("refusal (model judge)", results["refusal"]["model_judge"])]
    for name, r in rows:
        table.add_row(
            name, f"{r['rate']:.3f}", f"{r['ci95'][0]:.3f}-{r['ci95'][1]:.3f}", str(r["n"])
        )
    console.print(table)
    skipped = results["instruction_hierarchy"]["levels_not_in_tokenizer"]
    if skipped:
        console.print(f"[yellow]  roles missing from this tokenizer, not tested: {skipped}")
    console.print(f"  -> {out}/results.json, {out}/samples.md")
    return 0


def utility_command(argv: list[str]) -> int:
    """`frontierlm data utility RUN`: its own parser, as `tokenizer report` (see there)."""
    from frontierlm.eval.utility import mixture_toml, print_report, utility_report

    parser = argparse.ArgumentParser(
        prog="frontierlm data utility",
        description="rank a pretraining run's token sources and documents by how much the "
        "training between two points of the run lowered their loss: from the per-source losses "
        "the training log recorded (they add up to the logged loss) and from two of its "
        "checkpoints scored again (see frontierlm/eval/utility.py)",
    )
    parser.add_argument("run", help="run directory, e.g. runs/quickstart")
    parser.add_argument(
        "--from",
        dest="frm",
        default="oldest",
        help="init | oldest | latest | final | STEP | DIR (default: the oldest kept checkpoint)",
    )
    parser.add_argument("--to", default="final", help="as --from (default: the final model)")
    parser.add_argument(
        "--max-tokens", type=int, default=400_000, help="score evenly spaced windows up to this"
    )
    parser.add_argument(
        "--window", type=int, default=20, help="logged steps averaged at each end (default 20)"
    )
    parser.add_argument(
        "--no-rescore",
        dest="rescore",
        action="store_false",
        help="the training log only: do not score the checkpoints again",
    )
    parser.add_argument("--json", help="write the table (and per-document ranks) here")
    parser.add_argument("--mixture-out", help="write a [[pretrain.mixture]] recipe fragment here")
    parser.add_argument("--recipe", help="the fragment's base recipe (with --mixture-out)")
    args = parser.parse_args(argv)
    try:
        report = utility_report(
            Path(args.run),
            args.frm,
            args.to,
            args.max_tokens,
            window=args.window,
            rescore=args.rescore,
        )
    except (FileNotFoundError, ValueError) as err:
        console.print(f"[red]error in data utility:[/] {err}")
        return 1
    print_report(report)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    if args.mixture_out:
        Path(args.mixture_out).write_text(mixture_toml(report, args.recipe))
        console.print(f"  mixture fragment -> {args.mixture_out}")
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


def plan_command(args: argparse.Namespace) -> int:
    from frontierlm.plan.planner import plan_command as run_plan

    return run_plan(args)


def sweep_command(args: argparse.Namespace, overrides: list[str]) -> int:
    from frontierlm.plan.sweep import parse_amounts, parse_sizes, run_sweep, sweep_section

    try:
        if (args.tokens is None) == (args.flops is None):
            raise ValueError("give --tokens or --flops (one of them)")
        sizes = parse_sizes(args.sizes)
        tokens = parse_amounts(args.tokens, "--tokens") if args.tokens else None
        flops = parse_amounts(args.flops, "--flops") if args.flops else None
        lrs = parse_amounts(args.lr_search, "--lr-search") if args.lr_search else None
        cfg = load_config(args.recipe, overrides)
        result = run_sweep(
            cfg,
            sizes,
            tokens,
            flops,
            force=args.force,
            lrs=lrs,
            warmup_fraction=args.warmup_fraction,
            n_count=args.n_count,
            lr_width_exponent=args.lr_width_exponent,
            jobs=args.jobs,
        )
    except (ConfigError, FileNotFoundError, ValueError, RuntimeError) as err:
        console.print(f"[red]error in sweep:[/] {err}")
        return 1
    except KeyboardInterrupt:
        console.print("[yellow]interrupted; run the same command again to resume")
        return 130
    console.print("\n".join(sweep_section(result, f"{cfg.run.run_dir}/sweep/")), markup=False)
    console.print(
        f"[green]✓ sweep[/] -> {cfg.run.run_dir}/sweep/sweep.json; plan with it: "
        f"frontierlm plan --flops 1e21 --law {cfg.run.run_dir}/sweep/sweep.json"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["doctor"]:
        from frontierlm.doctor import main as doctor

        return doctor(argv[1:])
    if argv[:1] == ["safety"]:
        return safety_command(argv[1:])
    if argv[:2] == ["data", "utility"]:
        return utility_command(argv[2:])
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
        "plan": plan_command,
        **inference_commands.COMMANDS,
    }
    if args.command == "sweep":
        return sweep_command(args, rest)
    if args.command in commands:
        if rest:
            parser.error(f"unrecognised arguments {rest}")
        try:
            return commands[args.command](args)
        except (FileNotFoundError, ValueError, NotImplementedError, ConfigError) as err:
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
