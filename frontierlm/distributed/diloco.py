"""DiLoCo and Streaming DiLoCo: islands that train alone and meet every H steps.

Each island runs the ordinary training loop (train/loop.py) on its own share of the data, with
its own inner optimizer (AdamW or Muon). Every H inner steps it computes the pseudo-gradient
(global weights minus its local weights); the islands average their pseudo-gradients across
islands only, an outer Nesterov SGD (Douillard et al. 2023: lr 0.7, momentum 0.9) moves the
global weights, and every island adopts them and goes on.

Streaming DiLoCo (Douillard et al. 2025) splits the parameters into P fragments synchronised at
staggered steps (fragment p at steps = (p + 1) H / P mod H), so each exchange is 1/P of the model.
The exchange runs on a background thread: its result is applied `overlap` inner steps later,
during which the island keeps computing; the island's own progress in that window is kept on top
of the new global fragment. Outer gradients travel as fp32, bf16, int8 or 4-bit (quantize.py).

The average is a two-phase all-reduce of payloads (as a ring would move them): every island
sends chunk j of its encoded pseudo-gradient to island j (all_to_all), island j decodes, averages
and re-encodes its chunk, then the averaged chunks are all-gathered and decoded. Every island
decodes the same bytes, so the global weights stay identical everywhere; each island sends and
receives 2 (M - 1) / M of one payload per exchange, the figure the ledger counts.

An island of K processes (diloco.processes_per_island) trains data parallel inside, as a
torchrun job would (DDP or FSDP2 on its own default process group). Local rank r of every island
joins a cross-island group, and each process exchanges its 1/K of the pseudo-gradient there: under
DDP (every process holds all the weights) slice r of the flat vector, then the island's processes
all-gather the averaged slices; under FSDP2 the shard the process holds, with nothing to gather.
The island's link carries the sum of its processes' payloads, which is what the ledger counts
and the WAN simulator times: the same bytes as an island of one process, up to padding.

A killed run resumes (`state_dir`, `checkpoint_every`): at the steps the training loop
checkpoints the island (its weights, inner optimizer and data position), every process also
writes its outer state beside it, atomically: the global weights of each fragment (its shard of
them under FSDP2), the outer Nesterov momentum, the outer step count, the fragments' last syncs
and the ledger. Every island holds the same global weights and momentum (they all apply the
same mean), so each keeps its own copy and resumes from it, and the islands go on from the same
step as if never stopped.

That state is whole only at a step with no exchange in flight. With overlap > 0 the exchange
launched at a multiple of H (the last fragment's, whose offset is 0) lands `overlap` steps
later, so checkpoints are taken then (`checkpoint_offset`): at step kH + overlap the exchange
launched at kH has just been applied, every earlier one was applied before kH (consecutive
launches are at least H // P > overlap steps apart) and the next is launched at kH + H // P.
Nothing is in flight, the outer state is the same kind as with overlap = 0, and the run's
arithmetic is untouched: no exchange is waited for early or applied at another step.
"""

from __future__ import annotations

import dataclasses
import re
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from frontierlm.atomic import atomic_file
from frontierlm.distributed.quantize import Codec, padded_length
from frontierlm.distributed.wan import Ledger, Wan, hold_until
from frontierlm.train.metrics import MetricsLog

OUTER_STATE = re.compile(r"step_(\d{7})\.rank(\d+)\.pt")


def outer_state_path(state_dir: Path, step: int, rank: int) -> Path:
    return state_dir / f"step_{step:07d}.rank{rank}.pt"


def outer_state_steps(state_dir: Path, processes: int) -> list[int]:
    """The steps for which every one of the island's processes wrote its outer state."""
    if not state_dir.is_dir():
        return []
    ranks: dict[int, set[int]] = {}
    for path in state_dir.iterdir():
        if match := OUTER_STATE.fullmatch(path.name):
            ranks.setdefault(int(match[1]), set()).add(int(match[2]))
    return sorted(step for step, seen in ranks.items() if seen >= set(range(processes)))


def split_fragments(params: list[nn.Parameter], parts: int) -> list[list[nn.Parameter]]:
    """`params` in order, cut into `parts` contiguous groups of about equal size."""
    if parts > len(params):
        raise ValueError(f"diloco.fragments={parts} exceeds the model's {len(params)} tensors")
    total = sum(p.numel() for p in params)
    groups: list[list[nn.Parameter]] = [[] for _ in range(parts)]
    seen, index = 0, 0
    for i, p in enumerate(params):
        # The group in which the tensor's middle falls, moving on at most one group per tensor
        # and leaving at least one tensor for each group still to come.
        middle = (seen + p.numel() / 2) * parts / total
        index = min(max(index, int(middle)), index + 1 if groups[index] else index)
        index = max(index, parts - (len(params) - i))
        groups[index].append(p)
        seen += p.numel()
    return groups


