"""`frontierlm diloco RECIPE` (or pretrain.mode = "diloco"): start the islands and see them
through.

The launcher hosts the run's TCPStore (the islands' rendezvous; in async mode also their
transport and heartbeats), starts diloco.processes_per_island processes per island (`python -m
frontierlm.distributed.island WORK_DIR ISLAND LOCAL_RANK`, data parallel inside the island), and
in async mode runs the coordinator that owns the global weights. Synchronous islands need each
other: one that fails ends the run; rerun the same command and the islands resume from the last
step at which all of them checkpointed (island checkpoints and outer states, see diloco.py).
Asynchronous islands do not: one that dies is dropped and the run goes on; restarted by hand
(the command is printed), it rejoins. A killed asynchronous launcher resumes from the state its
coordinator saved (`coordinator.pt`, see async_islands.py) when the same command is rerun. At
the end the launcher evaluates the global model on the held-out windows and writes it to
`model/` like the pretrain stage.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch
from torch.distributed import TCPStore

from frontierlm.atomic import write_text
from frontierlm.console import console
from frontierlm.distributed.async_islands import Coordinator
from frontierlm.distributed.diloco import OUTER_STATE, flat, outer_state_steps, unflatten_into
from frontierlm.distributed.island import JOB_FILE, island_plan, store_timeout
from frontierlm.distributed.quantize import Codec
from frontierlm.model import Transformer
from frontierlm.stages import StageContext
from frontierlm.tokenizer.train import BOS, load_tokenizer
from frontierlm.train.checkpoint import (
    STEP_PREFIX,
    list_checkpoints,
    load_model_dir,
    save_model_dir,
)
from frontierlm.train.metrics import MetricsLog
from frontierlm.train.parallel import launched_world_size
from frontierlm.train.pretrain import val_bpb_fn


def _check(cfg) -> None:
    d, loop = cfg.diloco, cfg.pretrain
    k = d.processes_per_island
    if launched_world_size() > 1:
        raise ValueError(
            "diloco starts its own processes: run `frontierlm diloco RECIPE` as one process, not "
            "under torchrun; for islands of several processes set diloco.processes_per_island"
        )
    if loop.mixture and d.mode == "async":
        raise NotImplementedError(
            "pretrain.mixture with diloco.mode = 'async' is not built yet (issue 9): islands of "
            "different speeds reach a stage boundary at different times; use diloco.mode = "
            "'sync' for a data mixture"
        )
    if loop.batch_size % (d.islands * k):
        raise ValueError(
            f"pretrain.batch_size={loop.batch_size} does not divide by diloco.islands="
            f"{d.islands} x diloco.processes_per_island={k}: it is the global batch, of which "
            "each island takes an equal share and each of its processes an equal part of that"
        )


def resume_step(work_dir: Path, islands: int, processes: int) -> int:
    """The last step at which every island left both its checkpoint and the outer state of each
    of its processes (0: none, start over); what any island holds past it is removed, so that
    every island's training loop resumes from that step."""
    roots = [work_dir / "islands" / str(i) for i in range(islands)]
    common: set[int] | None = None
    for root in roots:
        steps = {
            int(c.name.removeprefix(STEP_PREFIX)) for c in list_checkpoints(root / "checkpoints")
        }
        steps &= set(outer_state_steps(root / "outer", processes))
        common = steps if common is None else common & steps
    step = max(common or {0})
    for root in roots:
        for checkpoint in list_checkpoints(root / "checkpoints"):
            if int(checkpoint.name.removeprefix(STEP_PREFIX)) > step:
                shutil.rmtree(checkpoint)
        for path in (root / "outer").glob("step_*.pt"):  # incomplete sets of ranks too
            match = OUTER_STATE.fullmatch(path.name)
            if match and int(match[1]) > step:
                path.unlink()
    return step


COORDINATOR_STATE = "coordinator.pt"


