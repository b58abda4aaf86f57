"""Multi-stage data mixtures: pretraining batches drawn from named token sources by stage.

`pretrain.mixture` lists stages in order, each with a length (steps, a fraction of the run, or a
token budget; the last may take the rest) and weights over the token sources recorded in the
token shards (`tokens/train.src`: each data source's `mixture` name, else its own name, with its
`epochs` already applied to the training tokens). A stage whose weights are unset takes every
source in proportion to its training tokens, the natural mix, so a late stage can anneal on the
cleanest sources after a long stage on everything.

Every window of a batch is a pure function of the micro-step index:
  - the data step (index // grad_accum) picks the stage; boundaries are in data steps, so a
    batch the spike guard skips still counts towards its stage's budget, and data steps past
    the end of the run (after skips) stay in the last stage;
  - the window's position in the stage's stream of windows picks its source by `Apportionment`
    (train/sampler.py): the first P windows of a stage hold w_s P +- 1.5 windows of source s for
    up to 8 sources. Chosen over an independent draw per window, which gives each batch a
    random make-up (a 16-window batch with a 10% source lacks it 18% of the time), and over a
    fixed per-batch allocation by largest remainder, which gives a source nothing, ever, when
    its weight times the batch size is below one half;
  - the number of windows the source gave before (counted exactly, also across earlier
    stages) is the window's place in that source's own seeded epoch order, so within a source
    every window is seen once per epoch, as `ShuffledWindows` does for the whole stream, and a
    later stage continues each source's epoch where the earlier stages left it.
A source's windows are cut at fixed strides from its documents laid end to end (each opens with
BOS, so document masking works unchanged).
"""

from __future__ import annotations

import bisect
import zlib
from dataclasses import dataclass

import numpy as np
import torch

from frontierlm.config import MixtureStage, PretrainConfig
from frontierlm.console import console
from frontierlm.tokenizer.shards import TokenSplit, window_batch
from frontierlm.train.loop import Batch
from frontierlm.train.sampler import Apportionment, EpochSampler


class SourceWindows:
    """(seq_len + 1)-token windows of one source's documents laid end to end, in a seeded
    epoch order of their own."""

    def __init__(self, split: TokenSplit, index: int, seq_len: int, seed: int) -> None:
        self.name = split.source_names[index]
        self.tokens, self.seq_len = split.tokens, seq_len
        spans = split.source_spans(index)
        self.starts = spans[:, 0]
        # Where each span begins in the source's own stream of tokens.
        self.offsets = np.concatenate([[0], np.cumsum(spans[:, 1] - spans[:, 0])])
        self.n_tokens = int(self.offsets[-1])
        self.n_windows = max(self.n_tokens - 1, 0) // seq_len
        # Seeded by name as well as run seed: sources do not share one order, and adding a
        # source to the data leaves the others' orders as they were.
        seed_s = (seed << 32) | zlib.crc32(self.name.encode())
        self.order = EpochSampler(self.n_windows, 1, seed_s) if self.n_windows else None

    def window(self, k: int) -> np.ndarray:
        """The source's k-th window over all epochs."""
        start = self.order.example(k) * self.seq_len
        end = start + self.seq_len + 1
        span = int(np.searchsorted(self.offsets, start, side="right")) - 1
        pieces = []
        while start < end:
            take = min(end, int(self.offsets[span + 1])) - start
            begin = int(self.starts[span]) + start - int(self.offsets[span])
            pieces.append(np.asarray(self.tokens[begin : begin + take], dtype=np.int64))
            start += take
            span += 1
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)


@dataclass
class PlannedStage:
    name: str
    first_step: int  # data steps [first_step, end_step)
    end_step: int
    sources: list[int]  # indices into MixtureWindows.sources, positive weight only
    shares: list[float]  # normalised weights of `sources`
    deal: Apportionment
    before: dict[int, int]  # windows each source gave in the earlier stages


