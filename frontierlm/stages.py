"""The pipeline of stages, and the runner that skips what is already done.

Each stage writes into `runs/<name>/<stage>.partial/` and, when it finishes, records
`stage.json` (its fingerprint, metrics and wall time) and renames the directory to
`runs/<name>/<stage>/`. The fingerprint hashes the config tables the stage reads, the content of
the files it reads from outside the run, and the fingerprints of the stages it depends on, so:
  - an unchanged stage is skipped on the next `run`;
  - changing one stage's config reruns that stage and every stage after it;
  - a killed stage leaves only its `.partial` directory, which the next run resumes (training
    stages continue from their latest checkpoint) when the fingerprint still matches.

Under torchrun (WORLD_SIZE > 1) the training stages (`distributed=True`) run on every process,
data parallel; rank 0 alone prepares and commits their directory. Any other stage runs on rank 0
while the other processes wait for it. The run directory must be one every process sees.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from frontierlm.atomic import commit_dir, write_text
from frontierlm.config import RecipeConfig
from frontierlm.console import console
from frontierlm.train.parallel import barrier, init_distributed, launched_world_size, world


@dataclass(frozen=True)
class Stage:
    name: str
    entry: str  # "module:function" taking a StageContext, returning metrics
    sections: tuple[str, ...]  # config tables the stage reads
    deps: tuple[str, ...]  # stages whose outputs it reads
    summary: str  # which metric the report shows, and what the stage does
    key_metric: str = ""
    distributed: bool = False  # under torchrun: every process takes part, not rank 0 alone
    in_pipeline: bool = True  # `frontierlm run` runs it (diloco is pretrain's alternative)
    optional: bool = False  # runs only when the recipe has its table (e.g. [rl])

    def enabled(self, cfg: RecipeConfig) -> bool:
        return not self.optional or getattr(cfg, self.name) is not None

    def deps_for(self, cfg: RecipeConfig) -> tuple[str, ...]:
        """The stages whose outputs this one reads under `cfg`: optional stages the recipe
        leaves out are not waited for, and rl started from a given model needs no sft."""
        deps = tuple(d for d in self.deps if STAGES[d].enabled(cfg))
        if self.name == "rl" and cfg.rl is not None and cfg.rl.init != "sft":
            deps = tuple(d for d in deps if d != "sft")
        return deps

    def function(self) -> Callable[[StageContext], dict[str, Any]]:
        module, func = self.entry.split(":")
        return getattr(importlib.import_module(module), func)


STAGES: dict[str, Stage] = {
    s.name: s
    for s in [
        Stage(
            "data",
            "frontierlm.data:run_data_stage_ctx",
            ("data",),
            (),
            "read, filter and dedup raw documents",
            "docs_out",
        ),
        Stage(
            "tokenizer",
            "frontierlm.tokenizer.stage:run_tokenizer_stage",
            ("tokenizer",),
            ("data",),
            "train byte-level BPE",
            "bytes_per_token",
        ),
        Stage(
            "tokenize",
            "frontierlm.tokenizer.stage:run_tokenize_stage",
            ("tokenize", "token_sources"),
            ("data", "tokenizer"),
            "encode documents into token shards",
            "train_tokens",
        ),
        Stage(
            "pretrain",
            "frontierlm.train.pretrain:run_pretrain_stage",
            ("run", "model", "pretrain"),
            ("tokenizer", "tokenize"),
            "pretrain the decoder (dense or MoE)",
            "val_bpb",
            distributed=True,
        ),
        Stage(
            "diloco",
            "frontierlm.distributed.launch:run_diloco_stage",
            ("run", "model", "pretrain", "diloco"),
            ("tokenizer", "tokenize"),
            "pretrain across islands that sync rarely (DiLoCo family)",
            "val_bpb",
            in_pipeline=False,
        ),
        Stage(
            "sft",
            "frontierlm.posttrain.sft:run_sft_stage",
            ("run", "sft"),
            ("tokenizer", "pretrain"),
            "supervised fine-tuning on chats",
            "val_bpb",
            distributed=True,
        ),
        Stage(
            "rl",
            "frontierlm.posttrain.rl:run_rl_stage",
            ("run", "rl"),
            ("tokenizer", "sft"),
            "RL (GRPO and variants, PPO) with verifiable or model rewards",
            "val_greedy_accuracy",
            distributed=True,
            optional=True,
        ),
        Stage(
            "align",
            "frontierlm.posttrain.align:run_align_stage",
            ("run", "align"),
            ("tokenizer", "sft"),
            "preference optimisation (align.loss_type) of the SFT model",
            "val_rewards/accuracies",
            distributed=True,
        ),
        Stage(
            "synth",
            "frontierlm.data.synthetic:run_synth_stage",
            ("run", "synth", "sft", "align"),
            ("tokenizer", "pretrain", "sft", "align"),
            "sample, verify and keep synthetic data (recipes with a synth table)",
            "kept",
            optional=True,
        ),
        Stage(
            "synth_sft",
            "frontierlm.posttrain.sft:run_synth_sft_stage",
            ("run", "synth_sft"),
            ("tokenizer", "sft", "synth"),
            "SFT on the verified synthetic data; held-out exact match before and after",
            "heldout_exact_match_after",
            optional=True,
        ),
        Stage(
            "eval",
            "frontierlm.eval.stage:run_eval_stage",
            ("run", "eval", "sft", "align"),
            ("tokenizer", "tokenize", "pretrain", "sft", "align"),
            "bpb of every model, preference margin, samples, eval tasks",
            "align_chat_bpb",
        ),
        Stage(
            "report",
            "frontierlm.report:run_report_stage",
            (),
            (
                *("data", "tokenizer", "tokenize", "pretrain", "sft", "rl", "align"),
                *("synth", "synth_sft", "eval"),
            ),
            "report.md and plots",
            "",
        ),
    ]
}


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def external_files(cfg: RecipeConfig, stage: str) -> list[str]:
    """Files outside the run directory that a stage reads: their content is fingerprinted."""
    if stage == "data":
        # Folders and globs are fingerprinted by every file they hold, so adding, removing or
        # editing one reruns the stage; an unreadable source raises DataError naming it.
        from frontierlm.data.decontam import eval_set_files
        from frontierlm.data.quality import model_files
        from frontierlm.data.readers import resolve_sources

        data = cfg.data
        files = [str(f.path) for files in resolve_sources(data.sources) for f in files]
        # Eval sets and the classifier decide what is kept as much as the sources do.
        files += [_display_path(p) for p in eval_set_files(data.decontaminate)]
        if data.quality_model is not None:
            files += [str(p) for p in model_files(Path(data.quality_model))]
        if data.utility_filter is not None:
            from frontierlm.data.utility_filter import model_files as utility_files

            files += [str(p) for p in utility_files(data.utility_filter)]
        return files
    if stage in ("sft", "align"):
        return [s.path for s in getattr(cfg, stage).sources]
    if stage == "rl" and cfg.rl is not None:
        files = []
        if cfg.rl.init != "sft":
            files.append(str(Path(cfg.rl.init) / "model.safetensors"))
        if cfg.rl.task.kind == "gsm8k":
            files.append(cfg.rl.task.gsm8k_path)
        rm = cfg.rl.reward_model
        if rm is not None and "reward_model" in cfg.rl.rewards:
            files += [str(Path(rm.path) / "model.safetensors")] if rm.path else []
            files += [s.path for s in rm.sources] if rm.path is None else []
        return files
    if stage == "report":
        # A scaling-law sweep of this recipe (`frontierlm sweep`) joins the report: its result
        # is an input, so a sweep run after the report makes the next `run` redo the report.
        sweep = cfg.run.run_dir / "sweep" / "sweep.json"
        return [str(sweep)] if sweep.is_file() else []
    if stage == "eval":
        from frontierlm.eval.tasks import load_spec, spec_path, task_files

        files = []
        for task in cfg.eval.tasks:
            files += [_display_path(spec_path(task).resolve()), *task_files(load_spec(task))]
        return files
    if stage == "synth_sft" and cfg.synth_sft is not None:
        from frontierlm.eval.tasks import load_spec, spec_path, task_files

        spec = load_spec(cfg.synth_sft.heldout_task)
        files = [_display_path(spec_path(cfg.synth_sft.heldout_task).resolve())]
        return files + task_files(spec) + [s.path for s in cfg.synth_sft.sources]
    if stage == "synth" and cfg.synth is not None:
        files = [cfg.synth.source]
        if cfg.synth.dedup_against_sft:
            files += [s.path for s in cfg.sft.sources]
        return files
    return []


def _display_path(path: Path) -> str:
    """`path` relative to the current directory when under it: the fingerprint hashes the name
    too, and a repository checked out elsewhere should not rerun the stage."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


