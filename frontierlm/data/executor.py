"""Executors: run the data steps over many input files at once, resumably.

The work is cut in two phases (the cut is at the first step with `whole_stream = True`):

1. **Tasks**, in parallel: one task per input file (per source when `max_docs` caps a source,
   since the cap counts across its files) reads its documents and runs every step before the cut
   (length, alpha, the heuristic filters: the expensive, per-document part). It writes the
   survivors to `tasks/task-NNNNN.jsonl.gz` and, last, its counts to `task-NNNNN.json`: that file
   is the task's "done" mark, written atomically, so a killed run redoes only unfinished tasks.
2. **The stream**, in this process: the task outputs are read back in task order, which is the
   order of the sources and of their files, and go through the remaining steps (exact dedup,
   MinHash, ...) into the final shards.

A task's output is a pure function of its input file and the config, and phase 2 reads tasks in
a fixed order, so the shards are byte-identical whatever runs the tasks: this process
(`workers = 1`), a local process pool (`executor = "local"`, the default) or Ray
(`executor = "ray"`).
"""

from __future__ import annotations

import functools
import json
import multiprocessing
import os
import shutil
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from frontierlm.atomic import atomic_file, write_text
from frontierlm.config import DataConfig, DataSource
from frontierlm.data.documents import Document, JsonlShard, SourceStats, read_shard
from frontierlm.data.pipeline import Step, StepStats, run_steps
from frontierlm.data.readers import SourceFile, read_files

TASK_DIR = "tasks"


@dataclass(frozen=True)
class ReadTask:
    index: int
    source: DataSource
    files: tuple[SourceFile, ...]

    @property
    def bytes(self) -> int:
        return sum(f.size for f in self.files)

    def output(self, work_dir: Path) -> Path:
        return work_dir / TASK_DIR / f"task-{self.index:05d}.jsonl.gz"

    def done_mark(self, work_dir: Path) -> Path:
        return work_dir / TASK_DIR / f"task-{self.index:05d}.json"


@dataclass
class TaskResult:
    index: int
    source: SourceStats
    steps: list[StepStats]
    # True when a finished task of an earlier (killed) run was taken as it was.
    reused: bool = False


def plan_tasks(sources: list[DataSource], files: list[list[SourceFile]]) -> list[ReadTask]:
    tasks: list[ReadTask] = []
    for source, source_files in zip(sources, files, strict=True):
        if source.max_docs is not None:
            groups = [tuple(source_files)]  # the cap counts over all of the source's files
        else:
            groups = [(f,) for f in source_files]
        for group in groups:
            tasks.append(ReadTask(len(tasks), source, group))
    return tasks


def split_steps(steps: list[Step]) -> tuple[list[Step], list[Step]]:
    """(the per-document steps that tasks run, the steps from the first whole-stream one on)."""
    cut = next((i for i, step in enumerate(steps) if step.whole_stream), len(steps))
    return steps[:cut], steps[cut:]


