"""One island: K processes (diloco.processes_per_island; one by default) that run the ordinary
pretraining loop on the island's share of the data, data parallel among themselves as a torchrun
job would (run.parallel: DDP or FSDP2), with DiLoCo's outer loop around it. Started by the
launcher (launch.py), one command per process (LOCAL_RANK defaults to 0); an asynchronous island
that died can be restarted by hand while the run goes on, all K of its processes (each once):

    python -m frontierlm.distributed.island runs/NAME/diloco.partial ISLAND [LOCAL_RANK]

It reads the job the launcher wrote (`diloco_job.json`: config, store address), pulls the newest
global weights and the data position it owns, and continues.
"""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed import PrefixStore, Store, TCPStore

from frontierlm.config import PretrainConfig, RecipeConfig
from frontierlm.distributed.async_islands import AsyncIsland
from frontierlm.distributed.diloco import DilocoSync
from frontierlm.distributed.quantize import Codec
from frontierlm.distributed.wan import Wan
from frontierlm.model import Transformer
from frontierlm.stages import STAGES, StageContext
from frontierlm.tokenizer.shards import TokenSplit
from frontierlm.tokenizer.train import BOS, load_tokenizer
from frontierlm.train.loop import Batch, TrainTask, train
from frontierlm.train.metrics import MetricsLog
from frontierlm.train.mixture import MixtureWindows
from frontierlm.train.parallel import join_process_group, shutdown_distributed
from frontierlm.train.pretrain import ShuffledWindows, lm_loss, tracked_sources, val_bpb_fn

JOB_FILE = "diloco_job.json"


def island_plan(cfg: RecipeConfig) -> list[dict[str, int]]:
    """Per island: sequences per inner step, inner steps in all, steps between syncs. Sync
    islands all run pretrain.steps; async ones share the same total tokens in proportion to
    their speed (1 / slowdown), and with dynamic_inner_steps sync after H / slowdown steps."""
    d, loop = cfg.diloco, cfg.pretrain
    wan = wan_of(cfg)
    batch = loop.batch_size // d.islands
    if d.mode == "sync":
        return [{"batch": batch, "steps": loop.steps, "inner": d.inner_steps}] * d.islands
    speeds = [1 / s for s in wan.slowdown]
    total = loop.steps * d.islands
    plan = []
    for s, speed in zip(wan.slowdown, speeds, strict=True):
        steps = max(1, round(total * speed / sum(speeds)))
        inner = max(1, round(d.inner_steps / s)) if d.dynamic_inner_steps else d.inner_steps
        plan.append({"batch": batch, "steps": steps, "inner": inner})
    return plan


def wan_of(cfg: RecipeConfig) -> Wan:
    d = cfg.diloco
    return Wan.build(d.islands, d.bandwidth_mbit, d.latency_ms, d.slowdown)


def store_timeout(cfg: RecipeConfig) -> timedelta:
    return timedelta(seconds=max(600.0, 4 * cfg.diloco.timeout_s))


def island_device(cfg: RecipeConfig, island: int, rank: int) -> torch.device:
    """A GPU per process while there are enough (an island's processes always on distinct
    ones, as NCCL needs); islands share GPUs round robin when there are more processes."""
    if cfg.run.device == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    gpus, k = torch.cuda.device_count(), cfg.diloco.processes_per_island
    if k > gpus:
        raise ValueError(
            f"diloco.processes_per_island={k} but {gpus} GPUs are visible: an island's "
            "processes need a GPU each; use at most that many, or run.device = 'cpu'"
        )
    return torch.device("cuda", (island * k + rank) % gpus)


