"""Batched generation: the one entry point every generating stage calls (eval, RL rollouts,
synthetic data, chat).

`generate(model, prompts, params)` returns one `Completion` per prompt, in order. It runs the
KV-cache engine: a preallocated cache of `max_batch` slots; waiting prompts are prefilled into
free slots (several at once, right-padded), then every step decodes one token for all slots
together; a sequence that finishes frees its slot for the next waiting prompt (continuous
batching). On a GPU the decode step is replayed as a CUDA graph (one per attention-span bucket),
so a step costs one launch; the host syncs once a step, to read the sampled tokens.

`generate_reference` is the same API by full recompute (each step re-reads the whole context):
slow, obviously right, and what the engine must equal token for token under greedy decoding.

Context rule (both): a prompt longer than `max_seq_len - 1` tokens keeps its last
`max_seq_len - 1`; a sequence (prompt + completion) ends with reason "length" when it reaches
`max_seq_len` tokens.
"""

from __future__ import annotations

import weakref
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from frontierlm.inference.packing import PackedProjections
from frontierlm.inference.sampling import SamplingParams, sample_next
from frontierlm.model.kv_cache import KVCache

OnToken = Callable[[int, int], None]

# Attention spans of CUDA-graph decode steps are rounded up to a multiple of this, so a step
# reads about as much cache as the sequences have filled and few graphs are captured.
GRAPH_SPAN_STEP = 128
# On GPU, prompt batches are right-padded to a multiple of this many tokens.
PREFILL_WIDTH_STEP = 64
# Cache lengths are rounded up to a multiple of this, so engines are reused across calls.
CACHE_LENGTH_STEP = 64


@dataclass
class Completion:
    prompt_ids: list[int]
    ids: list[int]  # generated tokens; a stop token or stop string is not included
    finish_reason: str  # "stop" (stop id or stop string) or "length"
    logprobs: list[float] = field(default_factory=list)  # log p(token) under the raw model


def _stop_string_cut(text: str, stops: Sequence[str]) -> int | None:
    hits = [text.find(s) for s in stops if s in text]
    return min(hits) if hits else None


def _trim_to_stop_string(
    ids: list[int], logprobs: list[float], stops: Sequence[str], tokenizer: Any
) -> tuple[list[int], list[float]]:
    """The longest prefix of tokens whose text ends before the first stop string (a token that
    straddles the stop string's start is dropped with it)."""
    cut = _stop_string_cut(tokenizer.decode(ids), stops)
    keep = len(ids)
    while cut is not None and keep and len(tokenizer.decode(ids[:keep])) > cut:
        keep -= 1
    return ids[:keep], logprobs[:keep]


def _check(prompts: Sequence[Sequence[int]], params: SamplingParams, tokenizer: Any) -> None:
    if params.stop_strings and tokenizer is None:
        raise ValueError("sampling: stop_strings need a tokenizer to decode the output")
    for index, prompt in enumerate(prompts):
        if not prompt:
            raise ValueError(f"sampling: prompt {index} is empty; a prompt needs a token")


