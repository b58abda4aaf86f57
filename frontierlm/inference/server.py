"""`frontierlm serve`: an OpenAI-compatible HTTP server, so existing clients work unchanged.

  GET  /v1/models
  POST /v1/chat/completions   messages -> the chat template -> a reply (stops at end of turn)
  POST /v1/completions        raw text (or token ids) -> its continuation
Both POST routes take max_tokens, temperature, top_p, n, stop, seed, stream (server-sent events,
`data: {...}` chunks, then `data: [DONE]`; `stream_options.include_usage` adds a usage chunk),
and vLLM's extensions top_k, min_p and repetition_penalty. Fields this server cannot honour
(logprobs, echo, tools, penalties other than 0, ...) are refused with a 400 naming the field,
never ignored. max_tokens is cut to the context window left after the prompt (the reply then
ends with finish_reason "length"); without it a chat reply may fill the window and a completion
gets OpenAI's 16 tokens. completion_tokens counts the tokens of the returned text (a stop token
is not counted).

Every request goes through one `Batcher`, so concurrent clients share engine batches.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from frontierlm.inference.batcher import Batcher
from frontierlm.inference.batcher import Request as EngineRequest
from frontierlm.inference.engine import Completion
from frontierlm.inference.loader import InferenceModel
from frontierlm.inference.stream import TextStream

MAX_N = 16
MAX_STOPS = 4
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None, kind: str) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind


def bad_request(message: str, param: str | None) -> ApiError:
    return ApiError(400, message, param, "invalid_request_error")


def error_body(message: str, param: str | None, kind: str, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


class StreamOptions(BaseModel):
    include_usage: bool = False


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")  # name, tool_call_id, ...: accepted, not used
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None


class SamplingRequest(BaseModel):
    """The fields both routes share. Unknown fields are ignored as OpenAI's API does (clients
    send `user`, `metadata`, ...); known ones this server cannot honour are checked below."""

    model_config = ConfigDict(extra="ignore")
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1, le=MAX_N)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    top_k: int = Field(0, ge=-1)  # vLLM's extension; 0 or -1: off
    min_p: float = Field(0.0, ge=0, lt=1)
    repetition_penalty: float = Field(1.0, gt=0)
    # Known fields accepted only at their neutral values.
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    logprobs: bool | int | None = None
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    functions: list[Any] | None = None
    response_format: dict[str, Any] | None = None

    def unsupported(self) -> None:
        neutral = {
            "presence_penalty": self.presence_penalty == 0,
            "frequency_penalty": self.frequency_penalty == 0,
            "logit_bias": not self.logit_bias,
            "logprobs": not self.logprobs,
            "top_logprobs": not self.top_logprobs,
            "tools": not self.tools,
            "functions": not self.functions,
            "response_format": self.response_format in (None, {"type": "text"}),
        }
        for name, ok in neutral.items():
            if not ok:
                raise bad_request(f"{name} is not supported by this server", name)

    def stops(self) -> tuple[str, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > MAX_STOPS:
            raise bad_request(f"stop: at most {MAX_STOPS} sequences", "stop")
        if any(not s for s in stops):
            raise bad_request("stop: a stop sequence must not be empty", "stop")
        return tuple(stops)


class ChatRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


class CompletionRequest(SamplingRequest):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    def unsupported(self) -> None:
        super().unsupported()
        if self.echo:
            raise bad_request("echo is not supported by this server", "echo")
        if self.best_of not in (None, 1, self.n):
            raise bad_request("best_of is not supported by this server", "best_of")
        if self.suffix:
            raise bad_request("suffix is not supported by this server", "suffix")


def _message_text(message: ChatMessage, index: int) -> str:
    if message.content is None:
        return ""
    if isinstance(message.content, str):
        return message.content
    texts = []
    for part in message.content:
        if part.type != "text" or part.text is None:
            raise bad_request(
                f"messages[{index}].content: only text parts are supported, got {part.type!r}",
                f"messages[{index}].content",
            )
        texts.append(part.text)
    return "".join(texts)


class Server:
    """The routes' state: the model, the batcher, the served name."""

    def __init__(self, served: InferenceModel, window_s: float, max_batch: int) -> None:
        self.served = served
        self.batcher = Batcher(served.model, served.tokenizer, window_s, max_batch)

    def check_model(self, name: str) -> None:
        if name != self.served.name:
            raise ApiError(
                404,
                f"model {name!r} does not exist; this server serves {self.served.name!r}",
                "model",
                "invalid_request_error",
            )

    def sampling(self, body: SamplingRequest, chat: bool, prompts: list[list[int]], max_tokens):
        longest = max(len(p) for p in prompts)
        if longest >= self.served.max_seq_len:
            param = "messages" if chat else "prompt"
            raise bad_request(
                f"{param}: the prompt is {longest} tokens; this model's context is "
                f"{self.served.max_seq_len} tokens, leaving no room for a reply",
                param,
            )
        default = self.served.max_seq_len if chat else COMPLETIONS_DEFAULT_MAX_TOKENS
        limit = self.served.room(longest, max_tokens or default)
        return self.served.params(
            chat,
            max_new_tokens=limit,
            temperature=body.temperature,
            top_p=body.top_p,
            top_k=max(body.top_k, 0),
            min_p=body.min_p,
            repetition_penalty=body.repetition_penalty,
            stop_strings=body.stops(),
            seed=body.seed,
        )

    async def run(self, prompts: list[list[int]], params, n: int, stream: bool) -> Any:
        """Submit `prompts` x n copies; return (queue of streamed events, future of results)."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        done: asyncio.Future = loop.create_future()

        def on_token(index: int, token: int) -> None:
            loop.call_soon_threadsafe(events.put_nowait, ("token", index, token))

        def on_done(out: list[Completion] | None, err: BaseException | None) -> None:
            def settle() -> None:
                if err is not None:
                    done.set_exception(err)
                else:
                    done.set_result(out)
                events.put_nowait(("done", None, None))

            loop.call_soon_threadsafe(settle)

        copies = [p for p in prompts for _ in range(n)]
        request = EngineRequest(copies, params, on_token if stream else None, on_done)
        self.batcher.submit(request)
        return events, done


def _usage(prompts: list[list[int]], out: list[Completion]) -> dict[str, int]:
    prompt_tokens = sum(len(p) for p in prompts)
    completion_tokens = sum(len(c.ids) for c in out)
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def _sse(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


def create_app(served: InferenceModel, window_s: float = 0.01, max_batch: int = 32) -> FastAPI:
    server = Server(served, window_s, max_batch)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        server.batcher.close()

    app = FastAPI(title="FrontierLM", version="0.1.0", lifespan=lifespan)
    app.state.server = server

    @app.exception_handler(ApiError)
    async def api_error(_: Request, err: ApiError) -> JSONResponse:
        return JSONResponse(error_body(err.message, err.param, err.kind), status_code=err.status)

    @app.exception_handler(Exception)
    async def server_error(_: Request, err: Exception) -> JSONResponse:
        # An engine failure (out of memory, a bug) reaches the client as an OpenAI error.
        message = f"generation failed: {type(err).__name__}: {err}"
        return JSONResponse(error_body(message, None, "server_error"), status_code=500)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, err: RequestValidationError) -> JSONResponse:
        first = err.errors()[0]
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        # pydantic names the union member that failed ("prompt.str"); keep the field path.
        param = ".".join(x for x in loc if not x.startswith(("str", "list[", "int", "function")))
        message = f"{param or 'body'}: {first.get('msg', 'invalid value')}"
        body = error_body(message, param or None, "invalid_request_error")
        return JSONResponse(body, status_code=400)

    @app.get("/v1/models")
    async def models() -> dict:
        card = {"id": served.name, "object": "model", "created": 0, "owned_by": "frontierlm"}
        return {"object": "list", "data": [card]}

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest) -> Any:
        server.check_model(body.model)
        body.unsupported()
        messages = []
        for i, m in enumerate(body.messages):
            role = "system" if m.role == "developer" else m.role
            messages.append({"role": role, "content": _message_text(m, i)})
        try:
            prompt = served.chat_ids(messages)
        except ValueError as err:
            raise bad_request(f"messages: {err}", "messages") from err
        max_tokens = body.max_completion_tokens or body.max_tokens
        params = server.sampling(body, True, [prompt], max_tokens)
        events, done = await server.run([prompt], params, body.n, body.stream)
        meta = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time())}
        meta["model"] = served.name
        if body.stream:
            return StreamingResponse(
                _stream_chat(served, meta, body, [prompt], params.stop_strings, events, done),
                media_type="text/event-stream",
            )
        out = await done
        choices = [
            {
                "index": i,
                "message": {"role": "assistant", "content": served.decode(c.ids)},
                "finish_reason": c.finish_reason,
                "logprobs": None,
            }
            for i, c in enumerate(out)
        ]
        usage = _usage([prompt], out)
        return {**meta, "object": "chat.completion", "choices": choices, "usage": usage}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest) -> Any:
        server.check_model(body.model)
        body.unsupported()
        raw = body.prompt
        if isinstance(raw, str):
            prompts = [served.text_ids(raw)]
        elif raw and all(isinstance(x, int) for x in raw):
            prompts = [list(raw)]  # type: ignore[arg-type]
        else:
            prompts = [served.text_ids(p) if isinstance(p, str) else list(p) for p in raw]
        if not prompts or any(not p for p in prompts):
            raise bad_request("prompt: must not be empty", "prompt")
        vocab = served.model.vocab_size
        if any(not 0 <= t < vocab for p in prompts for t in p):
            raise bad_request(f"prompt: token ids must be in [0, {vocab})", "prompt")
        params = server.sampling(body, False, prompts, body.max_tokens)
        events, done = await server.run(prompts, params, body.n, body.stream)
        meta = {"id": f"cmpl-{uuid.uuid4().hex}", "created": int(time.time())}
        meta["model"] = served.name
        if body.stream:
            return StreamingResponse(
                _stream_completions(served, meta, body, prompts, params.stop_strings, events, done),
                media_type="text/event-stream",
            )
        out = await done
        choices = [
            {
                "index": i,
                "text": served.decode(c.ids),
                "finish_reason": c.finish_reason,
                "logprobs": None,
            }
            for i, c in enumerate(out)
        ]
        usage = _usage(prompts, out)
        return {**meta, "object": "text_completion", "choices": choices, "usage": usage}

    return app


async def _stream_events(
    served: InferenceModel,
    choices: int,
    stops: tuple[str, ...],
    events: asyncio.Queue,
    done: asyncio.Future,
) -> AsyncIterator[tuple[int, str, str | None, list[Completion] | None]]:
    """(choice, text delta, finish_reason, completions when finished) as tokens arrive."""
    streams = [TextStream(served.tokenizer, stops) for _ in range(choices)]
    while True:
        kind, index, token = await events.get()
        if kind == "token":
            delta = streams[index].feed(token)
            if delta:
                yield index, delta, None, None
            continue
        out = await done  # raises the engine's error
        for i, completion in enumerate(out):
            yield i, streams[i].finish(completion.ids), completion.finish_reason, out
        return


async def _stream_chat(served, meta, body, prompts, stops, events, done) -> AsyncIterator[str]:
    def chunk(choices: list[dict], usage: dict | None = None) -> str:
        payload = {**meta, "object": "chat.completion.chunk", "choices": choices}
        if usage is not None:
            payload["usage"] = usage
        return _sse(payload)

    for i in range(body.n):
        delta = {"role": "assistant", "content": ""}
        yield chunk([{"index": i, "delta": delta, "finish_reason": None, "logprobs": None}])
    out = None
    try:
        async for index, text, reason, finished in _stream_events(
            served, body.n, stops, events, done
        ):
            out = finished or out
            if text:
                delta = {"content": text}
                yield chunk([{"index": index, "delta": delta, "finish_reason": None}])
            if reason is not None:
                yield chunk([{"index": index, "delta": {}, "finish_reason": reason}])
    except Exception as err:
        yield _sse(error_body(f"generation failed: {err}", None, "server_error"))
        yield _sse("[DONE]")
        return
    if body.stream_options is not None and body.stream_options.include_usage and out:
        yield chunk([], _usage(prompts, out))
    yield _sse("[DONE]")


async def _stream_completions(
    served, meta, body, prompts, stops, events, done
) -> AsyncIterator[str]:
    def chunk(choices: list[dict], usage: dict | None = None) -> str:
        payload = {**meta, "object": "text_completion", "choices": choices}
        if usage is not None:
            payload["usage"] = usage
        return _sse(payload)

    choices = len(prompts) * body.n
    out = None
    try:
        async for index, text, reason, finished in _stream_events(
            served, choices, stops, events, done
        ):
            out = finished or out
            if text or reason is not None:
                item = {"index": index, "text": text, "finish_reason": reason, "logprobs": None}
                yield chunk([item])
    except Exception as err:
        yield _sse(error_body(f"generation failed: {err}", None, "server_error"))
        yield _sse("[DONE]")
        return
    if body.stream_options is not None and body.stream_options.include_usage and out:
        yield chunk([], _usage(prompts, out))
    yield _sse("[DONE]")


def serve(
    served: InferenceModel,
    host: str = "127.0.0.1",
    port: int = 8000,
    window_s: float = 0.01,
    max_batch: int = 32,
) -> None:
    import uvicorn

    uvicorn.run(create_app(served, window_s, max_batch), host=host, port=port, log_level="info")
