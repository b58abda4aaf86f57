"""DiLoCo: the outer step against a hand computation (2 gloo processes), the quantisers'
error bounds and byte counts, the real loop across 2 islands, staleness weighting and the
dropping and rejoining of asynchronous islands."""

from __future__ import annotations

import json
import multiprocessing
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed import PrefixStore, TCPStore

from frontierlm.config import PretrainConfig, RunConfig
from frontierlm.distributed.async_islands import (
    Coordinator,
    get_bytes,
    put_bytes,
    staleness_weight,
)
from frontierlm.distributed.diloco import DilocoSync, fragment_offsets, split_fragments
from frontierlm.distributed.quantize import CODECS, Codec
from frontierlm.distributed.wan import Link, Wan
from frontierlm.train.metrics import MetricsLog

sys.path.insert(0, str(Path(__file__).parent.parent / "train"))
from loop_tasks import fake_upstream, join_within, make_task, new_model

ISLANDS = 2
TIMEOUT_S = 120
PRELOAD = ["frontierlm.distributed.diloco", "frontierlm.train.loop"]


def _worker(island: int, port: int, job, args: tuple) -> None:
    torch.set_num_threads(1)
    store = TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=60))
    group = dist.ProcessGroupGloo(
        PrefixStore("islands", store), island, ISLANDS, timedelta(seconds=60)
    )
    job(island, group, *args)


def spawn(job, *args) -> None:
    """`job(island, group, *args)` in ISLANDS processes joined by a standalone gloo group."""
    multiprocessing.set_forkserver_preload(PRELOAD)
    store = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    context = mp.start_processes(
        _worker, args=(store.port, job, args), nprocs=ISLANDS, join=False, start_method="forkserver"
    )
    join_within(context, TIMEOUT_S, f"the {ISLANDS} islands")


NO_WAN = Wan((Link(), Link()), (1.0, 1.0))


# ----------------------------------------------------------------------------- outer step


def _outer_job(island: int, group, out: Path, codec: str) -> None:
    torch.manual_seed(island)  # different weights: start() must make them island 0's
    model = torch.nn.Linear(4, 3)
    sync = DilocoSync(
        group, island, NO_WAN, inner_steps=2, total_steps=4, codec=Codec(codec, block=4)
    )
    sync.start(model, 0)
    start = [p.detach().clone() for p in model.parameters()]
    seen = {"start": [t.tolist() for t in start]}
    for outer in (1, 2):
        with torch.no_grad():  # "inner steps": each island moves its weights its own way
            for k, p in enumerate(model.parameters()):
                p.add_(0.1 * (island + 1) * outer + 0.01 * k)
        sync.after_step(2 * outer - 1, model)  # not a sync step: nothing happens
        sync.after_step(2 * outer, model)
        seen[f"after{outer}"] = [p.detach().tolist() for p in model.parameters()]
        seen[f"bytes{outer}"] = sync.ledger.bytes_sent
    (out / f"island{island}.json").write_text(json.dumps(seen))


@pytest.mark.parametrize("codec", ["fp32", "int8"])
def test_outer_step_is_nesterov_on_the_mean_pseudo_gradient(tmp_path: Path, codec: str) -> None:
    spawn(_outer_job, tmp_path, codec)
    runs = [json.loads((tmp_path / f"island{i}.json").read_text()) for i in range(ISLANDS)]
    assert runs[0]["start"] == runs[1]["start"]  # island 0's weights everywhere
    lr, mu = 0.7, 0.9
    weights = [torch.tensor(t) for t in runs[0]["start"]]
    momentum = None
    for outer in (1, 2):
        # Pseudo-gradient of island i: global - local = -(0.1 (i + 1) outer + 0.01 k); the
        # islands' mean, then torch's Nesterov: buf = mu buf + g; w -= lr (g + mu buf).
        grads = [
            -torch.full_like(w, sum(0.1 * (i + 1) * outer for i in range(ISLANDS)) / ISLANDS)
            - 0.01 * k
            for k, w in enumerate(weights)
        ]
        momentum = (
            grads
            if momentum is None
            else [mu * b + g for b, g in zip(momentum, grads, strict=True)]
        )
        weights = [w - lr * (g + mu * b) for w, g, b in zip(weights, grads, momentum, strict=True)]
        for run in runs:  # every island adopts the same global weights
            for got, want in zip(run[f"after{outer}"], weights, strict=True):
                tol = 1e-6 if codec == "fp32" else 0.02  # int8: within its quantisation step
                assert torch.allclose(torch.tensor(got), want, atol=tol)
        assert runs[0][f"after{outer}"] == runs[1][f"after{outer}"]
    # 15 parameters padded to 16 (2 chunks of a 4-block); per exchange each island sends
    # its other chunk in both phases: 2 * (M - 1) * payload(8 values).
    payload = Codec(codec, block=4).payload_bytes(8)
    assert runs[0]["bytes2"] == 2 * 2 * (ISLANDS - 1) * payload


