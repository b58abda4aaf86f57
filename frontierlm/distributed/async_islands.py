"""Decoupled (asynchronous) islands: nobody waits for anybody.

Transport and membership are torch.distributed's TCPStore (hosted by the launcher): an island
puts its encoded pseudo-gradient under a key and bumps a counter, reads the newest global
weights by version, and refreshes a heartbeat key every inner step. The coordinator (a thread in
the launcher) owns the global weights and the outer Nesterov optimizer:

  - it collects contributions; when it holds one per live island it takes an outer step with
    their staleness-weighted mean: a pseudo-gradient computed from global version b, arriving at
    version v, has staleness s = v - b and weight (1 + s)^-p (`staleness_power` p) in a mean
    over max(contributions, islands) slots: all islands fresh give DiLoCo's mean, an absent
    island counts as zero, and a stale pseudo-gradient (part of whose progress, measured from
    an older base, the weights already hold) counts less; the step's Nesterov momentum is
    scaled by the sum of the weights (how full the step is);
  - an island whose heartbeat is older than `timeout_s` is dropped (an event in events.jsonl)
    and the outer steps go on with the others;
  - an island that (re)starts reads the newest global weights and the data position it owns
    (the inner steps of its last accepted contribution), so it continues its own data stream;
    the coordinator logs it as joined and counts it in again.

Each island pushes after its own H inner steps (with `dynamic_inner_steps`, H divided by the
island's slowdown, as in Liu et al. 2024, so slow islands contribute about as often and as
fresh as fast ones) and then adopts the newest global weights it finds.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.distributed import Store

from frontierlm.distributed.diloco import OuterNesterov, flat, unflatten_into
from frontierlm.distributed.quantize import Codec, padded_length
from frontierlm.distributed.wan import Ledger, Wan, hold_until
from frontierlm.train.metrics import MetricsLog

KEPT_VERSIONS = 4  # global weights stay readable this many versions back


def staleness_weights(staleness: list[int], power: float, islands: int) -> list[float]:
    """Weights of a buffer of contributions with staleness s: (1 + s)^-power each, over
    max(contributions, islands). Fresh contributions from every island give the plain mean;
    an absent island counts as zero (as in the synchronous mean); a stale one counts less,
    since part of the progress it reports (from an older base) is already in the weights."""
    slots = max(len(staleness), islands)
    return [(1.0 + s) ** -power / slots for s in staleness]


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
    version: int = 0
    alive: set[int] = field(default_factory=set)
    dropped: set[int] = field(default_factory=set)
    finished: set[int] = field(default_factory=set)
    buffer: list[Contribution] = field(default_factory=list)
    seen: dict[int, int] = field(default_factory=dict)
    tokens: int = 0
    contributions: dict[int, int] = field(default_factory=dict)
    stop_event: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self.weights = self.weights.clone()
        self.outer = OuterNesterov([self.weights], self.outer_lr, self.outer_momentum)
        self.seen = dict.fromkeys(range(self.islands), 0)
        self.contributions = dict.fromkeys(range(self.islands), 0)
        self._publish()

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
        """One round: take new contributions, check heartbeats, step when the buffer is full."""
        now = time.time()
        for i in range(self.islands):
            pushed = _get_int(self.store, f"pushed/{i}")
            while self.seen[i] < pushed:
                self.seen[i] += 1
                self._take(i, self.seen[i])
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
        if self.buffer and len(self.buffer) >= max(1, len(self.alive)):
            self._outer_step()

    def _take(self, island: int, seq: int) -> None:
        meta = json.loads(self.store.get(f"meta/{island}/{seq}"))
        payload = _tensor(get_bytes(self.store, f"push/{island}/{seq}"), torch.uint8)
        delete_bytes(self.store, f"push/{island}/{seq}")
        n = self.weights.numel()
        vector = self.codec.decode(payload, padded_length(n, self.codec.align))[:n]
        self.buffer.append(
            Contribution(island, meta["base"], meta["position"], meta["tokens"], vector)
        )
        self.store.set(f"pos/{island}", str(meta["position"]))
        self.tokens += meta["tokens"]
        self.contributions[island] += 1

    def _outer_step(self) -> None:
        staleness = [self.version - c.base for c in self.buffer]
        weights = staleness_weights(staleness, self.staleness_power, self.islands)
        mean = sum(w * c.pseudo_gradient for w, c in zip(weights, self.buffer, strict=True))
        # Momentum in proportion to how full the step is (1 for every island fresh): repeated
        # partial steps would otherwise each get the whole Nesterov push of the past steps and
        # overshoot (Liu et al. 2024 delay the momentum for the same reason).
        fill = min(1.0, sum(weights))
        self.outer.optimizer.param_groups[0]["momentum"] = self.outer_momentum * fill
        self.outer.step(mean)
        self.version += 1
        self._publish()
        self._event(
            {
                "event": "outer_step",
                "version": self.version,
                "islands": [c.island for c in self.buffer],
                "staleness": staleness,
                "tokens": self.tokens,
            }
        )
        self.buffer = []

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
        if self.buffer:  # the last contributions count too
            self._outer_step()
        self.store.set("g/final", str(self.version))


class AsyncIsland:
    """The outer loop of one decoupled island (the training loop's OuterSync)."""

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
    ) -> None:
        self.store, self.island, self.wan = store, island, wan
        self.inner_steps, self.total_steps = inner_steps, total_steps
        self.tokens_per_step = tokens_per_step
        self.codec = codec
        self.ledger = Ledger()
        self.pushes = 0

    def _beat(self) -> None:
        self.store.set(f"hb/{self.island}", str(time.time()))

    def start(self, model: nn.Module, step: int) -> int:
        self.params = [p for p in model.parameters() if p.requires_grad]
        self._beat()
        position = _get_int(self.store, f"pos/{self.island}")
        self.first_step = max(step, position)
        # A restarted island continues the count of pushes under which its keys are read.
        self.pushes = _get_int(self.store, f"pushed/{self.island}")
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
            if step >= self.total_steps:
                self.store.set(f"done/{self.island}", "1")
        self.mark = time.perf_counter()
        return {"outer_version": self.base, "pushes": self.pushes, **self.ledger.record()}

    @torch.no_grad()
    def _push(self, step: int) -> None:
        started = time.perf_counter()
        delta = self.global_weights - flat(self.params).cpu()
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
        self.ledger.bytes_sent += payload.numel()
        self.ledger.exchanges += 1
        self.ledger.comm_s += time.perf_counter() - started

    @torch.no_grad()
    def _pull(self) -> None:
        """Adopt the newest global weights (a version can vanish while we read: read again)."""
        started = time.perf_counter()
        while True:
            version = int(self.store.get("g/version"))
            key = f"g/w/{version}"
            if has_bytes(self.store, key):
                try:
                    raw = get_bytes(self.store, key)
                    break
                except Exception:  # deleted between check and get
                    continue
        self.base = version
        self.global_weights = _tensor(raw, torch.float32)
        hold_until(started, self.wan.point_seconds(self.island, len(raw)))
        self.ledger.bytes_received += len(raw)
        self.ledger.comm_s += time.perf_counter() - started
        unflatten_into(self.global_weights, self.params)