class MixtureWindows:
    """Batches of windows from the token sources, by the stages of `loop.mixture`."""

    def __init__(
        self,
        split: TokenSplit,
        loop: PretrainConfig,
        seed: int,
        bos_id: int | None = None,
        tag_sources: bool = False,
    ) -> None:
        """`tag_sources`: each batch carries the token source of every target
        (`token_sources`, for the per-source losses of `lm_loss`)."""
        if not loop.mixture:
            raise ValueError("MixtureWindows needs pretrain.mixture stages")
        if split.doc_sources is None:
            raise ValueError(
                "pretrain.mixture needs the data source of every training document, and these "
                "token shards were written before sources were recorded: rerun the tokenize "
                "stage (frontierlm tokenize RECIPE --force)"
            )
        self.seq_len, self.batch_size = loop.seq_len, loop.batch_size
        self.grad_accum, self.seed, self.bos_id = loop.grad_accum, seed, bos_id
        self.tag_sources = tag_sources
        self.sources = [
            SourceWindows(split, i, loop.seq_len, seed) for i in range(len(split.source_names))
        ]
        by_name = {s.name: i for i, s in enumerate(self.sources)}
        self.ends = loop.mixture_ends()
        self.stages: list[PlannedStage] = []
        used = dict.fromkeys(range(len(self.sources)), 0)  # windows dealt in earlier stages
        for i, (stage, end) in enumerate(zip(loop.mixture, self.ends, strict=True)):
            first = self.ends[i - 1] if i else 0
            weights = self._weights(i, stage, by_name)
            picked = sorted(weights)
            total = sum(weights.values())
            deal = Apportionment([weights[s] for s in picked])
            shares = [weights[s] / total for s in picked]
            self.stages.append(
                PlannedStage(stage.name, first, end, picked, shares, deal, dict(used))
            )
            windows = (end - first) * self.grad_accum * self.batch_size
            for s, n in zip(picked, deal.counts(windows), strict=True):
                used[s] += n
        self._announced: int | None = None

    def _weights(self, i: int, stage: MixtureStage, by_name: dict[str, int]) -> dict[int, float]:
        """Source index -> positive weight of one stage, checked against the token shards."""
        listing = ", ".join(f"{s.name} ({s.n_tokens:,} tokens)" for s in self.sources)
        if stage.weights is None:  # the natural mix: every source that has a window
            return {j: float(s.n_windows) for j, s in enumerate(self.sources) if s.n_windows}
        weights: dict[int, float] = {}
        for name, weight in stage.weights.items():
            key = f"pretrain.mixture[{i}].weights.{name}"
            if name not in by_name:
                raise ValueError(
                    f"{key}: the training tokens have no token source {name!r}; they are "
                    f"{listing} (a source missing here was filtered away whole, not tokenized, "
                    "or given no documents by its epochs)"
                )
            if weight > 0 and not self.sources[by_name[name]].n_windows:
                raise ValueError(
                    f"{key}: source {name!r} has {self.sources[by_name[name]].n_tokens} training "
                    f"tokens, not one window of seq_len + 1 = {self.seq_len + 1}: give it weight "
                    "0, more data, or a shorter seq_len"
                )
            if weight > 0:
                weights[by_name[name]] = weight
        return weights

    def stage_of(self, index: int) -> int:
        """Which stage the micro-step `index` draws from."""
        data_step = index // self.grad_accum
        return min(bisect.bisect_right(self.ends, data_step), len(self.stages) - 1)

    def describe(self, number: int) -> str:
        stage = self.stages[number]
        windows = (stage.end_step - stage.first_step) * self.grad_accum * self.batch_size
        parts = []
        for s, share, n in zip(
            stage.sources, stage.shares, stage.deal.counts(windows), strict=True
        ):
            source = self.sources[s]
            parts.append(f"{source.name} {share:.1%} ({n / source.n_windows:.2f} epochs)")
        return (
            f"data mixture stage {number + 1}/{len(self.stages)} {stage.name!r}, steps "
            f"{stage.first_step + 1}-{stage.end_step}: {', '.join(parts)}"
        )

    def __call__(self, index: int) -> Batch:
        number = self.stage_of(index)
        if number != self._announced:  # logging only: batches never depend on it
            console.print(f"pretrain: {self.describe(number)}")
            self._announced = number
        stage = self.stages[number]
        first = (index - stage.first_step * self.grad_accum) * self.batch_size
        rows, row_sources = [], []
        for position in range(first, first + self.batch_size):
            which, k = stage.deal.owner(position)
            s = stage.sources[which]
            rows.append(self.sources[s].window(stage.before[s] + k))
            row_sources.append(s)
        # Seeded row order: the regular interleave would otherwise tie a row's place in the
        # batch to its source (and a process's rows, split by stride, to a few sources).
        order = np.random.default_rng([self.seed, index]).permutation(self.batch_size)
        batch = window_batch(torch.from_numpy(np.stack(rows)[order]), self.bos_id)
        batch["mixture_stage"] = torch.full((self.batch_size,), number, dtype=torch.int64)
        if self.tag_sources:  # a window holds one source's documents only
            per_row = torch.tensor(row_sources, dtype=torch.int64)[torch.from_numpy(order)]
            batch["token_sources"] = per_row[:, None].expand(-1, self.seq_len).contiguous()
        return batch