# ----------------------------------------------------------------------------- quantisers


@pytest.mark.parametrize("name", CODECS)
def test_codecs_round_trip_within_their_bound_and_count_bytes(name: str) -> None:
    torch.manual_seed(0)
    codec = Codec(name, block=64)
    # Blocks of very different scales, exact zeros and a block of all zeros.
    x = torch.randn(64 * 10) * torch.logspace(-4, 2, 10).repeat_interleave(64)
    x[:64] = 0.0
    x[100:110] = 0.0
    payload = codec.encode(x)
    assert payload.dtype == torch.uint8
    expected = {"fp32": 4 * 640, "bf16": 2 * 640, "int8": 640 + 4 * 10, "int4": 320 + 4 * 10}
    assert payload.numel() == codec.payload_bytes(640) == expected[name]
    back = codec.decode(payload, 640)
    error = (back - x).abs()
    assert torch.all(error <= codec.error_bound(x))
    assert torch.all(back[:64] == 0)
    if name in ("int8", "int4"):  # the bound is tight: the worst value sits near half a step
        step = x.view(10, 64).abs().amax(dim=1) / codec.qmax
        assert (error.view(10, 64).amax(dim=1)[1:] / step[1:]).max() > 0.35


def test_int4_packs_two_values_a_byte_with_exact_levels() -> None:
    codec = Codec("int4", block=4)
    x = torch.tensor([7.0, -7.0, 1.0, 0.0])  # scale 1: the levels themselves
    payload = codec.encode(x)
    assert payload[4:].tolist() == [(7 + 8) | ((-7 + 8) << 4), (1 + 8) | (0 + 8) << 4]
    assert codec.decode(payload, 4).tolist() == x.tolist()
    with pytest.raises(ValueError, match="multiple of 4"):
        codec.encode(torch.ones(6))
    with pytest.raises(ValueError, match="unknown codec"):
        Codec("int3")


def test_fragments_are_contiguous_balanced_and_staggered() -> None:
    params = [torch.nn.Parameter(torch.zeros(n)) for n in (10, 10, 30, 10, 10, 10)]
    groups = split_fragments(params, 3)
    assert [sum(p.numel() for p in g) for g in groups] == [20, 30, 30]
    assert [p for g in groups for p in g] == params
    assert fragment_offsets(50, 4) == [12, 25, 37, 0]
    assert fragment_offsets(50, 1) == [0]


def test_wan_times_exchanges_by_the_slowest_link() -> None:
    wan = Wan.build(2, [100.0, 10.0], [20.0], [1.0, 3.0])
    assert wan.slowdown == (1.0, 3.0)
    # 1 MB at 10 Mbit/s = 0.8 s, plus two rounds of 20 ms.
    assert wan.exchange_seconds(1_000_000, rounds=2, members=[0, 1]) == pytest.approx(0.84)
    assert wan.point_seconds(0, 1_000_000) == pytest.approx(0.1)
    with pytest.raises(ValueError, match=r"diloco\.latency_ms has 3 values for 2 islands"):
        Wan.build(2, [1.0], [1.0, 2.0, 3.0], [1.0])


# ----------------------------------------------------------------------------- the real loop


def _loop_job(island: int, group, out: Path, fragments: int, overlap: int) -> None:
    from frontierlm.train.loop import TrainTask, train

    loop = PretrainConfig(steps=8, batch_size=2, seq_len=16, lr=1e-2, warmup_steps=1)
    loop = loop.model_copy(update={"eval_every": 8, "checkpoint_every": 0})
    model = new_model()
    base = make_task(loop)
    task = TrainTask("island", lambda i: base.batch(2 * i + island), base.loss, base.evaluate)
    sync = DilocoSync(
        group, island, NO_WAN, inner_steps=4, total_steps=8, fragments=fragments, overlap=overlap
    )
    result = train(model, loop, task, out / str(island), torch.device("cpu"), RunConfig(),
                   export=False, outer=sync)  # fmt: skip
    torch.save({k: v for k, v in model.state_dict().items()}, out / f"weights{island}.pt")
    (out / f"result{island}.json").write_text(json.dumps(result))


