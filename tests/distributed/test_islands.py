"""DiLoCo islands of several processes each (diloco.processes_per_island = K): DDP or FSDP2
inside an island, the outer exchange between islands only. M islands x K processes, gloo on CPU,
the real training loop, against islands of one process on the same global batch."""

from __future__ import annotations

import json
import multiprocessing
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch.distributed import TCPStore

from frontierlm.config import PretrainConfig, RunConfig
from frontierlm.distributed.diloco import DilocoSync, split_fragments
from frontierlm.distributed.island import join_island
from frontierlm.distributed.quantize import Codec, padded_length
from frontierlm.distributed.wan import Link, Wan
from frontierlm.train.metrics import MetricsLog

sys.path.insert(0, str(Path(__file__).parent.parent / "train"))
from loop_tasks import make_task, new_model

ISLANDS = 2
TIMEOUT_S = 180
PRELOAD = ["frontierlm.distributed.diloco", "frontierlm.train.loop"]
NO_WAN = Wan((Link(), Link()), (1.0, 1.0))
GLOBAL_BATCH = 8  # 4 sequences per island, 2 per process when K = 2
STEPS = 8


def _worker(index: int, port: int, k: int, job, args: tuple) -> None:
    torch.set_num_threads(1)
    island, rank = divmod(index, k)
    store = TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=60))
    group, island_group = join_island(
        store, island, ISLANDS, rank, k, torch.device("cpu"), timedelta(seconds=60)
    )
    job(island, rank, group, island_group, *args)


def spawn(k: int, job, *args) -> None:
    """`job(island, rank, group, island_group, *args)` in ISLANDS x k processes, grouped as the
    launcher groups them (island.join_island)."""
    multiprocessing.set_forkserver_preload(PRELOAD)
    store = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    context = mp.start_processes(
        _worker,
        args=(store.port, k, job, args),
        nprocs=ISLANDS * k,
        join=False,
        start_method="forkserver",
    )
    deadline = time.monotonic() + TIMEOUT_S
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"{ISLANDS} x {k} processes did not finish within {TIMEOUT_S} s")


def _island_job(
    island: int,
    rank: int,
    group,
    island_group,
    out: Path,
    parallel: str,
    fragments: int,
    overlap: int,
    codec: str,
    inner_steps: int,
) -> None:
    from frontierlm.train.loop import TrainTask, train

    batch = GLOBAL_BATCH // ISLANDS
    loop = PretrainConfig(steps=STEPS, batch_size=batch, seq_len=16, lr=1e-2, warmup_steps=1)
    loop = loop.model_copy(update={"eval_every": STEPS, "checkpoint_every": 0})
    model = new_model()
    base = make_task(loop)
    # As island.py: island i owns batches i, i + M, ...; the loop splits each by rank.
    task = TrainTask("island", lambda i: base.batch(ISLANDS * i + island), base.loss, base.evaluate)
    sync = DilocoSync(group, island, NO_WAN, inner_steps=inner_steps, total_steps=STEPS,
                      fragments=fragments, overlap=overlap, codec=Codec(codec, block=64),
                      island_group=island_group)  # fmt: skip
    train(model, loop, task, out / str(island), torch.device("cpu"), RunConfig(parallel=parallel),
          export=False, outer=sync)  # fmt: skip
    state = model.state_dict()
    if any(hasattr(v, "full_tensor") for v in state.values()):  # FSDP2: gather the shards
        state = {name: v.full_tensor() for name, v in state.items()}
    torch.save(state, out / f"weights{island}.{rank}.pt")
    if rank == 0:
        (out / f"ledger{island}.json").write_text(json.dumps(sync.ledger.record()))


