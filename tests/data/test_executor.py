"""Executors: this process, a local process pool and Ray write the same bytes; a killed run
redoes no finished task."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from frontierlm.config import DataConfig, DataSource
from frontierlm.data import executor, run_data_stage
from frontierlm.data.documents import shard_paths


def many_files_config(repo_data: Path, tmp: Path, **overrides: object) -> DataConfig:
    """Six JSONL files of real GSM8K problems (two files share three problems, one has a broken
    line), a folder of Shakespeare pieces and two Common Crawl WARCs: 9+ tasks, with exact and
    near duplicates across files for the whole-stream steps."""
    with gzip.open(repo_data / "gsm8k/train.jsonl.gz", "rt", encoding="utf-8") as f:
        records = [json.loads(next(f)) for _ in range(60)]
    gsm = tmp / "gsm"
    gsm.mkdir()
    for part in range(6):
        chunk = records[part * 10 : part * 10 + 10]
        if part == 5:
            chunk = chunk + records[:3]  # exact repeats of part 0's first problems
        if part == 4:  # near repeats of part 1's first problems
            chunk = chunk + [dict(r, answer=r["answer"] + " Done.") for r in records[10:13]]
        lines = [json.dumps(r) for r in chunk] + (["{broken"] if part == 2 else [])
        (gsm / f"part-{part}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    plays = tmp / "plays"
    plays.mkdir()
    text = (repo_data / "tinyshakespeare/input.txt").read_text(encoding="utf-8")
    for i in range(3):
        (plays / f"play-{i}.txt").write_text(text[i * 4000 : (i + 1) * 4000], encoding="utf-8")
    fields: dict[str, object] = {
        "sources": [
            DataSource(
                name="gsm", path=str(gsm), text_template="Question: {question}\nAnswer: {answer}"
            ),
            DataSource(name="plays", path=str(plays)),
            DataSource(name="web", path=str(repo_data / "web/commoncrawl-sample-0000.warc.gz")),
            DataSource(name="web2", path=str(repo_data / "web/commoncrawl-sample-0001.warc.gz")),
        ],
        "min_chars": 100,
        "min_words": 20,
        "filters": ["gopher_repetition", "c4"],
        "minhash": True,
        "pii": True,
        "shard_docs": 16,
    }
    fields.update(overrides)
    return DataConfig(**fields)


def run(cfg: DataConfig, out: Path) -> tuple[dict[str, bytes], dict]:
    out.mkdir(parents=True, exist_ok=True)
    run_data_stage(cfg, out)
    shards = {p.name: p.read_bytes() for p in shard_paths(out)}
    stats = json.loads((out / "stats.json").read_text())
    return shards, stats


def without_timing(stats: dict, root: Path) -> dict:
    """stats.json minus what may differ between equal runs: times, how the work ran, and the
    temp directory the inputs were written to."""
    stats = json.loads(json.dumps(stats).replace(str(root), "<root>"))
    stats = dict(stats, seconds=None, executor=None)
    stats["steps"] = [dict(s, seconds=None) for s in stats["steps"]]
    return stats


@pytest.fixture(scope="module")
def inline_run(tmp_path_factory: pytest.TempPathFactory):
    repo_data = Path(__file__).resolve().parents[2] / "data"
    tmp = tmp_path_factory.mktemp("inline")
    cfg = many_files_config(repo_data, tmp, workers=1)
    shards, stats = run(cfg, tmp / "out")
    return shards, stats, without_timing(stats, tmp)


def test_inline_run_counts_every_task_and_step(inline_run) -> None:
    shards, stats, _ = inline_run
    assert stats["executor"] == {
        "name": "this process",
        "workers": 1,
        "tasks": 11,
        "tasks_reused": 0,
    }
    steps = {s["step"]: s for s in stats["steps"]}
    assert list(steps) == [
        *("length", "alpha", "gopher_repetition", "c4", "exact_dedup", "minhash", "pii")
    ]
    # The task steps' counts are the sums over tasks; the stream steps see what they left.
    assert steps["length"]["in"] == stats["totals"]["docs_in"] == 60 + 3 + 3 + 3 + 22 + 15
    assert steps["exact_dedup"]["in"] == steps["c4"]["out"]
    assert steps["exact_dedup"]["dropped"]["exact_duplicate"] >= 3
    assert steps["minhash"]["dropped"]["near_duplicate"] >= 3
    assert stats["totals"]["docs_out"] == steps["pii"]["out"] > 0
    assert stats["sources"]["gsm"]["malformed"] == 1
    assert stats["sources"]["gsm"]["files"] == 6
    assert all(s["seconds"] >= 0 for s in stats["steps"])
    assert steps["gopher_repetition"]["seconds"] > 0
    assert len(shards) == -(-stats["totals"]["docs_out"] // 16)


def test_process_pool_writes_the_same_bytes(repo_data: Path, tmp_path: Path, inline_run) -> None:
    shards, _, stats = inline_run
    pooled_shards, pooled_stats = run(
        many_files_config(repo_data, tmp_path, workers=2), tmp_path / "out"
    )
    assert pooled_stats["executor"]["name"] == "local"
    assert pooled_shards == shards
    assert without_timing(pooled_stats, tmp_path) == stats


def test_ray_writes_the_same_bytes(repo_data: Path, tmp_path: Path, inline_run) -> None:
    import ray

    shards, _, stats = inline_run
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        ray_shards, ray_stats = run(
            many_files_config(repo_data, tmp_path, executor="ray", workers=2), tmp_path / "out"
        )
    finally:
        ray.shutdown()
    assert ray_stats["executor"]["name"] == "ray"
    assert ray_shards == shards
    assert without_timing(ray_stats, tmp_path) == stats


def test_a_killed_run_redoes_no_finished_task(
    repo_data: Path, tmp_path: Path, inline_run, monkeypatch: pytest.MonkeyPatch
) -> None:
    shards, _, stats = inline_run
    cfg = many_files_config(repo_data, tmp_path, workers=1)
    out = tmp_path / "out"
    out.mkdir()
    real_run_task = executor.run_task

    def dies_at_task_4(task, *args, **kwargs):
        if task.index == 4:
            raise KeyboardInterrupt("killed")
        return real_run_task(task, *args, **kwargs)

    monkeypatch.setattr(executor, "run_task", dies_at_task_4)
    with pytest.raises(KeyboardInterrupt):
        run_data_stage(cfg, out)
    done = sorted(p.name for p in (out / executor.TASK_DIR).glob("task-*.json"))
    assert done == [f"task-{i:05d}.json" for i in range(4)]
    assert not list(out.glob("shard-*")) and not list(out.rglob(".tmp-*"))

    monkeypatch.setattr(executor, "run_task", real_run_task)
    resumed_shards, resumed_stats = run(cfg, out)
    assert resumed_stats["executor"]["tasks_reused"] == 4
    assert resumed_shards == shards
    assert without_timing(resumed_stats, tmp_path) == stats
    assert not (out / executor.TASK_DIR).exists()  # the shards hold everything now


def test_finished_tasks_of_another_config_are_not_reused(
    repo_data: Path, tmp_path: Path, inline_run
) -> None:
    shards, _, _ = inline_run
    cfg = many_files_config(repo_data, tmp_path, workers=1)
    out = tmp_path / "out"
    tasks = out / executor.TASK_DIR
    tasks.mkdir(parents=True)
    (tasks / "config.json").write_text(cfg.model_copy(update={"min_chars": 1}).model_dump_json())
    (tasks / "task-00000.json").write_text("left by a run with another config")
    rerun_shards, rerun_stats = run(cfg, out)
    assert rerun_stats["executor"]["tasks_reused"] == 0
    assert rerun_shards == shards