def fragment_offsets(inner_steps: int, parts: int) -> list[int]:
    """The step (mod H) at which each fragment syncs; the last one at multiples of H."""
    return [((p + 1) * inner_steps // parts) % inner_steps for p in range(parts)]


def held(param: torch.Tensor) -> torch.Tensor:
    """What this process holds of `param`: its FSDP2 shard (a view of the DTensor's local
    tensor, so writing it writes the parameter), or the plain tensor itself."""
    return param.to_local() if hasattr(param, "to_local") else param


def shard_sizes(group: dist.ProcessGroup, params: list[torch.Tensor]) -> list[list[int]]:
    """sizes[r][i]: the elements of parameter i that local rank r of `group` holds. FSDP2 shards
    a parameter along dim 0 (Shard(0)), so rank r's shard is a contiguous run of the flattened
    parameter, after those of ranks 0..r-1 (uneven: a 97-row embedding splits 49 / 48)."""
    from torch.distributed.tensor import Shard

    for p in params:
        placements = getattr(p, "placements", (Shard(0),))
        if any(type(x) is not Shard or x.dim != 0 for x in placements):
            raise NotImplementedError(
                f"FSDP2 placements {placements}: islands gather and scatter Shard(0) only (issue 9)"
            )
    mine = torch.tensor([held(p).numel() for p in params], dtype=torch.int64)
    every = [torch.empty_like(mine) for _ in range(group.size())]
    group.allgather([every], [mine]).wait()
    return [row.tolist() for row in every]


def join_shards(parts: list[torch.Tensor], sizes: list[list[int]]) -> torch.Tensor:
    """The flat vector of the full parameters (the order `flat` gives the unsharded model) from
    each rank's flat shards (`flat` of what it holds); the inverse of `split_shards`."""
    pieces, offsets = [], [0] * len(parts)
    for i in range(len(sizes[0])):
        for r, part in enumerate(parts):
            pieces.append(part[offsets[r] : offsets[r] + sizes[r][i]])
            offsets[r] += sizes[r][i]
    return torch.cat(pieces)


def split_shards(vector: torch.Tensor, sizes: list[list[int]]) -> list[torch.Tensor]:
    """Each rank's flat shards of the full parameters' flat `vector`."""
    parts: list[list[torch.Tensor]] = [[] for _ in sizes]
    offset = 0
    for i in range(len(sizes[0])):
        for r, row in enumerate(sizes):
            parts[r].append(vector[offset : offset + row[i]])
            offset += row[i]
    return [torch.cat(part) for part in parts]


def gather_shards(
    group: dist.ProcessGroup, part: torch.Tensor, sizes: list[list[int]]
) -> torch.Tensor | None:
    """The full flat vector on local rank 0 of `group` (None elsewhere) from every rank's flat
    shards `part` (fp32 CPU); padded to the longest, as gloo gathers equal sizes."""
    longest = max(sum(row) for row in sizes)
    padded = torch.zeros(longest)
    padded[: part.numel()] = part
    root = group.rank() == 0
    received = [[torch.empty(longest) for _ in sizes]] if root else []
    options = dist.GatherOptions()
    options.rootRank = 0
    group.gather(received, [padded], options).wait()
    if not root:
        return None
    return join_shards([x[: sum(row)] for x, row in zip(received[0], sizes, strict=True)], sizes)


def scatter_shards(
    group: dist.ProcessGroup, vector: torch.Tensor | None, sizes: list[list[int]]
) -> torch.Tensor:
    """This rank's flat shards of the full flat `vector` that local rank 0 of `group` holds
    (the others pass None): each rank receives its own part only."""
    longest = max(sum(row) for row in sizes)
    mine = torch.empty(longest)
    sent = []
    if group.rank() == 0:
        padded = [torch.zeros(longest) for _ in sizes]
        for x, part in zip(padded, split_shards(vector, sizes), strict=True):
            x[: part.numel()] = part
        sent = [padded]
    options = dist.ScatterOptions()
    options.rootRank = 0
    group.scatter([mine], sent, options).wait()
    return mine[: sum(sizes[group.rank()])]


def flat(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1).float() for t in tensors])