def join_island(
    store: Store,
    island: int,
    islands: int,
    rank: int,
    processes: int,
    device: torch.device,
    timeout: timedelta,
) -> tuple[dist.ProcessGroup, dist.ProcessGroup | None]:
    """This process's groups, all from the run's store: with several processes per island, the
    island's own default group (which the training loop's DDP or FSDP2 runs on, as in a torchrun
    job) and a gloo group of the island for the outer step's traffic; and the cross-island gloo
    group of local rank `rank` of every island, over which the outer exchange goes. Returns
    (cross-island group, island group or None)."""
    island_group = None
    if processes > 1:
        join_process_group(device, PrefixStore(f"island{island}", store), rank, processes)
        island_group = dist.ProcessGroupGloo(
            PrefixStore(f"island{island}/outer", store), rank, processes, timeout
        )
    group = dist.ProcessGroupGloo(PrefixStore(f"islands/{rank}", store), island, islands, timeout)
    return group, island_group


def island_generation(store: Store, island: int, rank: int) -> int:
    """How many times local rank `rank` of `island` has started in this run (1 the first time):
    the processes of one start of an island, each starting once, agree on it without talking,
    and a restarted island's groups live under keys of their own, apart from the dead ones'."""
    return store.add(f"island{island}/starts/{rank}", 1)


def join_async_island(
    store: Store,
    island: int,
    rank: int,
    processes: int,
    device: torch.device,
    timeout: timedelta,
) -> dist.ProcessGroup | None:
    """An asynchronous island of several processes: its own default process group (DDP or FSDP2
    runs on it) and a gloo group over which local rank 0 hands the others what it pulled (and
    under FSDP2 gathers their shards' pseudo-gradients), both under this start's generation.
    Returns the gloo group (None for an island of one process)."""
    if processes == 1:
        return None
    generation = island_generation(store, island, rank)
    prefix = f"island{island}/g{generation}"
    join_process_group(device, PrefixStore(prefix, store), rank, processes)
    return dist.ProcessGroupGloo(PrefixStore(f"{prefix}/outer", store), rank, processes, timeout)


def island_timeout(cfg: RecipeConfig) -> timedelta:
    """How long an asynchronous island's processes wait for each other: past it, a process
    whose peer died gives up (and with it the island). Local rank 0 may spend up to 30 s waiting
    for the coordinator to apply a push while the others wait for its pull."""
    return timedelta(seconds=max(60.0, 2 * cfg.diloco.timeout_s))


