"""The server's batcher: requests that arrive together share one engine call when their settings
allow, each keeps its own token limit, and no batch runs past the context window."""

from __future__ import annotations

import threading

from frontierlm.inference.batcher import Batcher, Request
from frontierlm.inference.engine import generate


def test_batches_share_calls_keep_limits_and_respect_the_context(served):
    calls = []

    def recording_generate(model, prompts, params, **kwargs):
        calls.append((len(prompts), params.max_new_tokens))
        return generate(model, prompts, params, **kwargs)

    batcher = Batcher(served.model, served.tokenizer, 5.0, 4, generate_fn=recording_generate)
    assert batcher.context == 128
    short, long = served.text_ids("ROMEO:"), served.text_ids("word " * 120)[:112]
    greedy = lambda n: served.params(False, max_new_tokens=n, temperature=0)  # noqa: E731
    sampled = served.params(False, max_new_tokens=6, temperature=1.0, seed=3)
    jobs = [
        ([short], greedy(5)),
        ([short, short], greedy(20)),  # shares the batch with the 5-token request
        ([long], greedy(10)),  # 112 + 20 > 128: its own call
        ([short], sampled),  # seeded: alone
    ]
    results: list = [None] * len(jobs)
    streamed: list[list[int]] = [[] for _ in jobs]
    finished = threading.Semaphore(0)
    for i, (prompts, params) in enumerate(jobs):

        def done(out, err, i=i):
            results[i] = out if err is None else err
            finished.release()

        on_token = lambda p, t, i=i: streamed[i].append(t) if p == 0 else None  # noqa: E731
        batcher.submit(Request(prompts, params, on_token, done))
    for _ in jobs:
        assert finished.acquire(timeout=120)
    batcher.close()
    assert sorted(calls) == [(1, 6), (1, 10), (3, 20)]
    assert batcher.batches == [3, 1, 1]
    for (prompts, params), out, tokens in zip(jobs, results, streamed, strict=True):
        alone = generate(served.model, prompts, params, tokenizer=served.tokenizer)
        assert [c.ids for c in out] == [c.ids for c in alone]
        assert [c.finish_reason for c in out] == [c.finish_reason for c in alone]
        assert tokens == out[0].ids  # streaming stops at the request's own limit