@pytest.mark.parametrize(("fragments", "overlap"), [(1, 0), (2, 1)])
def test_islands_train_the_real_loop_and_end_identical(
    tmp_path: Path, fragments: int, overlap: int
) -> None:
    spawn(_loop_job, tmp_path, fragments, overlap)
    a, b = (torch.load(tmp_path / f"weights{i}.pt") for i in range(ISLANDS))
    assert all(torch.equal(a[k], b[k]) for k in a)  # the final flush leaves one global model
    records = [MetricsLog(tmp_path / str(i) / "metrics.jsonl").read() for i in range(ISLANDS)]
    assert records[0][0]["loss"] != records[1][0]["loss"]  # different data on each island
    last = records[0][-1]
    # fp32 payload of the model padded to 2 chunks; 2 syncs per fragment over 8 steps (two
    # fragments: at steps 2, 6 and 4, 8, and the flush of the first's last 2 steps at 8).
    n = sum(v.numel() for v in new_model().parameters())
    assert last["exchanges"] == {1: 2, 2: 5}[fragments]
    if fragments == 1:
        assert last["bytes_sent"] == 2 * 2 * (ISLANDS - 1) * 4 * ((n + 1) // 2)
    assert last["outer_step"] == last["exchanges"]
    assert last["compute_s"] > 0 and "val_loss" in last


# ----------------------------------------------------------------------------- resume


def _resume_job(
    island: int, group, out: Path, kill_at: int | None, streaming: tuple[int, int] = (1, 0)
) -> None:
    """As island.py runs a synchronous island: checkpoints every H steps (`overlap` past each
    multiple of H) with the outer state beside them; SIGKILLed at step `kill_at`, as a crashed
    machine. DiLoCo: 8 steps, H = 2; Streaming (fragments, overlap): 12 steps, H = 4."""
    import os
    import signal

    from frontierlm.train.loop import TrainTask, train

    fragments, overlap = streaming
    steps, h = (12, 4) if fragments > 1 else (8, 2)
    loop = PretrainConfig(steps=steps, batch_size=2, seq_len=16, lr=1e-2, warmup_steps=1)
    loop = loop.model_copy(update={"eval_every": steps, "checkpoint_every": h})
    model = new_model()
    base = make_task(loop)
    task = TrainTask("island", lambda i: base.batch(2 * i + island), base.loss, base.evaluate)
    island_dir = out / "islands" / str(island)
    sync = DilocoSync(group, island, NO_WAN, inner_steps=h, total_steps=steps,
                      fragments=fragments, overlap=overlap,
                      global_log=MetricsLog(out / "diloco.jsonl") if island == 0 else None,
                      state_dir=island_dir / "outer", checkpoint_every=h)  # fmt: skip
    after_step = sync.after_step

    def dying_after_step(step: int, model) -> dict[str, float]:
        if step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return after_step(step, model)

    sync.after_step = dying_after_step
    train(model, loop, task, island_dir, torch.device("cpu"), RunConfig(), export=False,
          outer=sync)  # fmt: skip
    torch.save(model.state_dict(), out / f"weights{island}.pt")


def spawn_killed(job, *args) -> list[int]:
    """As spawn, for islands that die: their exit codes."""
    multiprocessing.set_forkserver_preload(PRELOAD)
    store = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    context = mp.start_processes(
        _worker, args=(store.port, job, args), nprocs=ISLANDS, join=False, start_method="forkserver"
    )
    deadline = time.monotonic() + TIMEOUT_S
    while any(p.is_alive() for p in context.processes):
        assert time.monotonic() < deadline, "the islands did not die"
        time.sleep(0.1)
    return [p.exitcode for p in context.processes]


@pytest.mark.parametrize(
    ("streaming", "kill_at", "resumed", "exchanges"),
    [
        # DiLoCo (H = 2): killed at step 5, after its 2nd outer sync (steps 2 and 4) and the
        # checkpoint of step 4.
        ((1, 0), 5, 4, 4),
        # Streaming DiLoCo, 2 fragments synced at steps 2 mod 4 and 0 mod 4, each exchange
        # applied a step later: the checkpoint comes at step 5, once the exchange launched at 4
        # has landed; killed at step 7 with the exchange launched at 6 in flight. 7 exchanges:
        # at 2, 4, 6, 8, 10, 12 and the final flush of fragment 0's steps 11-12.
        ((2, 1), 7, 5, 7),
    ],
)
def test_killed_sync_run_resumes_at_its_last_outer_step_and_ends_as_uninterrupted(
    tmp_path: Path, streaming: tuple[int, int], kill_at: int, resumed: int, exchanges: int
) -> None:
    from frontierlm.distributed.launch import resume_step

    whole, killed = tmp_path / "whole", tmp_path / "killed"
    spawn(_resume_job, whole, None, streaming)
    assert spawn_killed(_resume_job, killed, kill_at, streaming) == [-9, -9]
    assert resume_step(killed, ISLANDS, 1) == resumed  # what the launcher finds on the rerun
    spawn(_resume_job, killed, None, streaming)
    steps = 12 if streaming[0] > 1 else 8
    for i in range(ISLANDS):
        a, b = (torch.load(run / f"weights{i}.pt") for run in (whole, killed))
        # The same data, inner and outer state: fp32 on CPU, bit for bit.
        assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-5
        assert all(torch.equal(a[k], b[k]) for k in a)
        records = [MetricsLog(run / "islands" / str(i) / "metrics.jsonl").read()
                   for run in (whole, killed)]  # fmt: skip
        # Cut at the resumed step, then on to the end: each step once.
        assert [r["step"] for r in records[1]] == list(range(1, steps + 1))
        assert [r["loss"] for r in records[0]] == [r["loss"] for r in records[1]]
        # The ledger goes on from the checkpoint: the same exchanges and bytes in all.
        assert records[1][-1]["exchanges"] == records[0][-1]["exchanges"] == exchanges
        assert records[1][-1]["bytes_sent"] == records[0][-1]["bytes_sent"]
    outer_steps = [r["outer_step"] for r in MetricsLog(killed / "diloco.jsonl").read()]
    # The log cut at the resumed step too, no outer step twice.
    assert outer_steps == list(range(1, exchanges + 1))


def test_resume_step_is_the_last_one_every_island_holds_whole(tmp_path: Path) -> None:
    from frontierlm.distributed.launch import resume_step

    def make(island: int, checkpoints: list[int], states: dict[int, list[int]]) -> Path:
        root = tmp_path / "islands" / str(island)
        for step in checkpoints:
            (root / "checkpoints" / f"step_{step:07d}").mkdir(parents=True)
        (root / "outer").mkdir(parents=True, exist_ok=True)
        for step, ranks in states.items():
            for rank in ranks:
                (root / "outer" / f"step_{step:07d}.rank{rank}.pt").write_bytes(b"x")
        return root

    # Island 0 died after its outer state of step 6 (rank 1's missing) but before its
    # checkpoint; island 1 wrote both: step 4 is the last whole one everywhere.
    a = make(0, [2, 4], {2: [0, 1], 4: [0, 1], 6: [0]})
    b = make(1, [4, 6], {4: [0, 1], 6: [0, 1]})
    assert resume_step(tmp_path, 2, 2) == 4
    assert [p.name for p in sorted((b / "checkpoints").iterdir())] == ["step_0000004"]
    assert sorted(p.name for p in (a / "outer").iterdir()) == [
        f"step_000000{s}.rank{r}.pt" for s in (2, 4) for r in (0, 1)
    ]
    assert len(list((b / "outer").iterdir())) == 2
    # Nothing in common (island 0 kept 2 and 4, island 1 only 6 and 8): start over, with
    # every island's later work gone.
    tmp_path = tmp_path / "apart"
    a = make(0, [2, 4], {2: [0], 4: [0]})
    b = make(1, [6, 8], {6: [0], 8: [0]})
    assert resume_step(tmp_path, 2, 1) == 0
    assert not any((a / "checkpoints").iterdir()) and not any((b / "outer").iterdir())
    assert resume_step(tmp_path / "none", 2, 1) == 0


# ----------------------------------------------------------------------------- async islands


def _push(store, island: int, seq: int, base: int, delta: torch.Tensor, position: int) -> None:
    put_bytes(store, f"push/{island}/{seq}", Codec().encode(delta).numpy().tobytes())
    meta = {"base": base, "position": position, "tokens": 10}
    store.set(f"meta/{island}/{seq}", json.dumps(meta))
    store.add(f"pushed/{island}", 1)


def test_staleness_weight_counts_rounds_beyond_round_robin() -> None:
    assert staleness_weight(0, 0, 4, 1.0) == 1.0  # fresh
    assert staleness_weight(3, 0, 4, 1.0) == 1.0  # the 3 others went first: the normal course
    assert staleness_weight(7, 0, 4, 1.0) == pytest.approx(1 / 2)  # one round late
    assert staleness_weight(11, 0, 4, 0.5) == pytest.approx(3**-0.5)  # two rounds late


def test_each_contribution_applies_at_once_and_momentum_once_a_round(tmp_path: Path) -> None:
    """Delayed Nesterov: two fresh islands give synchronous DiLoCo's Nesterov step on their
    mean; in between, the first contribution alone moves the weights (plain part only)."""
    store = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    coordinator = Coordinator(store, torch.zeros(4), 2, Codec(), staleness_power=1.0,
                              outer_momentum=0.5, outer_lr=1.0,
                              events=MetricsLog(tmp_path / "events.jsonl"))  # fmt: skip
    for i in range(2):
        store.set(f"hb/{i}", str(time.time()))
    _push(store, 0, 1, 0, torch.ones(4), position=5)
    coordinator.poll()
    assert coordinator.version == 1  # applied at once: lr 1 x 1/2 of ones
    assert torch.allclose(coordinator.weights, torch.full((4,), -0.5))
    assert store.get("applied/0/1") == b"1"  # what island 0 waits for before it pulls
    _push(store, 1, 1, 0, torch.full((4,), 3.0), position=5)  # base 0, one update missed: fresh
    coordinator.poll()
    # Nesterov (lr 1, momentum 0.5) on the mean 2 from zero momentum: m = 2, step g + 0.5 m = 3.
    assert coordinator.version == 2
    assert torch.allclose(coordinator.weights, torch.full((4,), -3.0))
    # Island 0 again from version 0 at version 2: half a round late, weight 1 / 1.5.
    _push(store, 0, 2, 0, torch.ones(4), position=10)
    coordinator.poll()
    assert torch.allclose(coordinator.weights, torch.full((4,), -3.0 - 1 / 3))
    assert store.get("pos/0") == b"10" and store.get("pos/1") == b"5"
    events = MetricsLog(tmp_path / "events.jsonl").read()
    steps = [e for e in events if e["event"] == "outer_step"]
    assert [e["momentum"] for e in steps] == [False, True, False]
    assert steps[-1]["staleness"] == [2] and steps[-1]["weight"] == pytest.approx(2 / 3, abs=1e-4)
    # The run's end gives the last, partial round its momentum: m = 0.5 * 2 + 1/3.
    store.set("done/0", "1")
    store.set("done/1", "1")
    coordinator.run(poll_s=0.0)
    assert torch.allclose(coordinator.weights, torch.full((4,), -3.0 - 1 / 3 - 0.5 * (4 / 3)))


def test_a_silent_island_is_dropped_and_a_returning_one_rejoins(tmp_path: Path) -> None:
    store = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    log = MetricsLog(tmp_path / "events.jsonl")
    coordinator = Coordinator(store, torch.zeros(4), 2, Codec(), timeout_s=0.5, events=log)
    for i in range(2):
        store.set(f"hb/{i}", str(time.time()))
    coordinator.poll()
    assert coordinator.alive == {0, 1}
    time.sleep(0.6)
    store.set("hb/0", str(time.time()))  # island 1 went silent
    coordinator.poll()
    assert coordinator.alive == {0} and coordinator.dropped == {1}
    # The run goes on: one contribution from the one live island makes an outer step.
    _push(store, 0, 1, 0, torch.ones(4), position=7)
    coordinator.poll()
    assert coordinator.version == 1
    # One fresh contribution of two islands: its plain part at once (lr 0.7 x 1/2); the
    # momentum waits for a round of two.
    assert torch.allclose(coordinator.weights, torch.full((4,), -0.7 * 0.5))
    store.set("hb/1", str(time.time()))  # restarted
    coordinator.poll()
    assert coordinator.alive == {0, 1}
    events = [(e["event"], e.get("island")) for e in log.read()]
    assert events == [
        ("joined", 0),
        ("joined", 1),
        ("dropped", 1),
        ("outer_step", None),
        ("rejoined", 1),
    ]


def _coordinate(store, coordinator: Coordinator, pushes: list[tuple], upto: int) -> None:
    """Hand `coordinator` pushes[:upto] one poll at a time, as islands taking turns would."""
    for i in range(2):
        store.set(f"hb/{i}", str(time.time()))
    for island, seq, base, delta, position in pushes[:upto]:
        _push(store, island, seq, base, delta, position)
        coordinator.poll()


def test_a_killed_coordinator_resumes_from_its_saved_state(tmp_path: Path) -> None:
    """A killed launcher's rerun: the coordinator saved its state once an island passed a
    multiple of checkpoint_every; a new one in a new store loads it, the islands push again
    from their saved positions, and the run ends bit for bit as if never stopped."""
    torch.manual_seed(0)
    # Two islands taking turns, pushing every 2 and 3 steps; island 1 a version behind (its
    # bases lag), so staleness weights differ from 1.
    pushes, version = [], 0
    for seq in range(1, 5):
        for island in (0, 1):
            base = max(0, version - island)
            pushes.append((island, seq, base, torch.randn(10), (2 + island) * seq))
            version += 1

    def coordinator(store, run: str) -> Coordinator:
        return Coordinator(store, torch.zeros(10), 2, Codec(), staleness_power=0.5,
                           events=MetricsLog(tmp_path / run / "events.jsonl"),
                           state_path=tmp_path / run / "coordinator.pt",
                           checkpoint_every=5)  # fmt: skip

    def finish(store, c: Coordinator) -> None:
        store.set("done/0", "1")
        store.set("done/1", "1")
        c.run(poll_s=0.0)

    (tmp_path / "whole").mkdir()
    (tmp_path / "killed").mkdir()
    store = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    whole = coordinator(store, "whole")
    _coordinate(store, whole, pushes, len(pushes))
    finish(store, whole)
    # Killed after 6 contributions: the state saved when island 0 passed step 5 (version 5,
    # halfway through a round of momentum) holds the first 5; island 1's push from step 9 is
    # lost with the launcher.
    store = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    killed = coordinator(store, "killed")
    _coordinate(store, killed, pushes, 6)
    assert killed.version == 6
    store = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    rerun = coordinator(store, "killed")
    rerun.load_state()
    assert rerun.version == 5 and rerun.positions == {0: 6, 1: 6} and rerun.round_count == 1
    assert store.get("g/version") == b"5" and store.get("pos/1") == b"6"
    global_weights = torch.frombuffer(bytearray(get_bytes(store, "g/w/5")), dtype=torch.float32)
    assert torch.equal(global_weights, rerun.weights)  # what a rejoining island pulls
    assert store.add("pushed/1", 0) == 2  # island 1's next push is its 3rd
    _coordinate(store, rerun, pushes[5:], len(pushes) - 5)  # from step 6 on, again
    finish(store, rerun)
    assert torch.equal(rerun.weights, whole.weights)
    assert torch.equal(rerun.momentum, whole.momentum)
    assert (rerun.version, rerun.tokens, rerun.contributions, rerun.positions) == (
        whole.version, whole.tokens, whole.contributions, whole.positions
    )  # fmt: skip
    # The events cut at version 5: every outer step once, then the rerun's "resumed".
    events = [MetricsLog(tmp_path / run / "events.jsonl").read() for run in ("whole", "killed")]
    versions = [[e["version"] for e in log if e["event"] == "outer_step"] for log in events]
    assert versions[0] == versions[1] == list(range(1, 9))
    assert [e["version"] for e in events[1] if e["event"] == "resumed"] == [5]
    # The saved state at the end holds the finished run: a rerun would find nothing to do.
    done = coordinator(TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False), "whole")
    done.load_state()
    assert done.finished == {0, 1} and torch.equal(done.weights, whole.weights)