def run_task(
    task: ReadTask, cfg: DataConfig, work_dir: Path, reader_workers: int = 1
) -> TaskResult:
    """Read one task's files through the per-document steps; skip it when already done."""
    mark = task.done_mark(work_dir)
    if mark.is_file():
        result = _result_from_json(json.loads(mark.read_text(encoding="utf-8")))
        result.reused = True
        return result
    out = task.output(work_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    stats = SourceStats(task.source.name)
    docs = read_files(task.source, list(task.files), stats, reader_workers)
    docs, step_stats = run_steps(docs, _task_steps(cfg))
    with atomic_file(out) as raw:
        # Level 1: an intermediate file read once; level 6 costs 3x the time for 20% bytes.
        shard = JsonlShard(raw, level=1)
        try:
            for doc in docs:
                shard.add(doc)
        finally:
            shard.close()
    result = TaskResult(task.index, stats, step_stats)
    # Last, and atomic: the task counts as done only with its output in place.
    write_text(mark, json.dumps(_result_to_json(result)))
    return result


@functools.cache
def _cached_task_steps(cfg_json: str) -> list[Step]:
    from frontierlm.data import build_steps  # the package imports this module

    return split_steps(build_steps(DataConfig.model_validate_json(cfg_json)))[0]


def _task_steps(cfg: DataConfig) -> list[Step]:
    """The per-document steps, built once per worker process: building can be costly (the
    decontamination index, the quality model) and these steps keep no state between documents."""
    return _cached_task_steps(cfg.model_dump_json())


def read_task_output(task: ReadTask, work_dir: Path) -> Iterator[Document]:
    return read_shard(task.output(work_dir))


def run_tasks(
    tasks: list[ReadTask],
    cfg: DataConfig,
    work_dir: Path,
    on_done: Callable[[ReadTask, TaskResult], None] = lambda task, result: None,
) -> list[TaskResult]:
    """Run every task with the configured executor; results in task order."""
    workers = resolved_workers(cfg)
    _forget_other_configs(cfg, work_dir)
    pending = [t for t in tasks if not t.done_mark(work_dir).is_file()]
    results: dict[int, TaskResult] = {}
    for task in tasks:
        if task not in pending:
            results[task.index] = run_task(task, cfg, work_dir)
            on_done(task, results[task.index])
    if cfg.executor == "ray":
        for task, result in _run_on_ray(pending, cfg, work_dir, workers):
            results[task.index] = result
            on_done(task, result)
    elif workers == 1 or len(pending) <= 1:
        # One task at a time: its WARC extraction may use every worker process itself.
        for task in pending:
            results[task.index] = run_task(task, cfg, work_dir, reader_workers=workers)
            on_done(task, results[task.index])
    else:
        # forkserver: a fork of this process would copy the progress bar's thread and locks.
        context = multiprocessing.get_context("forkserver")
        with ProcessPoolExecutor(min(workers, len(pending)), mp_context=context) as pool:
            # Largest first, so one big file does not start last and run alone.
            order = sorted(pending, key=lambda t: -t.bytes)
            futures = {t.index: pool.submit(run_task, t, cfg, work_dir) for t in order}
            for task in pending:
                results[task.index] = futures[task.index].result()
                on_done(task, results[task.index])
    return [results[t.index] for t in tasks]


def _forget_other_configs(cfg: DataConfig, work_dir: Path) -> None:
    """Finished tasks count only for the config that made them (the stage runner also wipes
    its work directory on a config change; this guards direct callers)."""
    task_dir = work_dir / TASK_DIR
    # What a task's output depends on; the executor and worker count do not change it.
    made_by = cfg.model_dump_json(exclude={"executor", "workers", "ray_address"})
    stamp = task_dir / "config.json"
    if task_dir.exists() and (not stamp.is_file() or stamp.read_text(encoding="utf-8") != made_by):
        shutil.rmtree(task_dir)
    task_dir.mkdir(parents=True, exist_ok=True)
    if not stamp.is_file():
        stamp.write_text(made_by, encoding="utf-8")


def resolved_workers(cfg: DataConfig) -> int:
    return cfg.workers or os.cpu_count() or 1


def _run_on_ray(
    tasks: list[ReadTask], cfg: DataConfig, work_dir: Path, workers: int
) -> Iterator[tuple[ReadTask, TaskResult]]:
    try:
        import ray
    except ImportError as err:
        raise NotImplementedError(
            "data.executor = 'ray' needs Ray: pip install 'frontierlm[ray]'"
        ) from err
    if not ray.is_initialized():
        # An address joins a running cluster (whose nodes must see work_dir, e.g. a shared
        # file system); without one, a local Ray with this machine's cores.
        if cfg.ray_address:
            ray.init(address=cfg.ray_address, log_to_driver=False)
        else:
            ray.init(num_cpus=workers, log_to_driver=False, include_dashboard=False)
    remote = ray.remote(num_cpus=1)(run_task)
    # Largest first, as for the process pool; results are taken in task order.
    refs = {t.index: remote.remote(t, cfg, work_dir) for t in sorted(tasks, key=lambda t: -t.bytes)}
    for task in tasks:
        yield task, ray.get(refs[task.index])


# ----------------------------------------------------------------------------- stats as JSON


def _result_to_json(result: TaskResult) -> dict[str, Any]:
    source = {f.name: getattr(result.source, f.name) for f in fields(result.source)}
    return {
        "index": result.index,
        "source": source,
        "steps": [
            {
                "name": s.name,
                "docs_in": s.docs_in,
                "docs_out": s.docs_out,
                "dropped": s.dropped,
                "dropped_by_source": [[src, r, n] for (src, r), n in s.dropped_by_source.items()],
                "counts": s.counts,
                "seconds": s.seconds,
            }
            for s in result.steps
        ],
    }


def _result_from_json(data: dict[str, Any]) -> TaskResult:
    source = SourceStats(**data["source"])
    source.malformed_by_reason = Counter(source.malformed_by_reason)
    steps = []
    for s in data["steps"]:
        stats = StepStats(s["name"], s["docs_in"], s["docs_out"], Counter(s["dropped"]))
        stats.dropped_by_source = Counter({(src, r): n for src, r, n in s["dropped_by_source"]})
        stats.counts = Counter(s["counts"])
        stats.seconds = s["seconds"]
        steps.append(stats)
    return TaskResult(data["index"], source, steps)