def unflatten_into(vector: torch.Tensor, tensors: list[torch.Tensor]) -> None:
    offset = 0
    for t in tensors:
        n = t.numel()
        t.copy_(vector[offset : offset + n].view_as(t).to(t.dtype))
        offset += n


def island_mean(
    group: dist.ProcessGroup, vector: torch.Tensor, codec: Codec
) -> tuple[torch.Tensor, int]:
    """The mean over the group's islands of `vector` (CPU fp32), each sent through `codec`;
    returns it and the bytes this island sent (it receives as many)."""
    size, n = group.size(), vector.numel()
    padded = padded_length(n, size * codec.align)
    x = torch.zeros(padded)
    x[:n] = vector
    chunk = padded // size
    if size == 1:  # nothing to exchange, but the same rounding as with company
        return codec.decode(codec.encode(x), padded)[:n], 0
    payload = codec.payload_bytes(chunk)
    send = torch.cat([codec.encode(part) for part in x.view(size, chunk)])
    received = torch.empty(size * payload, dtype=torch.uint8)
    group.alltoall_base(received, send, [payload] * size, [payload] * size).wait()
    mine = torch.stack(
        [codec.decode(received[j * payload : (j + 1) * payload], chunk) for j in range(size)]
    ).mean(dim=0)
    gathered = [torch.empty(payload, dtype=torch.uint8) for _ in range(size)]
    group.allgather([gathered], [codec.encode(mine)]).wait()
    mean = torch.cat([codec.decode(part, chunk) for part in gathered])[:n]
    return mean, 2 * (size - 1) * payload


class OuterNesterov:
    """Nesterov SGD on the global weights of one fragment, stepped with a pseudo-gradient."""

    def __init__(self, global_weights: list[torch.Tensor], lr: float, momentum: float) -> None:
        self.weights = global_weights
        self.optimizer = torch.optim.SGD(
            global_weights, lr=lr, momentum=momentum, nesterov=momentum > 0
        )

    def step(self, pseudo_gradient: torch.Tensor) -> None:
        offset = 0
        for w in self.weights:
            n = w.numel()
            w.grad = pseudo_gradient[offset : offset + n].view_as(w).to(w.device, w.dtype)
            offset += n
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def state_dict(self) -> dict:
        return self.optimizer.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state)


@dataclass
class _InFlight:
    fragment: int
    future: Future
    due: int  # the inner step at which its result is applied
    snapshot: torch.Tensor  # the local fragment when its pseudo-gradient was taken