def run_islands(
    out: Path, k: int, parallel: str = "ddp", fragments=1, overlap=0, codec="fp32", h=2
) -> tuple[list[dict], list[dict], list[dict]]:
    """Train ISLANDS islands of k processes; returns (weights per process, island 0's records,
    each island's ledger)."""
    spawn(k, _island_job, out, parallel, fragments, overlap, codec, h)
    weights = [torch.load(out / f"weights{i}.{r}.pt") for i in range(ISLANDS) for r in range(k)]
    records = MetricsLog(out / "0" / "metrics.jsonl").read()
    ledgers = [json.loads((out / f"ledger{i}.json").read_text()) for i in range(ISLANDS)]
    return weights, records, ledgers


def assert_all_identical(weights: list[dict]) -> None:
    for other in weights[1:]:
        assert all(torch.equal(weights[0][name], other[name]) for name in weights[0])


def max_gap(a: dict, b: dict) -> float:
    return max((a[name] - b[name]).abs().max().item() for name in a)


@pytest.mark.parametrize(
    ("fragments", "overlap", "codec", "h", "syncs"),
    # Syncs per fragment. Plain DiLoCo, H = 2: at 2, 4, 6, 8. Streaming, H = 4, 2 fragments:
    # the first at 2, 6 and its flush at 8, the second at 4, 8.
    [(1, 0, "fp32", 2, [4]), pytest.param(2, 1, "int8", 4, [3, 2], marks=pytest.mark.slow)],
)
def test_islands_of_two_ddp_processes_follow_islands_of_one(
    tmp_path: Path, fragments: int, overlap: int, codec: str, h: int, syncs: list[int]
) -> None:
    args = (fragments, overlap, codec, h)
    one, one_records, one_ledgers = run_islands(tmp_path / "k1", 1, "ddp", *args)
    two, two_records, two_ledgers = run_islands(tmp_path / "k2", 2, "ddp", *args)
    assert_all_identical(one)
    assert_all_identical(two)  # every process of every island holds the same global weights
    losses = [(a["loss"], b["loss"]) for a, b in zip(one_records, two_records, strict=True)]
    assert len(losses) == STEPS and losses[0][0] != losses[-1][0]
    # The same data and updates; only the order of float additions differs (DDP's mean).
    assert max(abs(a - b) for a, b in losses) < 1e-4, losses
    # int8: a value that float noise moves across a rounding boundary lands one level off.
    assert max_gap(one[0], two[0]) < {"fp32": 1e-4, "int8": 2e-3}[codec]
    assert one_records[-1]["val_loss"] == pytest.approx(two_records[-1]["val_loss"], abs=1e-4)
    # The bytes an island sends: 2 (M - 1) / M of a payload of each fragment per sync, whether
    # one process sends it or each of 2 its half; only the padding differs, to a multiple of
    # K x M x the codec's block (none for the fp32 model's 36032 values).
    fragment_sizes = [
        sum(p.numel() for p in group)
        for group in split_fragments(list(new_model().parameters()), fragments)
    ]

    def island_bytes(k: int) -> int:
        c = Codec(codec, block=64)
        return sum(
            count
            * 2
            * (ISLANDS - 1)
            * c.payload_bytes(padded_length(n, k * ISLANDS * c.align))
            // ISLANDS
            for n, count in zip(fragment_sizes, syncs, strict=True)
        )

    for a, b in zip(one_ledgers, two_ledgers, strict=True):
        assert a["exchanges"] == b["exchanges"] == sum(syncs)
        assert a["bytes_sent"] == a["bytes_received"] == island_bytes(1)
        assert b["bytes_sent"] == b["bytes_received"] == island_bytes(2)
        assert b["process_bytes_sent"] == b["bytes_sent"] // 2
    if codec == "fp32":
        assert one_ledgers[0]["bytes_sent"] == two_ledgers[0]["bytes_sent"]


