"""The KV-cache engine against the full-recompute reference, for every attention variant."""

from __future__ import annotations

import pytest
import torch

from frontierlm.inference import engine
from frontierlm.inference.engine import generate, generate_reference
from frontierlm.inference.sampling import SamplingParams
from frontierlm.model.kv_cache import KVCache

SMALL = {"d_model": 64, "n_heads": 4, "max_seq_len": 64}
MLA = {
    "attention": "mla",
    "mla_kv_lora_rank": 16,
    "mla_qk_nope_head_dim": 12,
    "mla_qk_rope_head_dim": 8,
    "mla_v_head_dim": 10,
}
CONFIGS = {
    "gqa": {**SMALL, "n_layers": 2, "n_kv_heads": 2, "qk_norm": True},
    "mla": {**SMALL, **MLA, "n_layers": 2, "mla_q_lora_rank": 24, "rope_pattern": "RN"},
    "moe": {**SMALL, "n_layers": 2, "n_kv_heads": 1, "moe_experts": 8, "moe_shared_experts": 1},
    "mla_moe": {**SMALL, **MLA, "n_layers": 2, "moe_experts": 8, "moe_score": "sigmoid"},
    # Gemma-2-like: local/global layers, attention and final softcaps, sandwich norms, a NoPE
    # layer and the attention output gate.
    "window_softcap": {
        **SMALL,
        "n_layers": 4,
        "layer_pattern": "LG",
        "sliding_window": 5,
        "attn_softcap": 20.0,
        "final_softcap": 10.0,
        "norm": "sandwich",
        "embed_scale": True,
        "rope_pattern": "RRRN",
        "attn_gate": True,
        "n_kv_heads": 2,
    },
}
# Prompts of different lengths, more than the slots: continuous batching refills slots.
PROMPT_LENGTHS = (3, 11, 1, 7, 16)


def peaked(model):
    """Larger weights than at initialisation: peaked logits, so no greedy choice is a near-tie
    that float rounding (a different matmul order) could flip."""
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.mul_(4)
    return model


def prompts_of(lengths, vocab=300, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


@pytest.mark.parametrize("name", list(CONFIGS))
def test_greedy_equals_full_recompute(make_random_model, name):
    model = peaked(make_random_model(**CONFIGS[name]))
    prompts = prompts_of(PROMPT_LENGTHS)
    params = SamplingParams(max_new_tokens=12, temperature=0)
    ours = generate(model, prompts, params, max_batch=2)
    ref = generate_reference(model, prompts, params)
    for a, b, prompt in zip(ours, ref, prompts, strict=True):
        assert a.ids == b.ids and len(a.ids) == 12
        assert a.prompt_ids == prompt and a.finish_reason == "length"
        assert max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs, strict=True)) < 1e-4
    # The generated sequences differ (the test would not notice a slot mix-up otherwise).
    assert len({tuple(c.ids) for c in ours}) == len(prompts)


def test_repetition_penalty_stop_ids_and_context_limit_match_reference(make_random_model):
    model = peaked(make_random_model(**CONFIGS["gqa"]))
    prompts = prompts_of((5, 2, 9, 60))  # the last reaches max_seq_len (64) after 4 tokens
    plain = generate(model, prompts, SamplingParams(max_new_tokens=10, temperature=0))
    assert [len(c.ids) for c in plain] == [10, 10, 10, 4]
    assert plain[3].finish_reason == "length"
    stop = plain[0].ids[4]  # ends the first completion after 4 tokens
    params = SamplingParams(
        max_new_tokens=10, temperature=0, repetition_penalty=1.5, stop_ids=(stop, 7)
    )
    ours = generate(model, prompts, params, max_batch=3)
    ref = generate_reference(model, prompts, params)
    assert [c.ids for c in ours] == [c.ids for c in ref]
    assert [c.finish_reason for c in ours] == [c.finish_reason for c in ref]
    assert [c.ids for c in ours] != [c.ids for c in plain]  # the penalty changed something
    assert all(stop not in c.ids and 7 not in c.ids for c in ours)
    # A prompt longer than the context keeps its last max_seq_len - 1 tokens.
    long = prompts_of((80,))[0]
    out = generate(model, [long], SamplingParams(max_new_tokens=5, temperature=0))[0]
    assert out.prompt_ids == long and len(out.ids) == 1 and out.finish_reason == "length"
    assert out.ids == generate_reference(model, [long[-63:]], SamplingParams(temperature=0))[0].ids


