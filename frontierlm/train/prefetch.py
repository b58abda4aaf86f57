"""Batches built ahead of the training step in a background thread, so the accelerator never
waits for the CPU to cut, pack and copy the next one.

A task's batches are pure functions of their index (see loop.py), so prefetching cannot change
what trains: the loop asks for index i, gets the batch built earlier (or builds it now, after a
skip or rollback jumped elsewhere), and the thread moves on to i+1 ... i+depth. On a GPU the
batches land in pinned (page-locked) memory, which lets the host-to-device copy run
asynchronously, overlapped with the step in flight.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import torch

Batch = dict[str, torch.Tensor]


class Prefetcher:
    def __init__(self, make: Callable[[int], Batch], depth: int, pin_memory: bool) -> None:
        self.make, self.depth, self.pin_memory = make, depth, pin_memory
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="batches") if depth else None
        self.pending: dict[int, Future[Batch]] = {}

    def _build(self, index: int) -> Batch:
        batch = self.make(index)
        if self.pin_memory:
            batch = {key: tensor.pin_memory() for key, tensor in batch.items()}
        return batch

    def __call__(self, index: int) -> Batch:
        if self.pool is None:
            return self._build(index)
        future = self.pending.pop(index, None)
        for stale in [i for i in self.pending if not index < i <= index + self.depth]:
            self.pending.pop(stale).cancel()
        if future is None:
            future = self.pool.submit(self._build, index)
        for ahead in range(index + 1, index + 1 + self.depth):
            if ahead not in self.pending:
                self.pending[ahead] = self.pool.submit(self._build, ahead)
        # An error building a batch surfaces here, when (and only if) that batch is needed.
        return future.result()

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
        self.pending.clear()

    def __enter__(self) -> Prefetcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