def checkpoint_every(cfg: RecipeConfig) -> int:
    """Synchronous islands checkpoint (and so resume) at the first multiple of
    diloco.inner_steps at or past every pretrain.checkpoint_every steps, plus diloco.overlap
    steps (when the exchange launched at that multiple has landed; see diloco.py); not in async
    mode, whose islands rejoin from the coordinator's state instead."""
    d, every = cfg.diloco, cfg.pretrain.checkpoint_every
    if d.mode != "sync" or not every:
        return 0
    return -(-every // d.inner_steps) * d.inner_steps


def island_batches(
    loop: PretrainConfig,
    islands: int,
    island: int,
    split: TokenSplit,
    seed: int,
    bos_id: int | None = None,
) -> Callable[[int], Batch]:
    """Island `island`'s batch of each (micro-)step: together the islands read the stream data
    parallel would. Plain windows: island i owns batches i, i + M, i + 2M, ... of its batch
    size. A data mixture's stages are set in global steps, so every island deals the global
    batch of its step, as data parallel would, and keeps its own rows of it. `loop` is the
    run's (its batch_size the global batch)."""
    rows = loop.batch_size // islands
    sources = tracked_sources(split, loop)
    if loop.mixture:
        mixture = MixtureWindows(split, loop, seed, bos_id, sources is not None)
        mine = slice(island * rows, (island + 1) * rows)
        return lambda index: {key: value[mine] for key, value in mixture(index).items()}
    windows = ShuffledWindows(split.tokens, loop.seq_len, rows, seed, bos_id, sources)
    return lambda index: windows(index * islands + island)


def run_island(work_dir: Path, island: int, rank: int = 0) -> dict[str, float]:
    job = json.loads((work_dir / JOB_FILE).read_text())
    cfg = RecipeConfig.model_validate(job["config"])
    d = cfg.diloco
    k = d.processes_per_island
    if not 0 <= island < d.islands:
        raise ValueError(f"island {island} does not exist: this run has islands 0-{d.islands - 1}")
    if not 0 <= rank < k:
        raise ValueError(
            f"local rank {rank} does not exist: diloco.processes_per_island={k} (ranks 0-{k - 1})"
        )
    if d.threads:
        torch.set_num_threads(d.threads)
    device = island_device(cfg, island, rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    store = TCPStore(job["host"], job["port"], is_master=False, timeout=store_timeout(cfg))
    if d.mode == "sync":
        group, island_group = join_island(
            store, island, d.islands, rank, k, device, store_timeout(cfg)
        )
    else:
        island_group = join_async_island(store, island, rank, k, device, island_timeout(cfg))
    ctx = StageContext(cfg=cfg, stage=STAGES["diloco"], work_dir=work_dir)
    plan = island_plan(cfg)[island]
    every = checkpoint_every(cfg)
    loop = cfg.pretrain.model_copy(
        update={
            "batch_size": plan["batch"],
            "steps": plan["steps"],
            "checkpoint_every": every,
            "keep_checkpoints": max(2, cfg.pretrain.keep_checkpoints),
        }
    )
    torch.manual_seed(cfg.run.seed)  # the same initial weights on every island
    tok = load_tokenizer(ctx.path("tokenizer"))
    model = Transformer(cfg.model, tok.get_vocab_size())
    bos_id = tok.token_to_id(BOS) if loop.document_mask else None
    train_split = TokenSplit.open(ctx.path("tokenize"), "train")
    evaluate = val_bpb_fn(ctx, loop, loop.eval_batches, device, bos_id)
    task = TrainTask(
        name=f"island{island}",
        batch=island_batches(cfg.pretrain, d.islands, island, train_split, cfg.run.seed, bos_id),
        loss=functools.partial(lm_loss, source_names=train_split.source_names),
        evaluate=evaluate if island == 0 else (lambda model: {}),
    )
    wan, codec = wan_of(cfg), Codec(d.codec, d.block_size)
    island_dir = work_dir / "islands" / str(island)
    if d.mode == "sync":
        outer = DilocoSync(
            group,
            island,
            wan,
            inner_steps=plan["inner"],
            total_steps=plan["steps"],
            outer_lr=d.outer_lr,
            outer_momentum=d.outer_momentum,
            fragments=d.fragments,
            overlap=d.overlap,
            codec=codec,
            global_log=MetricsLog(work_dir / "diloco.jsonl") if island == rank == 0 else None,
            island_group=island_group,
            state_dir=island_dir / "outer",
            checkpoint_every=every,
            keep_states=loop.keep_checkpoints,
        )
    else:
        outer = AsyncIsland(
            store,
            island,
            wan,
            inner_steps=plan["inner"],
            total_steps=plan["steps"],
            tokens_per_step=loop.batch_size * loop.seq_len * loop.grad_accum,
            codec=codec,
            island_group=island_group,
        )
    # Island 0 (sync) writes the final global weights, which every island holds at the end.
    export = island == 0 and d.mode == "sync"
    try:
        return train(model, loop, task, island_dir, device, cfg.run, export=export, outer=outer)
    finally:
        shutdown_distributed()


def main(argv: list[str]) -> int:
    if len(argv) not in (2, 3) or not all(a.isdigit() for a in argv[1:]):
        print(
            "usage: python -m frontierlm.distributed.island WORK_DIR ISLAND [LOCAL_RANK]",
            file=sys.stderr,
        )
        return 2
    work_dir = Path(argv[0])
    if not (work_dir / JOB_FILE).is_file():
        print(f"error: {work_dir / JOB_FILE} not found: start the run with `frontierlm diloco`")
        return 1
    run_island(work_dir, *(int(a) for a in argv[1:]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