@pytest.mark.parametrize(
    ("fragments", "overlap", "codec", "h"),
    [(1, 0, "fp32", 2), pytest.param(2, 1, "int8", 4, marks=pytest.mark.slow)],
)
def test_fsdp2_inside_islands_matches_ddp_inside_islands(
    tmp_path: Path, fragments: int, overlap: int, codec: str, h: int
) -> None:
    args = (fragments, overlap, codec, h)
    ddp, ddp_records, ddp_ledgers = run_islands(tmp_path / "ddp", 2, "ddp", *args)
    fsdp, fsdp_records, fsdp_ledgers = run_islands(tmp_path / "fsdp", 2, "fsdp", *args)
    assert_all_identical(fsdp)  # gathered, every process of every island: one global model
    losses = [(a["loss"], b["loss"]) for a, b in zip(ddp_records, fsdp_records, strict=True)]
    # int8: the blocks of one scale cover other values (shards, not halves of the vector), so
    # the outer gradients round differently, within a quantisation level (measured: losses
    # 2.4e-4 apart, weights 9.3e-4).
    loss_tolerance, weight_tolerance = {"fp32": (1e-4, 1e-4), "int8": (2e-3, 5e-3)}[codec]
    assert max(abs(a - b) for a, b in losses) < loss_tolerance, losses
    assert max_gap(ddp[0], fsdp[0]) < weight_tolerance
    assert fsdp_ledgers[0]["exchanges"] == ddp_ledgers[0]["exchanges"]
    if codec == "fp32":
        # FSDP2 processes send their own shards (uneven: the 97-row embedding splits 49 / 48),
        # which add up to the whole model: the same bytes per island as under DDP.
        assert fsdp_ledgers[0]["bytes_sent"] == ddp_ledgers[0]["bytes_sent"]
        assert fsdp_ledgers[0]["process_bytes_sent"] != ddp_ledgers[0]["process_bytes_sent"]


# ----------------------------------------------------------------------------- config


def test_island_config_errors_name_the_keys() -> None:
    from frontierlm.config import load_config
    from frontierlm.distributed.launch import _check

    recipe = Path(__file__).resolve().parents[2] / "recipes" / "quickstart.toml"
    cfg = load_config(recipe, ["--pretrain.batch_size=12", "--diloco.islands=2",
                               "--diloco.processes_per_island=4"])  # fmt: skip
    with pytest.raises(ValueError, match=r"pretrain\.batch_size=12 does not divide by diloco\."
                       r"islands=2 x diloco\.processes_per_island=4"):  # fmt: skip
        _check(cfg)
    _check(load_config(recipe, ["--pretrain.batch_size=16", "--diloco.islands=2",
                                "--diloco.processes_per_island=4"]))  # fmt: skip
    async_two = ["--diloco.processes_per_island=2", "--diloco.mode=async"]
    cfg = load_config(recipe, ["--pretrain.batch_size=16", "--diloco.islands=2", *async_two])
    with pytest.raises(NotImplementedError, match=r"processes_per_island=2 .*issue 9"):
        _check(cfg)


def test_islands_are_started_by_the_launcher_not_torchrun_and_fingerprint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from frontierlm.config import load_config
    from frontierlm.distributed.launch import _check
    from frontierlm.stages import STAGES, fingerprint

    recipe = Path(__file__).resolve().parents[2] / "recipes" / "quickstart.toml"
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match=r"not under torchrun.*diloco\.processes_per_island"):
        _check(load_config(recipe))
    for dep in ("tokenizer", "tokenize"):
        (tmp_path / "quickstart" / dep).mkdir(parents=True)
        (tmp_path / "quickstart" / dep / "stage.json").write_text('{"fingerprint": "x"}')

    def diloco_fingerprint(*overrides: str) -> str:
        cfg = load_config(recipe, [f"--run.out_dir={tmp_path}", *overrides])
        return fingerprint(cfg, STAGES["diloco"])

    # Runs of one-process islands keep the fingerprint they had before the key existed.
    assert "processes_per_island" not in load_config(recipe).section_json("diloco")
    one = diloco_fingerprint("--diloco.processes_per_island=1")
    assert one == diloco_fingerprint()
    assert one != diloco_fingerprint("--diloco.processes_per_island=2")