class DilocoSync:
    """The outer loop of one synchronous island, called by the training loop after every inner
    step (`after_step`). `group` holds one process of each island (this one at `island`):
    local rank r of every island, when `island_group` (the island's own K processes, gloo,
    used only by the exchange thread, never by the training loop's collectives) is given."""

    def __init__(
        self,
        group: dist.ProcessGroup,
        island: int,
        wan: Wan,
        *,
        inner_steps: int,
        total_steps: int,
        outer_lr: float = 0.7,
        outer_momentum: float = 0.9,
        fragments: int = 1,
        overlap: int = 0,
        codec: Codec | None = None,
        global_log: MetricsLog | None = None,
        island_group: dist.ProcessGroup | None = None,
        state_dir: Path | None = None,
        checkpoint_every: int = 0,
        keep_states: int = 2,
    ) -> None:
        if overlap >= inner_steps // fragments:
            raise ValueError(
                f"diloco.overlap={overlap} must be below the steps between a fragment's syncs "
                f"(inner_steps / fragments = {inner_steps // fragments})"
            )
        self.group, self.island, self.wan = group, island, wan
        self.inner_steps, self.total_steps = inner_steps, total_steps
        self.outer_lr, self.outer_momentum = outer_lr, outer_momentum
        self.n_fragments, self.overlap = fragments, overlap
        self.codec = codec or Codec()
        self.global_log = global_log
        self.island_group = island_group
        self.processes = island_group.size() if island_group is not None else 1
        self.rank = island_group.rank() if island_group is not None else 0
        self.ledger = Ledger()
        self.outer_steps = 0
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="diloco-exchange")
        self.in_flight: list[_InFlight] = []
        # The steps at which the training loop checkpoints (and at the end): the outer state
        # is written at the same ones, so a checkpoint has its outer state beside it.
        self.state_dir, self.checkpoint_every = state_dir, checkpoint_every
        self.keep_states = keep_states
        if overlap and checkpoint_every % inner_steps:
            raise ValueError(
                f"checkpoint_every={checkpoint_every} must be a multiple of inner_steps="
                f"{inner_steps} with overlap={overlap}: only then is no exchange in flight "
                "at the steps checkpoints are taken"
            )
        # The loop checkpoints (and the outer state is written) `overlap` steps past each
        # multiple of checkpoint_every, once the exchange launched there has been applied.
        self.checkpoint_offset = overlap

    # -------------------------------------------------------------- the loop's hooks

    def start(self, model: nn.Module, step: int) -> int:
        params = [p for p in model.parameters() if p.requires_grad]
        # FSDP2: each process holds a shard, the same one as its local rank in every island.
        self.sharded = any(hasattr(p, "to_local") for p in params)
        if step == 0:
            with torch.no_grad():  # every island starts from island 0's weights
                weights = flat([held(p) for p in params]).cpu()
                options = dist.BroadcastOptions()
                options.rootRank = 0
                self.group.broadcast([weights], options).wait()
                unflatten_into(weights, [held(p) for p in params])
        # (Resumed: each island's own weights from its checkpoint, which differ from the
        # others' by the progress of fragments synced before the checkpoint step.)
        # Fragments by the full parameters' sizes: the same split in every process.
        self.fragments = split_fragments(params, self.n_fragments)
        self.global_weights = [[held(p).detach().clone() for p in frag] for frag in self.fragments]
        self.outer = [
            OuterNesterov(weights, self.outer_lr, self.outer_momentum)
            for weights in self.global_weights
        ]
        self.offsets = fragment_offsets(self.inner_steps, self.n_fragments)
        self.last_sync = [step] * self.n_fragments
        if step > 0:
            self._resume(step)
        self.mark = time.perf_counter()
        return step

    # -------------------------------------------------------------- resume

    def _state_path(self, step: int) -> Path:
        return outer_state_path(self.state_dir, step, self.rank)

    def _resume(self, step: int) -> None:
        path = self._state_path(step) if self.state_dir is not None else None
        if path is None or not path.is_file():
            raise RuntimeError(
                f"island {self.island} resumes its inner training at step {step} but has no "
                f"outer state for it ({path}): the islands' checkpoints and outer states do not "
                "match; delete the run's diloco.partial directory to start over"
            )
        state = torch.load(path, map_location="cpu", weights_only=True)
        with torch.no_grad():
            for mine, saved in zip(self.global_weights, state["global_weights"], strict=True):
                for weight, value in zip(mine, saved, strict=True):
                    weight.copy_(value)
        for outer, saved in zip(self.outer, state["outer"], strict=True):
            outer.load_state_dict(saved)
        self.outer_steps, self.last_sync = state["outer_steps"], list(state["last_sync"])
        self.ledger = Ledger(**state["ledger"])
        if self.global_log is not None:  # forget outer steps the resumed state does not hold
            self.global_log.truncate_after(step)

    def _save_state(self, step: int) -> None:
        if self.in_flight:  # cannot happen at a checkpoint step: see the module's docstring
            raise RuntimeError(f"island {self.island}: an exchange is in flight at step {step}")
        state = {
            "global_weights": [[w.cpu() for w in frag] for frag in self.global_weights],
            "outer": [outer.state_dict() for outer in self.outer],
            "outer_steps": self.outer_steps,
            "last_sync": self.last_sync,
            "ledger": dataclasses.asdict(self.ledger),
        }
        self.state_dir.mkdir(parents=True, exist_ok=True)
        with atomic_file(self._state_path(step)) as f:
            torch.save(state, f)
        for old in outer_state_steps(self.state_dir, self.processes)[: -self.keep_states]:
            self._state_path(old).unlink(missing_ok=True)

    def after_step(self, step: int, model: nn.Module) -> dict[str, float]:
        elapsed = time.perf_counter() - self.mark
        slowdown = self.wan.slowdown[self.island]
        if slowdown > 1:  # a slower island: its step takes `slowdown` times as long
            time.sleep((slowdown - 1) * elapsed)
        self.ledger.compute_s += time.perf_counter() - self.mark
        final = step >= self.total_steps
        for job in [j for j in self.in_flight if j.due <= step or final]:
            self._apply(job)
        for p in range(self.n_fragments):
            due = step % self.inner_steps == self.offsets[p]
            if (due or final) and self.last_sync[p] < step:
                job = self._launch(p, step, 0 if final else self.overlap)
                if job.due <= step:
                    self._apply(job)
        if final:
            self.executor.shutdown(wait=True)
        every, offset = self.checkpoint_every, self.checkpoint_offset
        if (
            self.state_dir is not None
            and every
            and ((step > offset and (step - offset) % every == 0) or final)
        ):
            self._save_state(step)  # before the loop's checkpoint of the same step
        self.mark = time.perf_counter()
        return {"outer_step": self.outer_steps, **self.ledger.record()}

    # -------------------------------------------------------------- exchanges

    def _local(self, fragment: int) -> list[torch.Tensor]:
        return [held(param) for param in self.fragments[fragment]]

    def _launch(self, p: int, step: int, overlap: int) -> _InFlight:
        local = flat(self._local(p))
        pseudo_gradient = flat(self.global_weights[p]) - local
        self.last_sync[p] = step
        future = self.executor.submit(self._exchange, pseudo_gradient.cpu())
        job = _InFlight(p, future, step + overlap, local)
        self.in_flight.append(job)
        return job

    def _exchange(self, pseudo_gradient: torch.Tensor) -> tuple[torch.Tensor, float]:
        """On the exchange thread: wait for every island, then average over the (simulated)
        link. Returns the mean and the seconds it spent on the link."""
        started = time.perf_counter()
        self.group.allreduce([torch.zeros(1)]).wait()  # arrival: waits for the slowest island
        arrived = time.perf_counter()
        self.ledger.extra["arrival_wait_s"] = round(
            self.ledger.extra.get("arrival_wait_s", 0.0) + arrived - started, 4
        )
        mean, sent = island_mean(self.group, self._my_part(pseudo_gradient), self.codec)
        island_sent = self._island_sum(sent)  # what crosses the island's link
        members = list(range(self.group.size()))
        hold_until(arrived, self.wan.exchange_seconds(island_sent, rounds=2, members=members))
        mean = self._whole(mean, pseudo_gradient.numel())
        comm = time.perf_counter() - arrived
        self.ledger.bytes_sent += island_sent
        self.ledger.bytes_received += island_sent
        if self.processes > 1:
            self.ledger.extra["process_bytes_sent"] = (
                self.ledger.extra.get("process_bytes_sent", 0) + sent
            )
        self.ledger.exchanges += 1
        self.ledger.comm_s += comm
        return mean, comm

    def _replicated(self) -> bool:
        """Several processes that each hold all the weights (DDP): each exchanges a slice."""
        return self.processes > 1 and not self.sharded

    def _my_part(self, vector: torch.Tensor) -> torch.Tensor:
        """This process's slice r of K of the (padded) vector under DDP, else all of it."""
        if not self._replicated():
            return vector
        n = vector.numel()
        padded = padded_length(n, self.processes * self.group.size() * self.codec.align)
        x = torch.zeros(padded)
        x[:n] = vector
        return x.view(self.processes, -1)[self.rank]

    def _whole(self, part: torch.Tensor, n: int) -> torch.Tensor:
        """The island's K averaged slices put together (DDP); a shard stays as it is."""
        if not self._replicated():
            return part
        parts = [torch.empty_like(part) for _ in range(self.processes)]
        self.island_group.allgather([parts], [part]).wait()
        return torch.cat(parts)[:n]

    def _island_sum(self, sent: int) -> int:
        if self.processes == 1:
            return sent
        total = torch.tensor([sent], dtype=torch.int64)
        self.island_group.allreduce([total]).wait()
        return int(total)

    @torch.no_grad()
    def _apply(self, job: _InFlight) -> None:
        blocked = time.perf_counter()
        mean, comm = job.future.result()
        blocked = time.perf_counter() - blocked
        # Time the island stood still: on the link (exposed communication) or for others.
        exposed = min(blocked, comm)
        self.ledger.extra["comm_exposed_s"] = round(
            self.ledger.extra.get("comm_exposed_s", 0.0) + exposed, 4
        )
        self.ledger.wait_s += blocked - exposed
        self.in_flight.remove(job)
        p = job.fragment
        self.outer[p].step(mean)
        local = self._local(p)
        progress = flat(local) - job.snapshot  # steps taken while the exchange ran
        unflatten_into(flat(self.global_weights[p]) + progress, local)
        self.outer_steps += 1
        if self.global_log is not None:
            record = {"step": job.due, "outer_step": self.outer_steps, "fragment": p}
            self.global_log.write({**record, **self.ledger.record()})
