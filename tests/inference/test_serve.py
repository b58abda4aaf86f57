"""`frontierlm serve` answers the official `openai` client with what `generate` gives directly."""

from __future__ import annotations

import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import uvicorn

from frontierlm.inference.engine import generate
from frontierlm.inference.server import create_app

CHAT = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Tom has 3 apples and buys 4 more. How many?"},
]


@pytest.fixture(scope="module")
def server(served):
    app = create_app(served, window_s=0.01, max_batch=4)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level="warning", lifespan="on")
    uv = uvicorn.Server(config)
    thread = threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not uv.started:
        assert time.monotonic() < deadline, "server did not start"
        time.sleep(0.05)
    base = f"http://127.0.0.1:{port}/v1"
    yield base, app
    uv.should_exit = True
    thread.join(timeout=10)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0], api_key="unused", max_retries=0, timeout=60)


def direct(served, prompt, chat, **fields):
    params = served.params(chat, **fields)
    out = generate(served.model, [prompt], params, tokenizer=served.tokenizer)[0]
    return served.decode(out.ids), out


def test_models_lists_the_served_model(client, served):
    assert [m.id for m in client.models.list().data] == [served.name] == ["run0/sft"]


def test_chat_equals_generate_streaming_and_not(client, served):
    prompt = served.chat_ids(CHAT)
    text, out = direct(served, prompt, True, max_new_tokens=24, temperature=0)
    assert len(text) > 10
    reply = client.chat.completions.create(
        model=served.name, messages=CHAT, max_tokens=24, temperature=0
    )
    assert reply.object == "chat.completion"
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content == text
    assert reply.choices[0].finish_reason == out.finish_reason == "length"
    assert reply.usage.prompt_tokens == len(prompt)
    assert reply.usage.completion_tokens == len(out.ids) == 24
    assert reply.usage.total_tokens == len(prompt) + 24

    chunks = list(
        client.chat.completions.create(
            model=served.name,
            messages=CHAT,
            max_tokens=24,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    deltas = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert "".join(deltas) == text
    assert sum(bool(d) for d in deltas) > 3  # text arrived in pieces, as it was generated
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 24


def test_completions_with_stop_and_n_streaming_and_not(client, served):
    prompts = ["To be, or not to be", "First Citizen:"]
    outs = [
        direct(served, served.text_ids(p), False, max_new_tokens=20, temperature=0) for p in prompts
    ]
    texts = [text for text, _ in outs]
    reply = client.completions.create(
        model=served.name, prompt=prompts, max_tokens=20, temperature=0, n=2
    )
    assert [c.index for c in reply.choices] == [0, 1, 2, 3]
    assert [c.text for c in reply.choices] == [texts[0], texts[0], texts[1], texts[1]]
    assert reply.usage.prompt_tokens == sum(len(served.text_ids(p)) for p in prompts)
    # Each prompt's tokens twice (n=2): 20 each unless the model stops early.
    assert reply.usage.completion_tokens == 2 * sum(len(out.ids) for _, out in outs)

    # A stop string taken from the middle of the greedy text cuts the reply where generate does.
    stop = texts[0][8:11]
    cut, out = direct(
        served,
        served.text_ids(prompts[0]),
        False,
        max_new_tokens=20,
        temperature=0,
        stop_strings=(stop,),
    )
    assert out.finish_reason == "stop" and len(cut) < 8
    kwargs = dict(model=served.name, prompt=prompts[0], max_tokens=20, temperature=0, stop=[stop])
    reply = client.completions.create(**kwargs)
    assert (reply.choices[0].text, reply.choices[0].finish_reason) == (cut, "stop")
    chunks = list(client.completions.create(**kwargs, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == cut
    assert chunks[-1].choices[0].finish_reason == "stop"
    # Without a stop, streamed completions of two prompts interleave but add up per index.
    chunks = list(
        client.completions.create(
            model=served.name, prompt=prompts, max_tokens=20, temperature=0, stream=True
        )
    )
    joined = [
        "".join(c.choices[0].text for c in chunks if c.choices[0].index == i) for i in range(2)
    ]
    assert joined == texts


def test_seeded_sampling_repeats_and_equals_generate(client, served):
    prompt = served.chat_ids(CHAT)
    fields = dict(max_new_tokens=16, temperature=1.0, top_p=0.9, seed=11)
    text, _ = direct(served, prompt, True, **fields)
    kwargs = dict(
        model=served.name, messages=CHAT, max_tokens=16, temperature=1.0, top_p=0.9, seed=11
    )
    first = client.chat.completions.create(**kwargs).choices[0].message.content
    assert first == client.chat.completions.create(**kwargs).choices[0].message.content == text
    greedy, _ = direct(served, prompt, True, max_new_tokens=16, temperature=0)
    assert text != greedy


def test_concurrent_clients_share_a_batch(client, served, server):
    batcher = server[1].state.server.batcher
    prompts = ["ROMEO:", "JULIET:", "KING HENRY:", "Where art thou"]
    limits = [5, 12, 8, 20]  # different lengths still share one batch
    outs = [
        direct(served, served.text_ids(p), False, max_new_tokens=n, temperature=0)
        for p, n in zip(prompts, limits, strict=True)
    ]
    expected = [text for text, _ in outs]
    before = len(batcher.batches)
    batcher.window_s = 5.0  # the batch closes once max_batch (4) prompts are in
    try:
        with ThreadPoolExecutor(4) as threads:
            replies = list(
                threads.map(
                    lambda pn: client.completions.create(
                        model=served.name, prompt=pn[0], max_tokens=pn[1], temperature=0
                    ),
                    zip(prompts, limits, strict=True),
                )
            )
    finally:
        batcher.window_s = 0.01
    assert [r.choices[0].text for r in replies] == expected
    # The limits, where the model does not stop before them.
    assert [r.usage.completion_tokens for r in replies] == [len(out.ids) for _, out in outs]
    assert batcher.batches[before:] == [4]


def test_bad_requests_are_openai_errors_naming_the_field(client, served, server):
    url = server[0]
    cases = [
        ({"temperature": 5}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"n": 0}, "n"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role"),
        ({"logprobs": True}, "logprobs"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"messages": [{"role": "user", "content": "word " * 200}]}, "messages"),
    ]
    for change, param in cases:
        body = {"model": served.name, "messages": CHAT, **change}
        r = httpx.post(f"{url}/chat/completions", json=body, timeout=30)
        assert r.status_code == 400, (change, r.text)
        error = r.json()["error"]
        assert error["param"] == param and error["type"] == "invalid_request_error", error
        assert param.split(".")[0] in error["message"]
    r = httpx.post(f"{url}/completions", json={"model": served.name}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.chat.completions.create(model="gpt-4o", messages=CHAT)
    with pytest.raises(openai.BadRequestError, match="echo"):
        client.completions.create(model=served.name, prompt="hi", echo=True)


def test_an_engine_failure_is_an_openai_error_not_a_hang(client, served, server):
    batcher = server[1].state.server.batcher

    def broken(*args, **kwargs):
        raise RuntimeError("CUDA out of memory (simulated)")

    batcher.generate_fn = broken
    try:
        with pytest.raises(openai.InternalServerError, match="out of memory"):
            client.chat.completions.create(model=served.name, messages=CHAT, max_tokens=4)
        with httpx.stream(
            "POST",
            f"{server[0]}/completions",
            json={"model": served.name, "prompt": "hi", "stream": True},
            timeout=30,
        ) as r:
            lines = [line for line in r.iter_lines() if line]
        assert "out of memory" in json.loads(lines[-2][len("data: ") :])["error"]["message"]
        assert lines[-1] == "data: [DONE]"
    finally:
        batcher.generate_fn = generate
    assert client.completions.create(model=served.name, prompt="hi", max_tokens=2).choices
