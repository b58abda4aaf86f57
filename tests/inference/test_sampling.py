"""The shared generation API: sampling filters and the reference (full recompute) generator."""

from __future__ import annotations

import pytest
import torch

from frontierlm.inference.engine import generate
from frontierlm.inference.sampling import SamplingParams, filter_logits, sample_next


def test_filters_keep_the_right_tokens():
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.15, 0.1]]))
    kept = lambda **kw: torch.isfinite(filter_logits(logits, SamplingParams(**kw)))[0].tolist()  # noqa: E731
    assert kept(top_k=2) == [True, True, False, False]
    # top_p 0.7: 0.5 < 0.7 so the second token is needed, 0.75 >= 0.7 so the third is not.
    assert kept(top_p=0.7) == [True, True, False, False]
    assert kept(top_p=0.75) == [True, True, False, False]
    assert kept(top_p=0.76) == [True, True, True, False]
    # min_p 0.3: tokens with p >= 0.15 stay.
    assert kept(min_p=0.3) == [True, True, True, False]


def test_repetition_penalty_matches_ctrl():
    logits = torch.tensor([[2.0, -2.0, 1.0]])
    seen = torch.tensor([[True, True, False]])
    params = SamplingParams(temperature=0, repetition_penalty=2.0)
    from frontierlm.inference.sampling import apply_repetition_penalty

    assert apply_repetition_penalty(logits, seen, 2.0).tolist() == [[1.0, -4.0, 1.0]]
    assert sample_next(torch.tensor([[2.0, -2.0, 1.5]]), params, seen=seen).item() == 2


def test_bad_params_name_the_field():
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0.0)


def test_greedy_equals_argmax_recompute_and_seeded_sampling_repeats(make_random_model):
    model = make_random_model()
    prompts = [[1, 2, 3], [7, 8]]
    out = generate(model, prompts, SamplingParams(max_new_tokens=6, temperature=0))
    for prompt, completion in zip(prompts, out, strict=True):
        ids = list(prompt)
        for _ in range(6):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
        assert completion.ids == ids[len(prompt) :]
        assert completion.finish_reason == "length"
    sampled = SamplingParams(max_new_tokens=5, temperature=1.0, top_k=20, seed=3)
    first, again = generate(model, prompts, sampled), generate(model, prompts, sampled)
    assert [c.ids for c in first] == [c.ids for c in again]


def test_stop_id_ends_a_completion(make_random_model):
    model = make_random_model()
    greedy = generate(model, [[1, 2, 3]], SamplingParams(max_new_tokens=6, temperature=0))[0]
    stop = greedy.ids[2]
    out = generate(
        model, [[1, 2, 3]], SamplingParams(max_new_tokens=6, temperature=0, stop_ids=(stop,))
    )[0]
    assert out.ids == greedy.ids[: greedy.ids.index(stop)]
    assert out.finish_reason == "stop"
