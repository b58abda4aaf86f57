"""A WAN between islands, simulated in-process, and the ledger of what crossed it.

Every outer exchange is timed as it would take over each island's link: `latency` per message
round plus the bytes an island sends or receives (whichever is more) over its bandwidth; an
exchange among several islands lasts as long as its slowest participant's share. When the real
collective (gloo on loopback, NCCL on a host) was quicker, the caller sleeps the difference, so
wall clocks, overlap and waiting behave as on the simulated link. (`tc netem` is not available
here; shaping in-process also works the same on CPU and GPU.) A `slowdown` factor per island
stretches its compute: after each inner step the island sleeps (factor - 1) x the step's time.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Link:
    bandwidth_bps: float = 0.0  # bits per second; 0 = unlimited
    latency_s: float = 0.0  # per message round

    def seconds(self, nbytes: int, rounds: int) -> float:
        wire = nbytes * 8 / self.bandwidth_bps if self.bandwidth_bps > 0 else 0.0
        return rounds * self.latency_s + wire


@dataclass(frozen=True)
class Wan:
    links: tuple[Link, ...]
    slowdown: tuple[float, ...]

    @classmethod
    def build(
        cls,
        islands: int,
        bandwidth_mbit: list[float],
        latency_ms: list[float],
        slowdown: list[float],
    ) -> Wan:
        def per_island(values: list[float], key: str) -> list[float]:
            if len(values) == 1:
                return values * islands
            if len(values) != islands:
                raise ValueError(
                    f"diloco.{key} has {len(values)} values for {islands} islands: give one "
                    "value for all, or one per island"
                )
            return values

        bw = per_island(bandwidth_mbit, "bandwidth_mbit")
        lat = per_island(latency_ms, "latency_ms")
        slow = per_island(slowdown, "slowdown")
        links = tuple(Link(b * 1e6, ms / 1e3) for b, ms in zip(bw, lat, strict=True))
        return cls(links, tuple(slow))

    def exchange_seconds(self, per_island_bytes: int, rounds: int, members: list[int]) -> float:
        """How long a symmetric exchange (every member sends and receives `per_island_bytes`)
        takes: its slowest member's link sets the pace."""
        return max(self.links[i].seconds(per_island_bytes, rounds) for i in members)

    def point_seconds(self, island: int, nbytes: int) -> float:
        """One island sending or fetching `nbytes` over its own link (asynchronous islands)."""
        return self.links[island].seconds(nbytes, 1)


def hold_until(started: float, simulated_s: float) -> None:
    """Sleep until `simulated_s` seconds have passed since `started` (perf_counter)."""
    left = started + simulated_s - time.perf_counter()
    if left > 0:
        time.sleep(left)


@dataclass
class Ledger:
    """What one island spent: bytes over the WAN and where its wall time went."""

    bytes_sent: int = 0
    bytes_received: int = 0
    exchanges: int = 0
    compute_s: float = 0.0  # inner steps (slowdown included)
    comm_s: float = 0.0  # exchanges on the (simulated) link, overlapped or not
    wait_s: float = 0.0  # blocked: for other islands to arrive, or for an exchange to end
    extra: dict[str, float] = field(default_factory=dict)

    def record(self) -> dict[str, float]:
        return {
            "bytes_sent": self.bytes_sent,
            "bytes_received": self.bytes_received,
            "exchanges": self.exchanges,
            "compute_s": round(self.compute_s, 4),
            "comm_s": round(self.comm_s, 4),
            "wait_s": round(self.wait_s, 4),
            **self.extra,
        }