@dataclass
class StageContext:
    cfg: RecipeConfig
    stage: Stage
    work_dir: Path

    @property
    def run_dir(self) -> Path:
        return self.cfg.run.run_dir

    def path(self, stage: str) -> Path:
        """The finished output directory of an upstream stage."""
        return self.run_dir / stage

    @cached_property
    def device(self) -> torch.device:
        from frontierlm.train.parallel import select_device

        return select_device(self.cfg.run)


def read_record(out_dir: Path) -> dict[str, Any]:
    return json.loads((out_dir / "stage.json").read_text())


def fingerprint(cfg: RecipeConfig, stage: Stage) -> str:
    h = hashlib.sha256()
    h.update(stage.name.encode())
    sections = stage.sections
    if stage.name == "pretrain" and cfg.pretrain.mode == "diloco":
        sections += ("diloco",)
    h.update(cfg.section_json(*sections).encode())
    for path in external_files(cfg, stage.name):
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(
                f"{stage.name}: input file {path} does not exist (relative paths are resolved from "
                f"the current directory {Path.cwd()}); fix the path in the recipe"
            )
        h.update(f"{path}:{file_digest(p)}".encode())
    for dep in stage.deps_for(cfg):
        out = cfg.run.run_dir / dep
        if not (out / "stage.json").is_file():
            raise RuntimeError(
                f"stage {stage.name!r} needs the output of {dep!r}, which is missing in {out}: "
                f"run `frontierlm {dep} RECIPE` (or `frontierlm run RECIPE`) first"
            )
        h.update(f"{dep}:{read_record(out)['fingerprint']}".encode())
    return h.hexdigest()[:16]