def run_diloco_stage(ctx: StageContext) -> dict[str, float]:
    cfg, work_dir = ctx.cfg, ctx.work_dir
    d = cfg.diloco
    _check(cfg)
    started = time.perf_counter()
    store = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                     timeout=store_timeout(cfg))  # fmt: skip
    job = {"config": cfg.model_dump(mode="json"), "host": "127.0.0.1", "port": store.port}
    write_text(work_dir / JOB_FILE, json.dumps(job))
    torch.manual_seed(cfg.run.seed)
    tok = load_tokenizer(ctx.path("tokenizer"))
    model = Transformer(cfg.model, tok.get_vocab_size())
    state = work_dir / COORDINATOR_STATE
    if d.mode == "sync":
        resumed = resume_step(work_dir, d.islands, d.processes_per_island)
        if resumed:
            console.print(f"[yellow]diloco: resuming every island from step {resumed}")
    else:
        resumed = state.is_file()
    if not resumed:  # a rerun starts over: nothing any island wrote counts
        for name in ("diloco.jsonl", "events.jsonl", COORDINATOR_STATE):
            (work_dir / name).unlink(missing_ok=True)
        for i in range(d.islands):
            for part in ("checkpoints", "outer"):
                shutil.rmtree(work_dir / "islands" / str(i) / part, ignore_errors=True)
    coordinator, thread = None, None
    if d.mode == "async":
        coordinator = Coordinator(
            store,
            flat([p for p in model.parameters() if p.requires_grad]),
            d.islands,
            Codec(d.codec, d.block_size),
            outer_lr=d.outer_lr,
            outer_momentum=d.outer_momentum,
            staleness_power=d.staleness_power,
            timeout_s=d.timeout_s,
            rejoin_wait_s=d.rejoin_wait_s,
            events=MetricsLog(work_dir / "events.jsonl"),
            state_path=state,
            checkpoint_every=cfg.pretrain.checkpoint_every,
        )
        if resumed:
            coordinator.load_state()
            console.print(
                f"[yellow]diloco: resuming the coordinator from version {coordinator.version}, "
                f"islands at steps {list(coordinator.positions.values())}"
            )
        thread = threading.Thread(target=coordinator.run, name="diloco-coordinator", daemon=True)
        thread.start()
    processes: dict[int, list[subprocess.Popen]] = {}
    for i in range(d.islands):
        island_dir = work_dir / "islands" / str(i)
        island_dir.mkdir(parents=True, exist_ok=True)
        if not resumed:  # resumed: each island's loop cuts its log at the step it resumes from
            (island_dir / "metrics.jsonl").unlink(missing_ok=True)
            (island_dir / "events.jsonl").unlink(missing_ok=True)
        processes[i] = []
        if coordinator is not None and i in coordinator.finished:
            continue  # finished before the launcher was killed
        for rank in range(d.processes_per_island):
            # A resumed island's log goes on; a fresh run's starts empty.
            name = "log.txt" if rank == 0 else f"log.{rank}.txt"
            log = (island_dir / name).open("a" if resumed else "w")
            command = [sys.executable, "-m", "frontierlm.distributed.island", str(work_dir),
                       str(i), str(rank)]  # fmt: skip
            processes[i].append(
                subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=os.environ)
            )
        write_text(island_dir / "pid", str(processes[i][0].pid))
    console.print(
        f"diloco: {d.islands} {d.mode} islands of {d.processes_per_island} process(es) "
        f"(H={d.inner_steps}, fragments={d.fragments}, codec={d.codec}); "
        f"logs in {work_dir}/islands/*/log.txt"
    )
    if d.mode == "async":
        command = f"python -m frontierlm.distributed.island {work_dir} I"
        if d.processes_per_island > 1:  # all of the island's processes, each once
            command = f"for R in {{0..{d.processes_per_island - 1}}}; do {command} $R & done"
        console.print(f"  restart a dead island I with: {command}")
    failed = _watch(processes, d.mode, coordinator, thread)
    wall_s = time.perf_counter() - started
    if d.mode == "sync":
        if failed:
            raise RuntimeError(
                f"diloco: island(s) {failed} failed (see {work_dir}/islands/N/log.txt); "
                "synchronous islands need each other, so the run stopped; rerun the same command "
                "to resume from the islands' last common checkpoint (pretrain.checkpoint_every)"
            )
        model = load_model_dir(work_dir / "islands" / "0" / "model")
    else:
        with torch.no_grad():
            unflatten_into(coordinator.weights, [p for p in model.parameters() if p.requires_grad])
    return _finish(ctx, model, wall_s, coordinator)


