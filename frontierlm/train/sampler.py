"""Which examples make up batch i: a pure function of (seed, i), reshuffled every epoch.

Because the order is derived, not iterated, a resumed run needs no data-loader state."""

from __future__ import annotations

from functools import lru_cache

import numpy as np


class EpochSampler:
    def __init__(self, n_examples: int, batch_size: int, seed: int) -> None:
        if n_examples < 1:
            raise ValueError("no training examples: check the sources' paths and `take` ranges")
        self.n, self.batch_size, self.seed = n_examples, batch_size, seed

    @lru_cache(maxsize=2)  # noqa: B019 - the sampler lives as long as its training run
    def _order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.n)

    def __call__(self, index: int) -> list[int]:
        return [
            int(self._order(s // self.n)[s % self.n])
            for s in range(index * self.batch_size, (index + 1) * self.batch_size)
        ]
