"""Decoupled (asynchronous) islands: nobody waits for anybody.

Transport and membership are torch.distributed's TCPStore (hosted by the launcher): an island
puts its encoded pseudo-gradient under a key and bumps a counter, reads the newest global
weights by version, and refreshes a heartbeat key every inner step. The coordinator (a thread in
the launcher) owns the global weights and the outer Nesterov optimizer:

  - it applies every contribution when it arrives (Liu et al. 2024, "Asynchronous Local-SGD"),
    so the island that sent it pulls weights that hold its own progress and never trains on
    from weights that lack it: the pseudo-gradient, scaled by 1 / M and by its staleness
    weight, moves the weights at once (the plain part of Nesterov's step), and once
    per round of M contributions the Nesterov momentum is updated with the round's sum and
    applied ("delayed Nesterov"): M islands of equal speed, all fresh, give exactly
    synchronous DiLoCo's outer step, and an island that is gone counts as zero. A
    contribution computed from version b arriving at version v missed v - b updates; in
    round-robin order that is M - 1, which is no delay at all, so its staleness is the
    excess in rounds, s = max(0, v - b - (M - 1)) / M, and its weight (1 + s)^-p
    (`staleness_power` p): a pseudo-gradient part of whose progress the weights already hold
    counts less;
  - an island whose heartbeat is older than `timeout_s` is dropped (an event in events.jsonl)
    and the outer steps go on with the others;
  - an island that (re)starts reads the newest global weights and the data position it owns
    (the inner steps of its last accepted contribution), so it continues its own data stream;
    the coordinator logs it as joined and counts it in again.

A killed launcher (the coordinator with it) resumes too: once an island's data position passes
a multiple of `checkpoint_every` (and at the end), the coordinator writes its whole state
atomically to `state_path`: the global weights and version, the outer momentum and the round
in progress, how many contributions of each island it applied, their data positions and
tokens, the finished islands. The rerun of the same command loads it, puts the counts and
positions back in the new store, and starts the unfinished islands, which rejoin as a
restarted island does: from the newest global weights, at the position of their last
contribution in the saved state, with a fresh inner optimizer. Contributions applied after the
save are lost with the launcher; their steps are trained again, on the same data.

An island of K processes (diloco.processes_per_island) talks to the coordinator through its
local rank 0 alone, which pushes the island's pseudo-gradient, pulls the newest global weights
and hands the others what they need over the island's gloo group (with the version and the data
position), on which they wait at the same step. With DDP inside, the K copies of the weights are
identical, so rank 0's pseudo-gradient is the island's, and it broadcasts the whole pulled
weights. With FSDP2 inside, each process holds a shard and keeps the global weights of that
shard only: at a push the processes gather their shards' pseudo-gradients on rank 0, which
joins them in the order of the full parameters (the coordinator's), and after a pull rank 0
scatters to each process its shard of the new global weights (diloco.py's shard helpers).
Rank 0 alone refreshes the heartbeat: a process that dies takes the island down (its peers'
next collective fails, or times out), the heartbeat stops, and the coordinator drops the island.

Each island pushes after its own H inner steps (with `dynamic_inner_steps`, H divided by the
island's slowdown, as in Liu et al. 2024, so slow islands contribute about as often and as
fresh as fast ones) and then, once the coordinator has applied it, adopts the newest global
weights.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed import Store

from frontierlm.atomic import atomic_file
from frontierlm.distributed.diloco import (
    flat,
    gather_shards,
    held,
    scatter_shards,
    shard_sizes,
    unflatten_into,
)
from frontierlm.distributed.quantize import Codec, padded_length
from frontierlm.distributed.wan import Ledger, Wan, hold_until
from frontierlm.train.metrics import MetricsLog

KEPT_VERSIONS = 4  # global weights stay readable this many versions back


def staleness_weight(version: int, base: int, live: int, power: float) -> float:
    """The weight of a contribution computed from global version `base`, arriving at
    `version`, among `live` islands: (1 + s)^-power with s its delay in rounds beyond the
    round-robin one (the other islands' updates in between are the normal course)."""
    rounds = max(0, version - base - (live - 1)) / live
    return (1.0 + rounds) ** -power


def _get_int(store: Store, key: str, default: int = 0) -> int:
    return int(store.get(key)) if store.check([key]) else default


# TCPStore's libuv server refuses values over 8 MiB: larger ones travel in pieces, and the
# count is written last, so a reader that sees it finds every piece.
PIECE = 4 << 20


def put_bytes(store: Store, key: str, raw: bytes) -> None:
    pieces = [raw[i : i + PIECE] for i in range(0, len(raw), PIECE)] or [b""]
    for i, piece in enumerate(pieces):
        store.set(f"{key}#{i}", piece)
    store.set(f"{key}#n", str(len(pieces)))


def has_bytes(store: Store, key: str) -> bool:
    return store.check([f"{key}#n"])


def get_bytes(store: Store, key: str) -> bytes:
    count = int(store.get(f"{key}#n"))
    return b"".join(store.get(f"{key}#{i}") for i in range(count))


def delete_bytes(store: Store, key: str) -> None:
    if store.check([f"{key}#n"]):
        count = int(store.get(f"{key}#n"))
        store.delete_key(f"{key}#n")
        for i in range(count):
            store.delete_key(f"{key}#{i}")


def _tensor(raw: bytes, dtype: torch.dtype) -> torch.Tensor:
    return torch.frombuffer(bytearray(raw), dtype=dtype)


@dataclass
class Contribution:
    island: int
    base: int
    position: int
    tokens: int
    pseudo_gradient: torch.Tensor


@dataclass
class Coordinator:
    """Holds the global weights; run() until every island is finished or gone."""

    store: Store
    weights: torch.Tensor  # flat fp32 global weights
    islands: int
    codec: Codec
    outer_lr: float = 0.7
    outer_momentum: float = 0.9
    staleness_power: float = 0.5
    timeout_s: float = 60.0
    rejoin_wait_s: float = 0.0  # after the others finish, how long a dropped island may return
    events: MetricsLog | None = None
    state_path: Path | None = None  # where the state is checkpointed, for a rerun to resume
    checkpoint_every: int = 0  # save once an island's data position passes a multiple of it
    version: int = 0
    alive: set[int] = field(default_factory=set)
    dropped: set[int] = field(default_factory=set)
    finished: set[int] = field(default_factory=set)
    round_sum: torch.Tensor | None = None  # the weighted pseudo-gradients of this round
    round_count: int = 0
    seen: dict[int, int] = field(default_factory=dict)
    tokens: int = 0
    contributions: dict[int, int] = field(default_factory=dict)
    positions: dict[int, int] = field(default_factory=dict)  # of each last contribution
    stop_event: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self.weights = self.weights.clone()
        self.momentum = torch.zeros_like(self.weights)
        self.round_sum = torch.zeros_like(self.weights)
        self.seen = dict.fromkeys(range(self.islands), 0)
        self.contributions = dict.fromkeys(range(self.islands), 0)
        self.positions = dict.fromkeys(range(self.islands), 0)
        self.saved_positions = dict(self.positions)
        self._publish()

    # -------------------------------------------------------------- resume

    def save_state(self) -> None:
        state = {
            "weights": self.weights,
            "momentum": self.momentum,
            "round_sum": self.round_sum,
            "round_count": self.round_count,
            "version": self.version,
            "seen": self.seen,
            "contributions": self.contributions,
            "positions": self.positions,
            "tokens": self.tokens,
            "finished": sorted(self.finished),
        }
        with atomic_file(self.state_path) as f:
            torch.save(state, f)
        self.saved_positions = dict(self.positions)

    def load_state(self) -> None:
        """Continue from the state a killed launcher's coordinator saved: the same weights,
        momentum and round, and in this run's store the version, each island's count of
        applied pushes (its next push goes on from there) and data position, as it was."""
        state = torch.load(self.state_path, map_location="cpu", weights_only=True)
        if state["weights"].shape != self.weights.shape:
            raise ValueError(
                f"{self.state_path} holds {state['weights'].numel()} weights, the model has "
                f"{self.weights.numel()}: not this run's state; delete it to start over"
            )
        delete_bytes(self.store, f"g/w/{self.version}")
        self.weights, self.momentum = state["weights"], state["momentum"]
        self.round_sum, self.round_count = state["round_sum"], state["round_count"]
        self.version, self.tokens = state["version"], state["tokens"]
        self.seen, self.contributions = state["seen"], state["contributions"]
        self.positions, self.finished = state["positions"], set(state["finished"])
        self.saved_positions = dict(self.positions)
        for i in range(self.islands):
            self.store.set(f"pushed/{i}", str(self.seen[i]))
            self.store.set(f"pos/{i}", str(self.positions[i]))
        self._publish()
        if self.events is not None:  # forget outer steps the saved state does not hold
            self.events.truncate_after(self.version, key="version")
        self._event({"event": "resumed", "version": self.version, "positions": self.positions})

    def _checkpoint_due(self) -> bool:
        every = self.checkpoint_every
        return (
            self.state_path is not None
            and every > 0
            and any(
                self.positions[i] // every > self.saved_positions[i] // every
                for i in range(self.islands)
            )
        )

    def _event(self, record: dict) -> None:
        if self.events is not None:
            self.events.write({"time": round(time.time(), 3), **record})

    def _publish(self) -> None:
        raw = self.weights.numpy().tobytes()
        put_bytes(self.store, f"g/w/{self.version}", raw)
        self.store.set("g/version", str(self.version))
        old = self.version - KEPT_VERSIONS
        if old >= 0:
            delete_bytes(self.store, f"g/w/{old}")

    def poll(self) -> None:
        """One round: check heartbeats, then apply the new contributions."""
        now = time.time()
        for i in range(self.islands):
            if self.store.check([f"done/{i}"]) and i not in self.finished:
                self.finished.add(i)
                self.alive.discard(i)
                self._event({"event": "finished", "island": i})
            beat = float(self.store.get(f"hb/{i}")) if self.store.check([f"hb/{i}"]) else None
            fresh = beat is not None and now - beat < self.timeout_s
            if i in self.finished:
                continue
            if fresh and i not in self.alive:
                self.alive.add(i)
                rejoined = i in self.dropped
                self.dropped.discard(i)
                position = _get_int(self.store, f"pos/{i}")
                self._event(
                    {
                        "event": "rejoined" if rejoined else "joined",
                        "island": i,
                        "position": position,
                    }
                )
            elif not fresh and i in self.alive:
                self.alive.discard(i)
                self.dropped.add(i)
                self._event({"event": "dropped", "island": i, "silent_s": round(now - beat, 1)})
        for i in range(self.islands):
            pushed = _get_int(self.store, f"pushed/{i}")
            while self.seen[i] < pushed:
                self.seen[i] += 1
                self._apply(self._take(i, self.seen[i]))
                self.store.set(f"applied/{i}/{self.seen[i]}", str(self.version))
        if self._checkpoint_due():
            self.save_state()

    def _take(self, island: int, seq: int) -> Contribution:
        meta = json.loads(self.store.get(f"meta/{island}/{seq}"))
        payload = _tensor(get_bytes(self.store, f"push/{island}/{seq}"), torch.uint8)
        delete_bytes(self.store, f"push/{island}/{seq}")
        n = self.weights.numel()
        vector = self.codec.decode(payload, padded_length(n, self.codec.align))[:n]
        self.store.set(f"pos/{island}", str(meta["position"]))
        self.positions[island] = meta["position"]
        self.tokens += meta["tokens"]
        self.contributions[island] += 1
        return Contribution(island, meta["base"], meta["position"], meta["tokens"], vector)

    @torch.no_grad()
    def _apply(self, c: Contribution) -> None:
        """The plain part of the outer step at once; the momentum once per round."""
        # Over all M islands, as synchronous DiLoCo's mean: an island that is gone counts as
        # zero, and islands finishing at different times do not inflate the last ones.
        m = self.islands
        staleness = self.version - c.base
        weight = staleness_weight(self.version, c.base, m, self.staleness_power)
        scaled = c.pseudo_gradient * (weight / m)
        self.weights.sub_(scaled, alpha=self.outer_lr)
        self.round_sum += scaled
        self.round_count += 1
        momentum_step = self.round_count >= m
        if momentum_step:
            self._momentum_step()
        self.version += 1
        self._publish()
        self._event(
            {
                "event": "outer_step",
                "version": self.version,
                "islands": [c.island],
                "staleness": [staleness],
                "weight": round(weight, 4),
                "momentum": momentum_step,
                "tokens": self.tokens,
            }
        )

    def _momentum_step(self) -> None:
        """Nesterov's momentum part for the round: with the plain parts already applied, the
        round moved the weights by lr (g + mu m), m = mu m + g, g the round's sum."""
        self.momentum.mul_(self.outer_momentum).add_(self.round_sum)
        self.weights.sub_(self.momentum, alpha=self.outer_lr * self.outer_momentum)
        self.round_sum.zero_()
        self.round_count = 0

    def all_done(self) -> bool:
        return len(self.finished) == self.islands

    def run(self, poll_s: float = 0.02) -> None:
        """Poll until every island finished, or the rest are dropped and past rejoin_wait_s."""
        gone_since: float | None = None
        while not self.stop_event.is_set():
            self.poll()
            if self.all_done():
                break
            if not self.alive and len(self.finished) + len(self.dropped) == self.islands:
                gone_since = gone_since or time.time()
                if time.time() - gone_since > self.rejoin_wait_s:
                    break
            else:
                gone_since = None
            time.sleep(poll_s)
        if self.round_count:  # the last, partial round gets its momentum too
            self._momentum_step()
            self.version += 1
            self._publish()
        if self.state_path is not None and self.checkpoint_every:
            self.save_state()  # a launcher killed from here on finds the run done
        self.store.set("g/final", str(self.version))


class AsyncIsland:
    """The outer loop of one decoupled island (the training loop's OuterSync). With
    `island_group` (the island's K processes, gloo), local rank 0 does the talking and the
    others receive what it pulled: all of it (DDP), or each its own shard (FSDP2)."""

    checkpoint_offset = 0  # (its islands do not checkpoint: they rejoin from the coordinator)

    def __init__(
        self,
        store: Store,
        island: int,
        wan: Wan,
        *,
        inner_steps: int,
        total_steps: int,
        tokens_per_step: int,
        codec: Codec,
        island_group: dist.ProcessGroup | None = None,
    ) -> None:
        self.store, self.island, self.wan = store, island, wan
        self.island_group = island_group
        self.rank = island_group.rank() if island_group is not None else 0
        self.inner_steps, self.total_steps = inner_steps, total_steps
        self.tokens_per_step = tokens_per_step
        self.codec = codec
        self.ledger = Ledger()
        self.pushes = 0

    def _beat(self) -> None:
        if self.rank == 0:
            self.store.set(f"hb/{self.island}", str(time.time()))

    def start(self, model: nn.Module, step: int) -> int:
        params = [p for p in model.parameters() if p.requires_grad]
        # What this process holds and trains: all the weights, or its FSDP2 shard of each.
        self.local = [held(p) for p in params]
        self.total = sum(p.numel() for p in params)
        self.sharded = any(hasattr(p, "to_local") for p in params)
        if self.sharded and self.island_group is None:
            raise ValueError("an island of FSDP2 shards needs its island_group")
        self.sizes = shard_sizes(self.island_group, params) if self.sharded else None
        first_step = step
        if self.rank == 0:
            self._beat()
            position = _get_int(self.store, f"pos/{self.island}")
            first_step = max(step, position)
            # A restarted island continues the count of pushes under which its keys are read.
            self.pushes = _get_int(self.store, f"pushed/{self.island}")
            if first_step >= self.total_steps:  # its last contribution is in: nothing to do
                self.store.set(f"done/{self.island}", "1")
        self.first_step = self._share(first_step)
        self._pull()
        self.since_push = 0
        self.mark = time.perf_counter()
        return self.first_step

    def after_step(self, step: int, model: nn.Module) -> dict[str, float]:
        elapsed = time.perf_counter() - self.mark
        slowdown = self.wan.slowdown[self.island]
        if slowdown > 1:
            time.sleep((slowdown - 1) * elapsed)
        self.ledger.compute_s += time.perf_counter() - self.mark
        self._beat()
        self.since_push += 1
        if self.since_push >= self.inner_steps or step >= self.total_steps:
            self._push(step)
            self._pull()
            self.since_push = 0
            if step >= self.total_steps and self.rank == 0:
                self.store.set(f"done/{self.island}", "1")
        self.mark = time.perf_counter()
        return {"outer_version": self.base, "pushes": self.pushes, **self.ledger.record()}

    @torch.no_grad()
    def _push(self, step: int) -> None:
        """Local rank 0 sends the island's pseudo-gradient (under FSDP2 the others first hand
        it their shards' part)."""
        started = time.perf_counter()
        if self.rank != 0 and not self.sharded:  # DDP: rank 0's pseudo-gradient is the island's
            return
        delta = self.global_weights - flat(self.local).cpu()
        if self.sharded:
            delta = gather_shards(self.island_group, delta, self.sizes)
        if self.rank != 0:
            return
        x = torch.zeros(padded_length(delta.numel(), self.codec.align))
        x[: delta.numel()] = delta
        payload = self.codec.encode(x)
        seq = self.pushes + 1
        meta = {
            "base": self.base,
            "position": step,
            "tokens": self.since_push * self.tokens_per_step,
        }
        key = f"{self.island}/{seq}"
        put_bytes(self.store, f"push/{key}", payload.numpy().tobytes())
        self.store.set(f"meta/{key}", json.dumps(meta))
        self.pushes = self.store.add(f"pushed/{self.island}", 1)
        hold_until(started, self.wan.point_seconds(self.island, payload.numel()))
        # The coordinator applies it within a poll: the pull that follows then holds it.
        # A coordinator that lags past the wait: pull what there is and go on.
        with contextlib.suppress(Exception):
            self.store.wait([f"applied/{self.island}/{self.pushes}"], timedelta(seconds=30))
        self.ledger.bytes_sent += payload.numel()
        self.ledger.exchanges += 1
        self.ledger.comm_s += time.perf_counter() - started

    def _share(self, value: int) -> int:
        """Local rank 0's `value` on every process of the island."""
        if self.island_group is None:
            return value
        box = torch.tensor([value], dtype=torch.int64)
        self._broadcast(box)
        return int(box)

    def _broadcast(self, tensor: torch.Tensor) -> None:
        options = dist.BroadcastOptions()
        options.rootRank = 0
        self.island_group.broadcast([tensor], options).wait()

    @torch.no_grad()
    def _pull(self) -> None:
        """Adopt the newest global weights (a version can vanish while we read: read again);
        local rank 0 reads them from the store and hands them to the island's other ranks (each
        its own shard under FSDP2, which is all of them that a process keeps)."""
        started = time.perf_counter()
        if self.rank == 0:
            while True:
                version = int(self.store.get("g/version"))
                key = f"g/w/{version}"
                if has_bytes(self.store, key):
                    try:
                        raw = get_bytes(self.store, key)
                        break
                    except Exception:  # deleted between check and get
                        continue
            pulled = _tensor(raw, torch.float32)
            hold_until(started, self.wan.point_seconds(self.island, len(raw)))
            self.ledger.bytes_received += len(raw)
        else:
            version = 0
            pulled = None if self.sharded else torch.empty(self.total)
        self.base = self._share(version)  # the others wait here for rank 0's pull
        if self.sharded:
            pulled = scatter_shards(self.island_group, pulled, self.sizes)
        elif self.island_group is not None:
            self._broadcast(pulled)
        self.global_weights = pulled
        self.ledger.comm_s += time.perf_counter() - started
        unflatten_into(self.global_weights, self.local)
