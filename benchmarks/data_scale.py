"""Benchmark: the data stage on a corpus larger than this machine's patience for RAM.

Synthesises a JSONL corpus of `--gb` gigabytes from the real text the project ships (WikiText,
Shakespeare, GSM8K, Common Crawl extracts), each copy of a document mutated by replacing a
random share of its words (uniform in [0, 0.5] per copy, seeded), so a few percent of the copies
are near-duplicates (Jaccard >= 0.8 of word 5-grams) and some are exact copies. Then it runs the
data stage (length/alpha filters, exact dedup and MinHash on) in a child process, twice:

1. it kills the run (SIGKILL to the whole process group) once half of the per-file tasks are done;
2. it restarts the same run, which must reuse every finished task (their done marks and outputs
   untouched) and finish.

Reported: corpus size, documents in/out per step, wall time of each run, the peak memory of the
whole process tree (sampled every 0.2 s: the main process plus its pool workers, summed), as
anonymous memory (what the run holds) and as resident pages including the memory-mapped scratch
files (page cache the kernel can drop), and the tasks reused. Baseline in the same run: the
corpus size (the issue's bar is peak <= 4 GiB for >= 2 GB).

    python benchmarks/data_scale.py [--gb 2.0] [--files 64] [--workers 2] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
from _runs import ROOT

DATA = ROOT / "data"
CHILD = """
import json, sys
from pathlib import Path
from frontierlm.config import DataConfig
from frontierlm.data import run_data_stage
cfg = DataConfig.model_validate_json(Path(sys.argv[1]).read_text())
print(json.dumps(run_data_stage(cfg, Path(sys.argv[2]))), flush=True)
"""


def base_documents() -> list[str]:
    import gzip

    docs: list[str] = []
    for name in ("valid.txt",):
        text = (DATA / "wikitext-2" / name).read_text(encoding="utf-8")
        docs += [a for a in text.split("\n = ") if len(a) > 500]
    play = (DATA / "tinyshakespeare" / "input.txt").read_text(encoding="utf-8")
    docs += [play[i : i + 3000] for i in range(0, len(play), 3000)]
    with gzip.open(DATA / "gsm8k" / "train.jsonl.gz", "rt", encoding="utf-8") as f:
        docs += [f"{r['question']}\n{r['answer']}" for r in map(json.loads, f)]
    for line in (DATA / "web" / "cc_en_head-0091.jsonl").read_text(encoding="utf-8").splitlines():
        docs.append(json.loads(line)["text"])
    return docs


def synthesise(out: Path, gb: float, files: int, seed: int) -> tuple[int, int]:
    """Write `files` JSONL files totalling about `gb` GB; returns (documents, bytes)."""
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    base = [np.array(d.split(), dtype=object) for d in base_documents()]
    vocab = np.concatenate(base[:2000])
    target = int(gb * 1e9)
    per_file = target // files
    n_docs = n_bytes = 0
    for i in range(files):
        path = out / f"part-{i:04d}.jsonl"
        written = 0
        with open(path, "w", encoding="utf-8") as f:
            while written < per_file:
                words = base[int(rng.integers(len(base)))]
                share = 0.0 if rng.random() < 0.02 else rng.random() * 0.5  # 2% exact copies
                hit = rng.random(len(words)) < share
                if hit.any():
                    words = words.copy()
                    words[hit] = vocab[rng.integers(len(vocab), size=int(hit.sum()))]
                line = json.dumps({"text": " ".join(words)}, ensure_ascii=False) + "\n"
                f.write(line)
                written += len(line.encode("utf-8"))
                n_docs += 1
        n_bytes += written
    return n_docs, n_bytes


def _rss_kib(pid: int) -> tuple[int, int]:
    """(resident KiB, of which anonymous KiB) of one process. The rest of the resident set is
    file pages mapped from the scratch files (MinHash's signatures and shingles are memory
    maps): page cache the kernel drops under pressure, not memory the run holds."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon"):
            fields[key] = int(value.split()[0])
    return fields.get("VmRSS", 0), fields.get("RssAnon", 0)


