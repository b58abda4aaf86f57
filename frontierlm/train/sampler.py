"""Which examples make up batch i: a pure function of (seed, i), reshuffled every epoch.

Because the order is derived, not iterated, a resumed run needs no data-loader state."""

from __future__ import annotations

from collections.abc import Sequence
from fractions import Fraction

import numpy as np


class EpochSampler:
    def __init__(self, n_examples: int, batch_size: int, seed: int) -> None:
        if n_examples < 1:
            raise ValueError("no training examples: check the sources' paths and `take` ranges")
        self.n, self.batch_size, self.seed = n_examples, batch_size, seed
        # Per instance, not functools.lru_cache on the method: that cache would be one for all
        # samplers, and a mixture interleaving several sources would rebuild every permutation
        # on every window.
        self._orders: dict[int, np.ndarray] = {}

    def _order(self, epoch: int) -> np.ndarray:
        if epoch not in self._orders:
            if len(self._orders) >= 2:  # the current epoch and the next are all a run needs
                self._orders.pop(next(iter(self._orders)))
            self._orders[epoch] = np.random.default_rng([self.seed, epoch]).permutation(self.n)
        return self._orders[epoch]

    def example(self, position: int) -> int:
        """The example at `position` of the endless sequence of epochs."""
        return int(self._order(position // self.n)[position % self.n])

    def __call__(self, index: int) -> list[int]:
        return [
            self.example(s) for s in range(index * self.batch_size, (index + 1) * self.batch_size)
        ]


class Apportionment:
    """Deals the positions 0, 1, 2, ... of an endless stream to parties in proportion to their
    weights, as a pure function of the position.

    The parties are the leaves of a balanced binary tree. A node holding P of the first
    positions gives the first floor(r P + 1/2) of them to its left child (r: the left side's
    share of the node's weight), the rest to the right. That count grows by 0 or 1 with each
    position, so every party's count does too and the counts always add up to P. Each level
    is off by at most half a position, so after any prefix of P positions party s holds
    w_s P +- depth / 2 of them (depth = ceil(log2 parties)): within 1.5 positions for up to 8
    parties, over 16 positions as over a million. The arithmetic is on exact integers, so the
    same position gives the same party on every machine."""

    def __init__(self, weights: Sequence[float]) -> None:
        if not weights or any(w <= 0 for w in weights):
            raise ValueError(f"apportionment needs positive weights, got {list(weights)}")
        self.parties = len(weights)
        self._tree = self._build(list(range(len(weights))), [Fraction(w) for w in weights])

    @classmethod
    def _build(cls, parties: list[int], weights: list[Fraction]) -> int | tuple:
        if len(parties) == 1:
            return parties[0]
        half = len(parties) // 2
        left = sum(weights[p] for p in parties[:half])
        share = left / (left + sum(weights[p] for p in parties[half:]))
        return (
            share.numerator,
            share.denominator,
            cls._build(parties[:half], weights),
            cls._build(parties[half:], weights),
        )

    @staticmethod
    def _left(num: int, den: int, held: int) -> int:
        return (2 * num * held + den) // (2 * den)  # floor(held * num / den + 1/2)

    def counts(self, positions: int) -> list[int]:
        """How many of the first `positions` positions each party holds."""
        out = [0] * self.parties

        def walk(node: int | tuple, held: int) -> None:
            if isinstance(node, int):
                out[node] = held
                return
            num, den, left, right = node
            to_left = self._left(num, den, held)
            walk(left, to_left)
            walk(right, held - to_left)

        walk(self._tree, positions)
        return out

    def owner(self, position: int) -> tuple[int, int]:
        """(party, how many earlier positions that party holds) for one position."""
        node, held = self._tree, position
        while not isinstance(node, int):
            num, den, left, right = node
            before = self._left(num, den, held)
            if self._left(num, den, held + 1) > before:
                node, held = left, before
            else:
                node, held = right, held - before
        return node, held