# ----------------------------------------------------------------------------- config


def test_diloco_config_errors_name_the_key_and_fingerprints(tmp_path: Path) -> None:
    from frontierlm.config import ConfigError, load_config
    from frontierlm.stages import STAGES, fingerprint

    recipe = Path(__file__).resolve().parents[2] / "recipes" / "quickstart.toml"
    with pytest.raises(ConfigError, match=r"diloco\.slowdown has 3 values for 4 islands"):
        load_config(recipe, ["--diloco.slowdown=[1,2,3]"])
    with pytest.raises(ConfigError, match=r"diloco\.overlap=25 must be below"):
        load_config(recipe, ["--diloco.fragments=2", "--diloco.overlap=25"])
    assert '"mode"' not in load_config(recipe).section_json("pretrain")  # old hashes stay
    fake_upstream(tmp_path / "quickstart")

    def pretrain_fingerprint(*overrides: str) -> str:
        cfg = load_config(recipe, [f"--run.out_dir={tmp_path}", *overrides])
        return fingerprint(cfg, STAGES["pretrain"])

    # The [diloco] table counts in pretrain's fingerprint only when pretrain runs DiLoCo.
    assert pretrain_fingerprint() == pretrain_fingerprint("--diloco.islands=8")
    diloco = pretrain_fingerprint("--pretrain.mode=diloco")
    assert diloco != pretrain_fingerprint()
    assert diloco != pretrain_fingerprint("--pretrain.mode=diloco", "--diloco.islands=8")