def run_child(cfg_path: Path, out: Path, kill_after_tasks: int | None) -> dict:
    """Run the stage in a child process group, sampling its tree's memory; optionally kill it
    once `kill_after_tasks` done marks exist."""
    env = dict(os.environ, PYTHONPATH=f"{ROOT}:{os.environ.get('PYTHONPATH', '')}")
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(cfg_path), str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env=env,
        start_new_session=True,
    )
    proc = psutil.Process(child.pid)
    peak = peak_anon = 0
    start = time.perf_counter()
    killed = False
    while child.poll() is None:
        try:
            tree = [proc, *proc.children(recursive=True)]
            rss = [_rss_kib(p.pid) for p in tree]
            peak = max(peak, sum(total for total, _ in rss) * 1024)
            peak_anon = max(peak_anon, sum(anon for _, anon in rss) * 1024)
        except (psutil.NoSuchProcess, FileNotFoundError, ProcessLookupError):
            pass
        if kill_after_tasks is not None:
            marks = list((out / "tasks").glob("task-*.json"))
            if len(marks) >= kill_after_tasks:
                os.killpg(child.pid, signal.SIGKILL)
                child.wait()
                killed = True
                break
        time.sleep(0.2)
    wall = time.perf_counter() - start
    output = child.stdout.read().decode() if child.stdout else ""
    result = {
        "wall_s": round(wall, 1),
        "peak_rss_gib": round(peak / 2**30, 3),
        "peak_anon_gib": round(peak_anon / 2**30, 3),
        "killed": killed,
    }
    if not killed:
        if child.returncode != 0:
            raise SystemExit(f"the data stage failed (exit {child.returncode})")
        result["totals"] = json.loads(output.strip().splitlines()[-1])
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--gb", type=float, default=2.0)
    parser.add_argument("--files", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dir", default="runs/bench-data-scale")
    parser.add_argument("--out", default="benchmarks/out/data_scale.json")
    parser.add_argument("--keep", action="store_true", help="keep the corpus and the output")
    args = parser.parse_args()
    from frontierlm.config import DataConfig, DataSource

    work = ROOT / args.dir
    corpus = work / "corpus"
    t0 = time.perf_counter()
    made_mark = work / "corpus.json"  # beside the corpus: inside, it would be read as input
    if made_mark.is_file():
        made = json.loads(made_mark.read_text())
    else:
        docs, size = synthesise(corpus, args.gb, args.files, args.seed)
        made = {"docs": docs, "bytes": size}
        made_mark.write_text(json.dumps(made))
    synth_s = time.perf_counter() - t0
    print(f"corpus: {made['docs']:,} documents, {made['bytes'] / 1e9:.2f} GB ({synth_s:.0f}s)")
    cfg = DataConfig(
        sources=[DataSource(name="synthetic", path=str(corpus), format="jsonl")],
        minhash=True,
        workers=args.workers,
        shard_bytes=256 << 20,
    )
    cfg_path = work / "config.json"
    cfg_path.write_text(cfg.model_dump_json())
    out = work / "out"
    if out.exists():
        import shutil

        shutil.rmtree(out)
    out.mkdir(parents=True)
    first = run_child(cfg_path, out, kill_after_tasks=args.files // 2)
    marks = sorted((out / "tasks").glob("task-*.json"))
    before = {p.name: p.stat().st_mtime_ns for p in marks}
    outputs = {p.name: p.stat().st_mtime_ns for p in (out / "tasks").glob("task-*.jsonl.gz")}
    print(f"killed after {first['wall_s']}s with {len(marks)} of {args.files} tasks done")
    # Resume: snapshot the finished tasks' files as the second run finds them.
    second = run_child(cfg_path, out, kill_after_tasks=None)
    stats = json.loads((out / "stats.json").read_text())
    reused = stats["executor"]["tasks_reused"]
    steps = stats["steps"]
    print(f"\n{'step':<14}{'in':>12}{'out':>12}{'seconds':>10}  dropped")
    for s in steps:
        print(f"{s['step']:<14}{s['in']:>12,}{s['out']:>12,}{s['seconds']:>10.1f}  {s['dropped']}")
    peak = max(first["peak_rss_gib"], second["peak_rss_gib"])
    peak_anon = max(first["peak_anon_gib"], second["peak_anon_gib"])
    print(
        f"\nfirst run (killed): {first['wall_s']}s; resumed run: {second['wall_s']}s, reused "
        f"{reused} of {stats['executor']['tasks']} tasks ({len(before)} were done at the kill)"
    )
    gib_in = made["bytes"] / 2**30
    print(f"{'peak of the process tree':<34}{'GiB':>8}{'/ input GiB':>13}")
    print(f"{'anonymous (memory held)':<34}{peak_anon:>8.3f}{peak_anon / gib_in:>13.3f}")
    print(f"{'resident incl. mapped scratch':<34}{peak:>8.3f}{peak / gib_in:>13.3f}")
    payload = {
        "date": time.strftime("%Y-%m-%d"),
        "corpus": made,
        "synth_s": round(synth_s, 1),
        "workers": args.workers,
        "first_run": first,
        "resumed_run": second,
        "tasks_done_at_kill": len(before),
        "task_outputs_at_kill": len(outputs),
        "tasks_reused": reused,
        "peak_rss_gib": peak,
        "peak_anon_gib": peak_anon,
        "steps": steps,
        "totals": stats["totals"],
    }
    path = ROOT / args.out
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2))
    print(f"wrote {path}")
    if not args.keep:
        import shutil

        shutil.rmtree(out)


if __name__ == "__main__":
    main()