def _context(prompt: Sequence[int], max_len: int) -> list[int]:
    return list(prompt)[-(max_len - 1) :]


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    params: SamplingParams,
    tokenizer: Any = None,
    on_token: OnToken | None = None,
    *,
    max_batch: int = 64,
    cuda_graphs: bool = True,
    compile: bool = False,
    pack_projections: bool = True,
) -> list[Completion]:
    """Sample a completion for each prompt. `tokenizer` (anything with `decode(ids)`) is needed
    only for `params.stop_strings`; a completion that produces a stop string is cut before it.
    `on_token(prompt_index, token_id)` is called for each token as it is accepted (streaming;
    tokens that turn out to belong to a stop string are reported before the cut).

    `max_batch`: cache slots (sequences decoded together). `cuda_graphs`: replay the decode step
    as a CUDA graph (GPU only; ignored on CPU). `compile`: torch.compile the decode step (fuses
    its small kernels; the first call compiles). `pack_projections`: decode with the q/k/v and
    gate/up weights stacked into one matrix each (faster GEMMs at a few rows; costs a copy of
    those weights, see inference/packing.py)."""
    _check(prompts, params, tokenizer)
    if max_batch < 1:
        raise ValueError(f"generate: max_batch={max_batch} must be at least 1")
    if not prompts or params.max_new_tokens == 0:
        return [Completion(list(p), [], "length") for p in prompts]
    max_len = model.cfg.max_seq_len
    needed = max(len(_context(p, max_len)) + params.max_new_tokens for p in prompts)
    length = min(max_len, -(-needed // CACHE_LENGTH_STEP) * CACHE_LENGTH_STEP)
    engine = Engine.get(
        model, min(len(prompts), max_batch), length, cuda_graphs, compile, pack_projections
    )
    was_training = model.training
    model.eval()
    try:
        return engine.run(prompts, params, tokenizer, on_token)
    finally:
        model.train(was_training)


def _cache_dtype(model: torch.nn.Module, device: torch.device) -> torch.dtype:
    """What the attention projections will output: the autocast dtype when autocast is on."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return model.lm_head.weight.dtype


@dataclass
class _Sequence:
    index: int  # position in the caller's prompt list
    prompt: list[int]  # what the model sees (cropped to the context)
    ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)


def _decode_step(
    model: torch.nn.Module,
    cache: KVCache,
    tokens: torch.Tensor,
    positions: torch.Tensor,
    key_index: torch.Tensor,
) -> torch.Tensor:
    """What a CUDA graph captures (and torch.compile compiles): one step's float32 logits."""
    return model.decode(tokens, cache, positions, key_index).float()


_ENGINES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def release(model: torch.nn.Module) -> None:
    """Free the KV cache and graphs `generate` keeps for `model` (e.g. before training on the
    same GPU); the next `generate` call builds them again."""
    _ENGINES.pop(model, None)


class Engine:
    """A model's KV cache, static decode buffers and captured decode graphs; kept between
    `generate` calls on the same model (graph capture and compilation are paid once)."""

    @classmethod
    def get(
        cls,
        model: torch.nn.Module,
        slots: int,
        length: int,
        cuda_graphs: bool,
        compile: bool,
        pack_projections: bool = True,
    ) -> Engine:
        device = model.lm_head.weight.device
        dtype = _cache_dtype(model, device)
        graphs = cuda_graphs and device.type == "cuda"
        # Graphs read weights by address: a model whose tensors moved needs a new engine.
        pointers = tuple(p.data_ptr() for p in model.parameters())
        key = (dtype, graphs, compile, pack_projections, pointers)
        engine = _ENGINES.get(model)
        # On a GPU an engine with more slots than asked for is kept (RL's and eval's last, smaller
        # batch): its idle slots cost little in a memory-bound step, where a new engine costs a
        # cache, graph captures and compilation. On CPU the step's cost grows with the slots.
        fits = engine is not None and (
            engine.slots >= slots if device.type == "cuda" else engine.slots == slots
        )
        if not fits or engine.key != key or engine.cache.length < length:
            _ENGINES.pop(model, None)
            engine = cls(model, slots, length, dtype, graphs, compile, pack_projections)
            engine.key = key
            _ENGINES[model] = engine
        return engine

    def __init__(
        self,
        model: torch.nn.Module,
        slots: int,
        length: int,
        dtype: torch.dtype,
        cuda_graphs: bool,
        compile: bool,
        pack_projections: bool = True,
    ) -> None:
        # A weak reference: the engines dict is keyed weakly by the model, which a strong one
        # from its value would keep alive forever.
        self._model = weakref.ref(model)
        self.slots = slots
        self.device = model.lm_head.weight.device
        self.key: tuple = ()
        self.cache = KVCache(model.cfg, slots, length, dtype, self.device)
        self.tokens = torch.zeros(slots, dtype=torch.long, device=self.device)
        self.positions = torch.zeros(slots, dtype=torch.long, device=self.device)
        self.key_index = torch.arange(length, device=self.device)
        self.cuda_graphs = cuda_graphs
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        if compile:
            # Every (slot count, span bucket) is its own compiled graph of the one step function,
            # and a long RL run or server builds many engines: past torch's default of 8
            # recompiles the step would silently fall back to eager.
            dynamo = torch._dynamo.config
            dynamo.recompile_limit = max(dynamo.recompile_limit, 128)
        self.step = torch.compile(_decode_step) if compile else _decode_step
        self.packed = PackedProjections(model) if pack_projections else None

    @property
    def model(self) -> torch.nn.Module:
        return self._model()

    def _run_step(self, key_index: torch.Tensor) -> torch.Tensor:
        return self.step(self.model, self.cache, self.tokens, self.positions, key_index)

    def _decode(self, kv_len: int) -> torch.Tensor:
        """Next-token logits (slots, vocab) for the tokens and positions in the static buffers."""
        if not self.cuda_graphs:
            return self._run_step(self.key_index[:kv_len])
        span = min(-(-kv_len // GRAPH_SPAN_STEP) * GRAPH_SPAN_STEP, self.cache.length)
        if span not in self.graphs:
            self.graphs[span] = self._capture(span)
        graph, logits = self.graphs[span]
        graph.replay()
        return logits

    def _capture(self, span: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        key_index = self.key_index[:span]
        # Warm up on a side stream (allocator, cuBLAS workspaces, compilation), as CUDA graphs
        # require. The warm-up steps rewrite the current tokens' cache entries with the same
        # values, so they change nothing.
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(2):
                self._run_step(key_index)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        autocast = torch.is_autocast_enabled("cuda")
        dtype = torch.get_autocast_dtype("cuda")
        # Autocast's cast cache would keep tensors from the capture alive in the graph's pool.
        with (
            torch.autocast("cuda", dtype, enabled=autocast, cache_enabled=False),
            torch.cuda.graph(graph),
        ):
            logits = self._run_step(key_index)
        return graph, logits

    def run(
        self,
        prompts: Sequence[Sequence[int]],
        params: SamplingParams,
        tokenizer: Any,
        on_token: OnToken | None,
    ) -> list[Completion]:
        if self.packed is None:
            return self._run(prompts, params, tokenizer, on_token)
        self.packed.refresh()  # the weights may have changed since the last call (RL)
        with self.packed.attached():
            return self._run(prompts, params, tokenizer, on_token)

    def _run(
        self,
        prompts: Sequence[Sequence[int]],
        params: SamplingParams,
        tokenizer: Any,
        on_token: OnToken | None,
    ) -> list[Completion]:
        """Prefill waiting prompts into free slots, decode all slots a step at a time.

        The host runs one step behind the device: step t is launched (its input tokens are
        step t-1's samples, already on the device) before step t-1's tokens are read back and
        checked for stops, so the device never waits for the host's bookkeeping. A sequence
        that ended at step t-1 thus gets one wasted step t, whose token is discarded."""
        model, device = self.model, self.device
        max_len = min(model.cfg.max_seq_len, self.cache.length)
        generator = None
        if params.seed is not None:
            generator = torch.Generator(device=device).manual_seed(params.seed)
        seen = None
        if params.repetition_penalty != 1.0:
            seen = torch.zeros(self.slots, model.vocab_size, dtype=torch.bool, device=device)
        stop_ids = set(params.stop_ids)
        waiting = deque(range(len(prompts)))
        running: list[_Sequence | None] = [None] * self.slots
        next_position = [0] * self.slots  # where each slot's next decode input goes
        results: list[Completion | None] = [None] * len(prompts)
        pinned = device.type == "cuda"

        def sample(logits: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
            """Tokens and their log-probabilities as one (2, rows) float64 tensor (token ids
            are exact in it), on the device; the sampled tokens become the next step's input."""
            rows_seen = None if seen is None else seen[rows]
            tokens = sample_next(logits, params, generator, rows_seen)
            # log p = logit - logsumexp: no (rows, vocab) log-softmax tensor is written.
            logprobs = logits.gather(1, tokens[:, None])[:, 0] - logits.logsumexp(-1)
            self.tokens[rows] = tokens
            if seen is not None:
                seen[rows, tokens] = True
            return torch.stack([tokens.double(), logprobs.double()])

        def finish(slot: int, reason: str) -> None:
            seq = running[slot]
            ids, logprobs = seq.ids, seq.logprobs
            if reason == "stop" and params.stop_strings:
                ids, logprobs = _trim_to_stop_string(ids, logprobs, params.stop_strings, tokenizer)
            results[seq.index] = Completion(list(prompts[seq.index]), ids, reason, logprobs)
            running[slot] = None
            # An idle slot still runs in the (static-shape) step: position 0 keeps its attention
            # row non-empty, and its output is ignored.
            next_position[slot] = 0

        def accept(slot: int, token: int, logprob: float) -> None:
            seq = running[slot]
            if token in stop_ids:
                finish(slot, "stop")
                return
            seq.ids.append(token)
            seq.logprobs.append(logprob)
            if on_token is not None:
                on_token(seq.index, token)
            if params.stop_strings and (
                _stop_string_cut(tokenizer.decode(seq.ids), params.stop_strings) is not None
            ):
                finish(slot, "stop")
            elif len(seq.ids) >= params.max_new_tokens or len(seq.prompt) + len(seq.ids) >= max_len:
                finish(slot, "length")

        def read(pending: tuple[list[tuple[int, _Sequence]], torch.Tensor, Any]) -> None:
            """Accept a launched step's tokens for the sequences still in the slots it ran."""
            owners, values, event = pending
            if event is not None:
                event.synchronize()
            tokens, logprobs = values.tolist()
            for slot, seq in owners:
                if running[slot] is seq:
                    accept(slot, int(tokens[slot]), logprobs[slot])

        pending = None
        steps = 0
        position_buffers = (
            [torch.empty(self.slots, dtype=torch.long, pin_memory=True) for _ in range(2)]
            if pinned
            else []
        )
        while True:
            free = [slot for slot, seq in enumerate(running) if seq is None]
            if free and waiting:
                if pending is not None:  # the slots' state must be current to refill them
                    read(pending)
                    pending = None
                    continue
                admitted = free[: len(waiting)]
                for slot in admitted:
                    index = waiting.popleft()
                    running[slot] = _Sequence(index, _context(prompts[index], max_len))
                    next_position[slot] = len(running[slot].prompt)
                rows = torch.tensor(admitted, device=device)
                batch = [running[slot].prompt for slot in admitted]
                if seen is not None:
                    seen[rows] = False
                    for slot, prompt in zip(admitted, batch, strict=True):
                        seen[slot, prompt] = True
                tokens, logprobs = sample(self._prefill(batch, rows).float(), rows).tolist()
                for slot, token, logprob in zip(admitted, tokens, logprobs, strict=True):
                    accept(slot, int(token), logprob)
                continue
            owners = [(slot, seq) for slot, seq in enumerate(running) if seq is not None]
            if not owners:
                if pending is None:
                    break
                read(pending)
                pending = None
                continue
            if pinned:
                # From pinned memory the copy does not wait for the device (a pageable one would
                # drain the stream every step); two buffers alternate, and a buffer's previous
                # copy is done once `read` has waited on the event of the step that followed it.
                staged = position_buffers[steps % 2]
                staged.copy_(torch.tensor(next_position))
                self.positions.copy_(staged, non_blocking=True)
            else:
                self.positions.copy_(torch.tensor(next_position))
            steps += 1
            logits = self._decode(max(next_position[slot] for slot, _ in owners) + 1)
            for slot, _ in owners:
                next_position[slot] += 1
            values, event = sample(logits, self.cache.rows), None
            if pinned:
                host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
                values = host.copy_(values, non_blocking=True)
                event = torch.cuda.Event()
                event.record()
            if pending is not None:
                read(pending)  # while the device runs the step just launched
            pending = (owners, values, event)
        return results

    def _prefill(self, batch: list[list[int]], slots: torch.Tensor) -> torch.Tensor:
        width = max(len(p) for p in batch)
        if self.device.type == "cuda":
            # Few distinct shapes: FlexAttention (windowed/softcapped layers) compiles per shape.
            width = min(-(-width // PREFILL_WIDTH_STEP) * PREFILL_WIDTH_STEP, self.cache.length)
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        for row, prompt in enumerate(batch):
            ids[row, : len(prompt)] = torch.tensor(prompt)
        last = torch.tensor([len(p) - 1 for p in batch], device=self.device)
        return self.model.prefill(ids.to(self.device), self.cache, slots, last)


@torch.no_grad()
def generate_reference(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    params: SamplingParams,
    tokenizer: Any = None,
    on_token: OnToken | None = None,
) -> list[Completion]:
    """`generate` by full recompute, one prompt at a time, no cache: the reference."""
    _check(prompts, params, tokenizer)
    device = next(model.parameters()).device
    max_len = model.cfg.max_seq_len
    generator = None
    if params.seed is not None:
        generator = torch.Generator(device=device).manual_seed(params.seed)
    was_training = model.training
    model.eval()
    results = []
    for index, prompt in enumerate(prompts):
        context = _context(prompt, max_len)
        ids, logprobs, reason = list(context), [], "length"
        seen = torch.zeros(1, model.vocab_size, dtype=torch.bool, device=device)
        seen[0, context] = True
        for _ in range(params.max_new_tokens):
            if len(ids) >= max_len:
                break
            logits = model(torch.tensor([ids], device=device))[:, -1].float()
            token = int(sample_next(logits, params, generator, seen)[0])
            if token in params.stop_ids:
                reason = "stop"
                break
            logprobs.append(float(logits[0].log_softmax(-1)[token]))
            ids.append(token)
            seen[0, token] = True
            if on_token is not None:
                on_token(index, token)
            if params.stop_strings:
                new = ids[len(context) :]
                if _stop_string_cut(tokenizer.decode(new), params.stop_strings) is not None:
                    reason = "stop"
                    break
        new = ids[len(context) :]
        if reason == "stop" and params.stop_strings:
            new, logprobs = _trim_to_stop_string(new, logprobs, params.stop_strings, tokenizer)
        results.append(Completion(list(prompt), new, reason, logprobs))
    model.train(was_training)
    return results
