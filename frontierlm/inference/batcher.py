"""One engine thread shared by every client: requests wait a few milliseconds so that those
arriving together run as one `generate` call (one batch), as a server's scheduler would.

Requests whose sampling settings differ only in their token limit share a batch: the batch runs
to the largest limit and each request keeps its own first tokens (the first k tokens of a
longer sample are a sample of k tokens, and greedy tokens are the same), so a 10-token and a
200-token request need not wait for each other's batch. A request with a seed runs alone, so
its samples depend on nothing but itself.
"""

from __future__ import annotations

import dataclasses
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from frontierlm.inference.engine import Completion, generate
from frontierlm.inference.sampling import SamplingParams


@dataclass
class Request:
    prompts: list[list[int]]
    params: SamplingParams
    on_token: Callable[[int, int], None] | None  # (prompt index in this request, token)
    on_done: Callable[[list[Completion] | None, BaseException | None], None]
    emitted: list[int] = field(default_factory=list)  # tokens streamed per prompt


def _fit(completion: Completion, limit: int) -> Completion:
    """A completion of a batch that ran past this request's token limit, as a run with the
    limit would have ended it."""
    if len(completion.ids) < limit:
        return completion
    # At the limit or past it: the run with the limit stopped here, for length.
    return Completion(
        completion.prompt_ids, completion.ids[:limit], "length", completion.logprobs[:limit]
    )


class Batcher:
    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        window_s: float = 0.01,
        max_batch: int = 32,
        generate_fn: Callable[..., list[Completion]] = generate,
    ) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.window_s, self.max_batch = window_s, max_batch
        self.generate_fn = generate_fn
        self.context = model.cfg.max_seq_len
        self.requests: queue.Queue[Request | None] = queue.Queue()
        self.batches: list[int] = []  # prompts per engine call, for tests and logs
        self.thread = threading.Thread(target=self._loop, name="frontierlm-batcher", daemon=True)
        self.thread.start()

    def submit(self, request: Request) -> None:
        self.requests.put(request)

    def close(self) -> None:
        self.requests.put(None)
        self.thread.join(timeout=30)

    def _collect(self, first: Request) -> list[Request]:
        waiting, size = [first], len(first.prompts)
        deadline = time.monotonic() + self.window_s
        while size < self.max_batch:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                request = self.requests.get(timeout=left)
            except queue.Empty:
                break
            if request is None:  # closing: finish what came in first
                self.requests.put(None)
                break
            waiting.append(request)
            size += len(request.prompts)
        return waiting

    def _loop(self) -> None:
        while True:
            first = self.requests.get()
            if first is None:
                return
            groups: list[tuple[Any, list[Request]]] = []
            for request in self._collect(first):
                key: Any = dataclasses.replace(request.params, max_new_tokens=0)
                if request.params.seed is not None:
                    key = id(request)
                for group_key, group in groups:
                    if group_key == key and self._fits([*group, request]):
                        group.append(request)
                        break
                else:
                    groups.append((key, [request]))
            for _, group in groups:
                self._run(group)

    def _fits(self, group: list[Request]) -> bool:
        """Whether the batch run to the group's largest token limit stays inside the context
        window for its longest prompt (each request was cut to fit on its own)."""
        longest = max(len(p) for r in group for p in r.prompts)
        return longest + max(r.params.max_new_tokens for r in group) <= self.context

    def _run(self, group: list[Request]) -> None:
        owners: list[tuple[Request, int]] = [(r, i) for r in group for i in range(len(r.prompts))]
        for request in group:
            request.emitted = [0] * len(request.prompts)
        limit = max(r.params.max_new_tokens for r in group)
        params = dataclasses.replace(group[0].params, max_new_tokens=limit)

        def on_token(index: int, token: int) -> None:
            request, local = owners[index]
            if request.on_token is None or request.emitted[local] >= request.params.max_new_tokens:
                return
            request.emitted[local] += 1
            request.on_token(local, token)

        self.batches.append(len(owners))
        try:
            prompts = [p for r in group for p in r.prompts]
            out = self.generate_fn(
                self.model, prompts, params, tokenizer=self.tokenizer, on_token=on_token
            )
        except Exception as err:  # every client of the batch hears of it
            for request in group:
                request.on_done(None, err)
            return
        start = 0
        for request in group:
            mine = out[start : start + len(request.prompts)]
            start += len(request.prompts)
            request.on_done([_fit(c, request.params.max_new_tokens) for c in mine], None)