def _watch(
    processes: dict[int, list[subprocess.Popen]],
    mode: str,
    coordinator,
    thread: threading.Thread | None,
) -> list[int]:
    """Wait for the islands; sync: stop all when one process fails; async: until the coordinator
    is done (a dead island is its business). Returns the islands with a failed process."""
    failed: list[int] = []
    every = [proc for procs in processes.values() for proc in procs]
    while True:
        for i, procs in processes.items():
            codes = [proc.poll() for proc in procs]
            if any(code not in (None, 0) for code in codes) and i not in failed:
                failed.append(i)
                console.print(f"[red]diloco: island {i} exited with {codes}")
                if coordinator is not None and i not in coordinator.alive | coordinator.finished:
                    coordinator.dropped.add(i)  # died before it ever joined
        if mode == "sync" and failed:
            for proc in every:
                if proc.poll() is None:
                    proc.terminate()
            for proc in every:
                proc.wait()
            return failed
        if mode == "sync" and all(proc.poll() is not None for proc in every):
            return failed
        if mode == "async" and not thread.is_alive():
            for proc in every:
                proc.wait()
            return failed
        time.sleep(0.2)


def _finish(ctx: StageContext, model: Transformer, wall_s: float, coordinator) -> dict[str, float]:
    cfg, work_dir, d, loop = ctx.cfg, ctx.work_dir, ctx.cfg.diloco, ctx.cfg.pretrain
    device = ctx.device
    model.to(device)
    model.eval()
    bos_id = load_tokenizer(ctx.path("tokenizer")).token_to_id(BOS) if loop.document_mask else None
    with torch.no_grad():
        evals = val_bpb_fn(ctx, loop, loop.eval_batches, device, bos_id)(model)
    save_model_dir(work_dir / "model", model.cpu())
    metrics: dict[str, float] = {f"val_{k}": v for k, v in evals.items()}
    plan = island_plan(cfg)
    totals = {"bytes_sent": 0, "bytes_received": 0, "tokens": 0}
    solo_tokens_per_s = 0.0
    islands_tokens_per_s = 0.0
    for i in range(d.islands):
        records = MetricsLog(work_dir / "islands" / str(i) / "metrics.jsonl").read()
        if not records:
            continue
        last = records[-1]
        # The island's own rate over its training steps (exchanges and waits included, process
        # start-up and evaluations not): what the islands together deliver while they train.
        span = sum(r["step_s"] for r in records if "step_s" in r)
        islands_tokens_per_s += len(records) * plan[i]["batch"] * loop.seq_len / span
        tokens = last["step"] * plan[i]["batch"] * loop.seq_len * loop.grad_accum
        metrics[f"island{i}_span_s"] = span
        keys = ("bytes_sent", "bytes_received", "compute_s", "comm_s", "comm_exposed_s", "wait_s")
        for key in keys:
            metrics[f"island{i}_{key}"] = float(last.get(key, 0.0))
        metrics[f"island{i}_steps"] = float(last["step"])
        totals["bytes_sent"] += last.get("bytes_sent", 0)
        totals["bytes_received"] += last.get("bytes_received", 0)
        totals["tokens"] += tokens
        if last.get("compute_s"):  # what the island would do alone: compute, no comms
            solo_tokens_per_s += tokens / last["compute_s"]
    metrics |= {k: float(v) for k, v in totals.items()}
    metrics["wall_s"] = wall_s
    metrics["tokens_per_s"] = totals["tokens"] / wall_s
    metrics["islands_tokens_per_s"] = islands_tokens_per_s
    metrics["solo_tokens_per_s_sum"] = solo_tokens_per_s
    if coordinator is not None:
        metrics["outer_steps"] = float(coordinator.version)
        metrics["contributed_tokens"] = float(coordinator.tokens)
        metrics["dropped_islands"] = float(len(coordinator.dropped))
    console.print(
        f"diloco: val bpb {metrics.get('val_bpb', float('nan')):.4f}, "
        f"{totals['bytes_sent'] / 1e6:,.1f} MB sent by all islands, {wall_s:.0f}s"
    )
    return metrics