def run_stage(cfg: RecipeConfig, name: str, force: bool = False) -> dict[str, Any]:
    """Run one stage unless its output is current; return its stage record."""
    if launched_world_size() > 1:
        init_distributed(cfg.run)
    stage = STAGES[name]
    if not stage.enabled(cfg):
        raise ValueError(
            f"the {name} stage is not configured: add a [{name}] table to the recipe "
            f"(e.g. recipes/rl-arithmetic.toml, recipes/quickstart-synth.toml)"
        )
    w = world()
    if w.size > 1 and not stage.distributed:
        if w.main:
            _run_stage(cfg, stage, force, main=True, together=False)
        barrier()  # the others wait for rank 0's output
        return read_record(cfg.run.run_dir / name)
    record = _run_stage(cfg, stage, force, main=w.main, together=w.size > 1)
    barrier()  # the stage directory is committed before any process moves on
    return record


def _run_stage(
    cfg: RecipeConfig, stage: Stage, force: bool, main: bool, together: bool
) -> dict[str, Any]:
    """The stage on this process. `main`: this process prepares and commits the stage directory
    (the only process outside torchrun); `together`: every process runs the stage."""
    sync = barrier if together else lambda: None
    name = stage.name
    run_dir = cfg.run.run_dir
    out = run_dir / name
    fp = fingerprint(cfg, stage)
    if not force and (out / "stage.json").is_file() and read_record(out)["fingerprint"] == fp:
        console.print(f"[green]✓ {name}[/] up to date, skipped")
        return read_record(out)
    work = run_dir / f"{name}.partial"
    marker = work / "fingerprint"
    if main:
        if work.exists() and (force or not marker.is_file() or marker.read_text() != fp):
            shutil.rmtree(work)
        work.mkdir(parents=True, exist_ok=True)
        marker.write_text(fp)
        write_text(run_dir / "config.json", cfg.model_dump_json(indent=2))
    sync()  # the other processes start once the work directory is ready
    console.rule(f"[bold]{name}[/]: {stage.summary}")
    started = datetime.now(UTC).isoformat(timespec="seconds")
    t0 = time.perf_counter()
    metrics = stage.function()(StageContext(cfg=cfg, stage=stage, work_dir=work))
    sync()  # every process has written what it writes into the work directory
    record = {
        "stage": name,
        "fingerprint": fp,
        "started": started,
        "wall_s": round(time.perf_counter() - t0, 3),
        "key_metric": stage.key_metric,
        "metrics": metrics,
    }
    if main:
        (work / "stage.json").write_text(json.dumps(record, indent=2))
        marker.unlink()
        commit_dir(work, out)
    shown = f"{stage.key_metric}={metrics.get(stage.key_metric)}" if stage.key_metric else ""
    console.print(f"[green]✓ {name}[/] done in {record['wall_s']:.1f}s {shown}")
    return record


def run_pipeline(cfg: RecipeConfig, force: bool = False) -> None:
    for name, stage in STAGES.items():
        if not stage.in_pipeline:
            continue
        if not stage.enabled(cfg):
            console.print(f"[dim]- {name}: no \\[{name}] table in the recipe, not run")
            continue
        run_stage(cfg, name, force=force)