def test_stop_strings_and_streaming(make_random_model, small_tokenizer):
    tok, _ = small_tokenizer
    model = peaked(make_random_model(vocab_size=1024, **CONFIGS["gqa"]))
    prompts = [tok.encode(t).ids for t in ("The king", "Question: how many", "To be")]
    free = generate(model, prompts, SamplingParams(max_new_tokens=16, temperature=0))
    text = tok.decode(free[1].ids)
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    params = SamplingParams(max_new_tokens=16, temperature=0, stop_strings=(stop,))
    streamed: dict[int, list[int]] = {}
    ours = generate(
        model, prompts, params, tok, lambda i, t: streamed.setdefault(i, []).append(t), max_batch=2
    )
    ref = generate_reference(model, prompts, params, tok)
    assert [c.ids for c in ours] == [c.ids for c in ref]
    assert ours[1].finish_reason == "stop" and stop not in tok.decode(ours[1].ids)
    assert text.startswith(tok.decode(ours[1].ids))
    for i, completion in enumerate(ours):  # streamed tokens: the completion, before any cut
        assert streamed[i][: len(completion.ids)] == completion.ids
        if completion.finish_reason == "length":
            assert streamed[i] == completion.ids
    with pytest.raises(ValueError, match="stop_strings need a tokenizer"):
        generate(model, prompts, params)


def test_seeded_sampling_repeats_and_filters_apply(make_random_model):
    model = make_random_model(**CONFIGS["moe"])
    prompts = prompts_of((4, 9, 2))
    params = SamplingParams(max_new_tokens=8, temperature=1.0, top_p=0.9, min_p=0.05, seed=5)
    first, again = generate(model, prompts, params), generate(model, prompts, params)
    assert [c.ids for c in first] == [c.ids for c in again]
    other = generate(model, prompts, SamplingParams(max_new_tokens=8, temperature=1.0, seed=6))
    assert [c.ids for c in other] != [c.ids for c in first]
    # top_k=1 leaves only the argmax: sampling equals greedy decoding.
    greedy = generate(model, prompts, SamplingParams(max_new_tokens=8, temperature=0))
    top1 = generate(model, prompts, SamplingParams(max_new_tokens=8, top_k=1, seed=1))
    assert [c.ids for c in top1] == [c.ids for c in greedy]
    # Logprobs are of the raw model: sampled tokens at temperature 1 have log p <= 0 and sum
    # as the reference scores the same tokens.
    for prompt, c in zip(prompts, first, strict=True):
        logits = model(torch.tensor([prompt + c.ids]))[0, len(prompt) - 1 : -1].log_softmax(-1)
        expected = logits.gather(1, torch.tensor(c.ids)[:, None])[:, 0]
        assert torch.allclose(torch.tensor(c.logprobs), expected, atol=1e-4)


def test_mla_cache_holds_the_latent_only(make_random_model):
    model = make_random_model(**CONFIGS["mla"])
    cfg = model.cfg
    cache = KVCache(cfg, slots=3, length=32, dtype=torch.bfloat16, device="cpu")
    assert cache.keys[0].shape == (3, 1, 32, 16 + 8) and cache.values[0] is None
    assert cache.nbytes() == 3 * 32 * cfg.kv_cache_bytes_per_token(2)
    gqa = KVCache(make_random_model(**CONFIGS["gqa"]).cfg, 3, 32, torch.float32, "cpu")
    assert gqa.keys[0].shape == (3, 2, 32, 16)
    assert gqa.nbytes() == 3 * 32 * CONFIGS["gqa"]["n_layers"] * 2 * 2 * 16 * 4


def test_bad_input_is_named(make_random_model):
    model = make_random_model(**CONFIGS["gqa"])
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        generate(model, [[1], []], SamplingParams())
    with pytest.raises(ValueError, match="max_batch=0"):
        generate(model, [[1]], SamplingParams(), max_batch=0)
    assert generate(model, [[1, 2]], SamplingParams(max_new_tokens=0))[0].ids == []


def test_engine_is_kept_between_calls_and_released(make_random_model):
    model = make_random_model(**CONFIGS["gqa"])
    params = SamplingParams(max_new_tokens=4, temperature=0)
    first = generate(model, [[1, 2], [3]], params)
    kept = engine._ENGINES[model]
    assert generate(model, [[1, 2], [3]], params) == first and engine._ENGINES[model] is kept
    generate(model, [[1, 2], [3], [4]], params)  # three slots: a new engine
    assert engine._ENGINES[model] is not kept
    engine.release(model)
    assert model not in engine._ENGINES


def test_kept_engine_does_not_keep_the_model_alive(make_random_model):
    import gc
    import weakref

    model = make_random_model(**CONFIGS["gqa"])
    generate(model, [[1, 2]], SamplingParams(max_new_tokens=2, temperature=0))
    alive = weakref.ref(model)
    del model
    gc.collect()
    assert alive() is None
