"""Several independent engines fed from one prompt queue, as large RL and synthetic-data setups
run them: one worker per GPU (or several processes on a CPU machine), each with its own copy of
the model and its own KV cache, each calling `engine.generate` on the chunks it is handed.

Why processes and not threads: an engine's decode loop does Python work between kernels
(sampling, stop checks, bookkeeping); threads would serialise that work on the GIL, so N
engines in threads run at about the speed of one once the step is short (small batches, CUDA
graphs). A process per engine also keeps each CUDA context and allocator on its own device, and
a worker that crashes (out of memory, a kill) is seen by its exit code instead of taking the
caller down. Workers start with `spawn` (CUDA cannot be forked) and load the weights once;
`update_weights` sends new ones (RL after each policy step) through shared memory.

The queue lives in the parent: prompts are cut into chunks, each idle worker takes the next
chunk, so the first round goes round-robin and later chunks go to whichever engine is free.
Results come back in prompt order whoever computed them. A sampled chunk uses its own seed
(`params.seed + chunk index`), so a seeded call gives the same samples whichever worker ran
which chunk. A worker that raises reports the error and stays usable; one that dies makes the
pool raise a `PoolError` naming it (the pool is then closed): never a hang.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import queue
import traceback
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp

from frontierlm.inference.engine import Completion
from frontierlm.inference.sampling import SamplingParams

POLL_S = 0.2  # how often the parent checks that busy workers are still alive


class PoolError(RuntimeError):
    """A worker failed: its message names the worker, its device and the prompts it held."""


def _cpu_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    # Copies, so that sending them (torch moves CPU tensors to shared memory) never touches the
    # caller's own storage.
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def _build_model(spec: dict[str, Any], device: str) -> torch.nn.Module:
    if "path" in spec:
        from frontierlm.model import load

        return load(spec["path"]).to(device).eval()
    from frontierlm.config import ModelConfig
    from frontierlm.model import Transformer

    with torch.device(device):
        model = Transformer(ModelConfig.model_validate(spec["config"]), spec["vocab_size"])
    model.load_state_dict(spec["state"])
    return model.eval()


def _worker(
    rank: int,
    device: str,
    threads: int,
    spec: dict[str, Any],
    tokenizer: Any,
    inbox: Any,
    outbox: Any,
) -> None:
    """One engine: build the model, then serve chunks until told to stop."""
    from frontierlm.inference.engine import generate

    if threads:
        torch.set_num_threads(threads)
    if device.startswith("cuda"):
        torch.cuda.set_device(device)
    try:
        model = _build_model(spec, device)
        del spec
    except Exception as err:
        outbox.put(("fatal", rank, None, f"{type(err).__name__}: {err}\n{traceback.format_exc()}"))
        return
    outbox.put(("ready", rank, None, None))
    while True:
        kind, call, payload = inbox.get()
        if kind == "stop":
            return
        try:
            if kind == "weights":
                model.load_state_dict(payload)
                del payload
                outbox.put(("weights", rank, call, None))
                continue
            start, prompts, params, stream = payload
            on_token = None
            if stream:

                def on_token(i: int, token: int, start: int = start, call: int = call) -> None:
                    outbox.put(("token", rank, call, (start + i, token)))

            out = generate(model, prompts, params, tokenizer=tokenizer, on_token=on_token)
            outbox.put(("done", rank, call, out))
        except Exception as err:
            message = f"{type(err).__name__}: {err}"
            outbox.put(("error", rank, call, f"{message}\n{traceback.format_exc()}"))


def default_devices(workers: int | None = None) -> list[str]:
    """One worker per visible GPU, else `workers` (default 2) CPU processes."""
    if torch.cuda.is_available():
        gpus = [f"cuda:{i}" for i in range(torch.cuda.device_count())]
        return gpus if workers is None else [gpus[i % len(gpus)] for i in range(workers)]
    return ["cpu"] * (workers or 2)


class EnginePool:
    def __init__(
        self,
        model: torch.nn.Module | str | Path,
        tokenizer: Any = None,
        devices: Sequence[str] | None = None,
        workers: int | None = None,
        chunk_size: int | None = None,
        start_timeout_s: float = 600.0,
    ) -> None:
        """`model`: a Transformer (its weights are sent to every worker) or a model directory
        (each worker loads it). `devices`: one entry per worker ("cuda:0", "cpu", ...);
        default one per GPU, else `workers` CPU processes. `chunk_size`: prompts per chunk;
        default an equal share per worker (the largest batches)."""
        self.devices = list(devices) if devices is not None else default_devices(workers)
        if not self.devices:
            raise ValueError("pool: needs at least one device")
        self.chunk_size = chunk_size
        self.tokenizer = tokenizer
        if isinstance(model, str | Path):
            path = Path(model)
            if not (path / "config.json").is_file() and not (path / "model/config.json").is_file():
                raise FileNotFoundError(f"pool: no model at {path} (no config.json)")
            spec: dict[str, Any] = {"path": str(path)}
        else:
            spec = {
                "config": model.cfg.model_dump(),
                "vocab_size": model.vocab_size,
                "state": _cpu_state(model),
            }
        cpu_workers = sum(d == "cpu" for d in self.devices)
        threads = max(1, (os.cpu_count() or 1) // cpu_workers) if cpu_workers else 0
        ctx = mp.get_context("spawn")
        self._outbox = ctx.Queue()
        self._inboxes = [ctx.Queue() for _ in self.devices]
        self._procs = []
        self._call = 0
        self._closed = False
        for rank, device in enumerate(self.devices):
            proc = ctx.Process(
                target=_worker,
                args=(
                    rank,
                    device,
                    threads if device == "cpu" else 0,
                    spec,
                    tokenizer,
                    self._inboxes[rank],
                    self._outbox,
                ),
                daemon=True,
                name=f"frontierlm-engine-{rank}",
            )
            proc.start()
            self._procs.append(proc)
        ready: set[int] = set()
        while len(ready) < len(self.devices):
            waiting = set(range(self.size)) - ready
            kind, rank, _, message = self._receive(waiting, start_timeout_s)
            if kind == "fatal":
                self.close()
                raise PoolError(
                    f"pool worker {rank} ({self.devices[rank]}) could not load the model: {message}"
                )
            ready.add(rank)

    @property
    def size(self) -> int:
        return len(self.devices)

    def _receive(self, busy: set[int], timeout_s: float | None = None) -> tuple:
        """The next message from a worker; raises PoolError when a worker we wait on died."""
        waited = 0.0
        while True:
            try:
                return self._outbox.get(timeout=POLL_S)
            except queue.Empty:
                waited += POLL_S
            for rank in busy:
                proc = self._procs[rank]
                if not proc.is_alive():
                    code = proc.exitcode
                    self.close()
                    raise PoolError(
                        f"pool worker {rank} ({self.devices[rank]}) died with exit code {code} "
                        f"({_exit_reason(code)}); the pool is closed, start a new one"
                    )
            if timeout_s is not None and waited >= timeout_s:
                self.close()
                raise PoolError(f"pool: no answer from workers {sorted(busy)} in {timeout_s} s")

    def _check_open(self) -> None:
        if self._closed:
            raise PoolError("pool: closed (a worker died or close() was called); start a new one")

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        params: SamplingParams,
        on_token: Callable[[int, int], None] | None = None,
    ) -> list[Completion]:
        """`engine.generate` over the pool: one Completion per prompt, in prompt order.
        `on_token(prompt_index, token_id)` streams tokens from every worker as they come."""
        self._check_open()
        prompts = [list(p) for p in prompts]
        for i, p in enumerate(prompts):
            if not p:
                raise ValueError(f"pool: prompt {i} is empty (a prompt needs at least one token)")
        if not prompts:
            return []
        size = self.chunk_size or math.ceil(len(prompts) / self.size)
        chunks = deque(
            (c, start, prompts[start : start + size])
            for c, start in enumerate(range(0, len(prompts), size))
        )
        self._call += 1
        call = self._call
        results: list[Completion | None] = [None] * len(prompts)
        busy: dict[int, int] = {}  # worker -> start of the chunk it holds
        idle = deque(range(self.size))

        def hand_out() -> None:
            while idle and chunks:
                rank, (c, start, part) = idle.popleft(), chunks.popleft()
                chunk_params = params
                if params.seed is not None:
                    chunk_params = dataclasses.replace(params, seed=params.seed + c)
                payload = (start, part, chunk_params, on_token is not None)
                self._inboxes[rank].put(("chunk", call, payload))
                busy[rank] = start

        hand_out()
        while busy:
            kind, rank, msg_call, body = self._receive(set(busy))
            if msg_call != call:
                continue  # left over from a call that failed
            if kind == "token":
                on_token(*body)  # type: ignore[misc]
            elif kind == "done":
                start = busy.pop(rank)
                for offset, completion in enumerate(body):
                    results[start + offset] = completion
                idle.append(rank)
                hand_out()
            elif kind == "error":
                start = busy[rank]
                # The other workers finish their chunks; their answers carry this call's id and
                # are dropped by the next call.
                raise PoolError(
                    f"pool worker {rank} ({self.devices[rank]}) failed on the chunk starting at "
                    f"prompt {start}: {body}"
                )
        return results  # type: ignore[return-value]

    def update_weights(self, model: torch.nn.Module | dict[str, torch.Tensor]) -> None:
        """Load new weights into every engine (the RL policy after a step); returns once all
        have them."""
        self._check_open()
        state = (
            _cpu_state(model)
            if isinstance(model, torch.nn.Module)
            else {k: v.detach().to("cpu", copy=True) for k, v in model.items()}
        )
        self._call += 1
        for inbox in self._inboxes:
            inbox.put(("weights", self._call, state))
        waiting = set(range(self.size))
        while waiting:
            kind, rank, msg_call, body = self._receive(waiting)
            if msg_call != self._call:
                continue
            if kind == "error":
                raise PoolError(f"pool worker {rank} could not load the new weights: {body}")
            waiting.discard(rank)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for inbox, proc in zip(self._inboxes, self._procs, strict=True):
            if proc.is_alive():
                inbox.put(("stop", 0, None))
        for proc in self._procs:
            proc.join(timeout=5)
            if proc.is_alive():
                proc.terminate()
                proc.join(timeout=5)

    def __enter__(self) -> EnginePool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()


def _exit_reason(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        import signal

        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return "exited"