def test_loss_vs_bytes_points_and_plot(tmp_path: Path) -> None:
    from frontierlm.report import loss_vs_bytes, plot_loss_vs_bytes

    island = [{"step": 1, "loss": 4.0, "bytes_sent": 0}, {"step": 2, "loss": 2.0, "bytes_sent": 10}]
    assert loss_vs_bytes(island, islands=4, smooth=2) == [(0.0, 4.0), (40.0, 3.0)]
    ddp = [{"step": 1, "loss": 4.0}, {"step": 2, "val_loss": 3.9}, {"step": 2, "loss": 3.0}]
    assert loss_vs_bytes(ddp, bytes_per_step=100.0, smooth=1) == [(100.0, 4.0), (200.0, 3.0)]
    plot_loss_vs_bytes(
        {"a": loss_vs_bytes(island), "b": loss_vs_bytes(ddp, 100.0)}, tmp_path / "p.png"
    )
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
@pytest.mark.parametrize(
    ("streaming", "checkpoint"),
    # Streaming DiLoCo (2 fragments, overlap 1) checkpoints a step past each multiple of 10.
    [([], 20), (["--diloco.fragments=2", "--diloco.overlap=1", "--diloco.codec=int8"], 21)],
)
def test_frontierlm_diloco_killed_then_rerun_resumes_to_the_same_model(
    tmp_path: Path, streaming: list[str], checkpoint: int
) -> None:
    """The launcher's path: `frontierlm diloco` on the micro recipe (2 islands, H = 5, 40 steps,
    checkpoints every 10), an island SIGKILLed once both have checkpointed step 20 (21 with
    Streaming DiLoCo); the rerun of the same command resumes there and writes the model of an
    uninterrupted run."""
    import os
    import shutil
    import signal
    import subprocess

    from safetensors.torch import load_file

    root = Path(__file__).resolve().parents[2]
    recipe = str(root / "recipes" / "micro.toml")
    args = [f"--run.out_dir={tmp_path}", "--diloco.islands=2", "--diloco.inner_steps=5",
            "--pretrain.steps=40", "--pretrain.checkpoint_every=10",
            "--run.device=cpu", *streaming]  # fmt: skip

    def cli(*extra: str) -> list[str]:
        return [sys.executable, "-m", "frontierlm.cli", *extra, recipe, *args]

    for stage in ("data", "tokenizer", "tokenize"):
        subprocess.run(cli(stage), cwd=root, check=True, capture_output=True, timeout=300)
    for name in ("whole", "killed"):
        shutil.copytree(tmp_path / "micro", tmp_path / name)
    done = subprocess.run(cli("diloco", "--run.name=whole"), cwd=root, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr
    work = tmp_path / "killed" / "diloco.partial"
    launcher = subprocess.Popen(cli("diloco", "--run.name=killed"), cwd=root,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    checkpoints = [work / "islands" / str(i) / "checkpoints" / f"step_{checkpoint:07d}"
                   for i in (0, 1)]  # fmt: skip
    deadline = time.monotonic() + 300
    while not all(c.is_dir() for c in checkpoints):
        assert launcher.poll() is None and time.monotonic() < deadline, "no checkpoint yet"
        time.sleep(0.05)
    os.kill(int((work / "islands" / "1" / "pid").read_text()), signal.SIGKILL)
    assert launcher.wait(timeout=120) != 0  # synchronous islands stop together
    assert not (tmp_path / "killed" / "diloco").exists()
    again = subprocess.run(cli("diloco", "--run.name=killed"), cwd=root, capture_output=True,
                           text=True, timeout=300)  # fmt: skip
    assert again.returncode == 0, again.stderr
    assert "resuming every island from step" in again.stdout + again.stderr
    a, b = (load_file(tmp_path / n / "diloco" / "model" / "model.safetensors")
            for n in ("whole", "killed"))  # fmt: skip
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-5
    metrics = [json.loads((tmp_path / n / "diloco" / "stage.json").read_text())["metrics"]
               for n in ("whole", "killed")]  # fmt: skip
    assert metrics[0]["val_bpb"] == pytest.approx(metrics[1]["val_bpb"], abs=1e-6)
    assert metrics[0]["bytes_sent"] == metrics[1]["bytes_sent"]  # the ledgers resumed too


@pytest.mark.slow
def test_frontierlm_diloco_async_launcher_killed_then_rerun_resumes(tmp_path: Path) -> None:
    """A killed asynchronous launcher (coordinator and islands SIGKILLed together, as a lost
    machine) on the micro recipe (2 islands, H = 5, 40 steps each, coordinator state saved as
    islands pass multiples of 10): the rerun of the same command resumes from the saved
    version, each island from its saved position, and each step's tokens count once."""
    import os
    import signal
    import subprocess

    from frontierlm.config import load_config

    root = Path(__file__).resolve().parents[2]
    recipe = root / "recipes" / "micro.toml"
    args = [f"--run.out_dir={tmp_path}", "--diloco.islands=2", "--diloco.inner_steps=5",
            "--pretrain.steps=40", "--pretrain.checkpoint_every=10", "--diloco.mode=async",
            "--run.device=cpu"]  # fmt: skip

    def cli(*extra: str) -> list[str]:
        return [sys.executable, "-m", "frontierlm.cli", *extra, str(recipe), *args]

    for stage in ("data", "tokenizer", "tokenize"):
        subprocess.run(cli(stage), cwd=root, check=True, capture_output=True, timeout=300)
    work = tmp_path / "micro" / "diloco.partial"
    launcher = subprocess.Popen(cli("diloco"), cwd=root, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)  # fmt: skip
    state, saved = work / "coordinator.pt", None
    deadline = time.monotonic() + 300
    while saved is None or min(saved["positions"].values()) < 20:
        assert launcher.poll() is None and time.monotonic() < deadline, "no state at step 20"
        time.sleep(0.05)
        if state.is_file():
            saved = torch.load(state, weights_only=True)
    for pid in [launcher.pid] + [
        int((work / "islands" / str(i) / "pid").read_text()) for i in (0, 1)
    ]:
        os.kill(pid, signal.SIGKILL)
    launcher.wait()
    again = subprocess.run(cli("diloco"), cwd=root, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert "resuming the coordinator from version" in again.stdout + again.stderr
    final = tmp_path / "micro" / "diloco"
    events = MetricsLog(final / "events.jsonl").read()
    resumed = [e["version"] for e in events if e["event"] == "resumed"]
    assert len(resumed) == 1 and resumed[0] >= saved["version"]
    # Every outer step once: those up to the saved state, then the rerun's.
    versions = [e["version"] for e in events if e["event"] == "outer_step"]
    assert versions == list(range(1, len(versions) + 1))
    positions = next(e for e in events if e["event"] == "resumed")["positions"]
    for i in (0, 1):  # each island's log cut at its resumed position: every step once
        log = MetricsLog(final / "islands" / str(i) / "metrics.jsonl").read()
        steps = [r["step"] for r in log]
        assert steps == sorted(set(steps))
        # Only the record of the step whose contribution was saved can be missing: the kill
        # may fall between the push and the loop's record of it, never trained twice.
        assert set(range(1, 41)) - set(steps) <= {positions[str(i)]}, (steps, positions)
    metrics = json.loads((final / "stage.json").read_text())["metrics"]
    loop = load_config(recipe, args).pretrain
    # The lost contributions' steps were trained again and counted once.
    assert metrics["contributed_tokens"] == 40 * loop.batch_size * loop.seq_len * loop.grad_accum
    # Each island's 8 contributions (one per H = 5 steps) applied once: 16 outer steps, the
    # last round whole (no partial round's momentum step at the end).
    assert metrics["outer_steps"] == 16
