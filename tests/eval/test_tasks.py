"""Evaluation tasks defined as data: multiple choice against a hand computation, acc vs
acc_norm, pass@k against closed form and brute force, GSM8K exact match on a scripted model."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from scripted_lm import ScriptedLM, drive_with_reference_generate

from frontierlm.eval.harness import run_task
from frontierlm.eval.loglik import encode_pair, score_continuations
from frontierlm.eval.pass_at_k import pass_at_k, run_python_tests
from frontierlm.eval.tasks import EvalTaskError, TaskSpec, load_spec
from frontierlm.tokenizer.train import BOS, END


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


MC_ITEMS = [
    {
        "question": "What do cows drink?",
        "choices": ["water", "milk from the moon", "oil"],
        "label": 0,
    },
    {"question": "Which is a colour?", "choices": ["blue", "seven"], "label": "blue"},
    {"question": "Pick the animal.", "choices": ["a stone", "a fast brown horse"], "label": "B"},
]


def hand_loglikelihood(model, tok, context: str, continuation: str) -> float:
    """log p(continuation | BOS + context), written out token by token."""
    bos = tok.token_to_id(BOS)
    ctx = [bos, *tok.encode(context, add_special_tokens=False).ids]
    full = [bos, *tok.encode(context + continuation, add_special_tokens=False).ids]
    assert full[: len(ctx)] == ctx  # the contexts here end at a token boundary
    with torch.no_grad():
        logp = model(torch.tensor([full[:-1]]))[0].log_softmax(-1)
    return sum(float(logp[t - 1, full[t]]) for t in range(len(ctx), len(full)))


def test_multiple_choice_equals_a_hand_computation(tmp_path, small_tokenizer, make_random_model):
    tok, _ = small_tokenizer
    model = make_random_model(vocab_size=tok.get_vocab_size(), max_seq_len=128)
    data = write_jsonl(tmp_path / "mc.jsonl", MC_ITEMS)
    spec = TaskSpec(
        name="mc",
        kind="multiple_choice",
        data=data,
        prompt="Question: {question}\nAnswer:",
        choices_field="choices",
        gold="label",
    )
    result = run_task(spec, model, tok, batch_size=3)
    golds = [0, 0, 1]
    hits = hits_norm = 0
    for item, record, gold in zip(MC_ITEMS, result["items"], golds, strict=True):
        context = f"Question: {item['question']}\nAnswer:"
        lls = [hand_loglikelihood(model, tok, context, " " + c) for c in item["choices"]]
        assert record["loglikelihoods"] == pytest.approx(lls, abs=1e-4)
        assert record["gold"] == gold
        per_byte = [ll / len(c.encode()) for ll, c in zip(lls, item["choices"], strict=True)]
        hits += max(range(len(lls)), key=lls.__getitem__) == gold
        hits_norm += max(range(len(lls)), key=per_byte.__getitem__) == gold
    assert result["metrics"]["acc"] == hits / 3
    assert result["metrics"]["acc_norm"] == hits_norm / 3
    assert result["metrics"]["chance"] == pytest.approx((1 / 3 + 1 / 2 + 1 / 2) / 3)


class UniformLM(torch.nn.Module):
    """Every token equally likely: a continuation's log-likelihood is -(its tokens) * ln V."""

    def __init__(self, vocab_size: int):
        super().__init__()
        self.vocab_size, self.cfg = vocab_size, SimpleNamespace(max_seq_len=512)
        self.weight = torch.nn.Parameter(torch.zeros(vocab_size))

    def forward(self, input_ids, doc_ids=None):
        return self.weight.expand(*input_ids.shape, -1)


def test_acc_and_acc_norm_differ_where_length_matters(tmp_path, small_tokenizer):
    tok, _ = small_tokenizer
    # "x" costs one token for one byte; the long answer is several tokens but many more bytes,
    # so the sum prefers "x" (acc) and the per-byte score prefers the long answer (acc_norm).
    items = [{"question": "q", "choices": ["x", "the history of the world"], "label": 1}]
    data = write_jsonl(tmp_path / "mc.jsonl", items)
    spec = TaskSpec(
        name="mc", kind="multiple_choice", data=data, choices_field="choices", gold="label"
    )
    model = UniformLM(tok.get_vocab_size())
    result = run_task(spec, model, tok)
    n_tokens = [len(encode_pair(tok, 0, "q", " " + c)[1]) for c in items[0]["choices"]]
    assert n_tokens[0] < n_tokens[1]
    expected = [-n * math.log(tok.get_vocab_size()) for n in n_tokens]
    assert result["items"][0]["loglikelihoods"] == pytest.approx(expected, rel=1e-5)
    assert result["metrics"] == {"acc": 0.0, "acc_norm": 1.0, "chance": 0.5}
    # Letter choices have one byte each: the two rules agree.
    letters = TaskSpec(
        name="l", kind="multiple_choice", data=data, choices=["A", "B"], gold="label"
    )
    out = run_task(letters, model, tok)
    assert out["metrics"]["acc"] == out["metrics"]["acc_norm"]


def test_long_contexts_are_cut_from_the_left(small_tokenizer, make_random_model):
    tok, _ = small_tokenizer
    model = make_random_model(vocab_size=tok.get_vocab_size(), max_seq_len=16)
    context, continuation = list(range(10, 40)), [50, 51, 52]
    got = score_continuations(model, [(context, continuation)])[0].logprob
    full = [*context, *continuation][-17:]
    with torch.no_grad():
        logp = model(torch.tensor([full[:-1]]))[0].log_softmax(-1)
    assert got == pytest.approx(sum(float(logp[t - 1, full[t]]) for t in range(14, 17)), abs=1e-5)


def test_pass_at_k_closed_form_and_brute_force():
    for n in range(1, 7):
        for c in range(n + 1):
            for k in range(1, n + 1):
                closed = 1 - math.comb(n - c, k) / math.comb(n, k)
                subsets = list(itertools.combinations([1] * c + [0] * (n - c), k))
                brute = sum(any(s) for s in subsets) / len(subsets)
                assert pass_at_k(n, c, k) == pytest.approx(closed, abs=1e-12)
                assert pass_at_k(n, c, k) == pytest.approx(brute, abs=1e-12)
    assert pass_at_k(200, 13, 1) == pytest.approx(13 / 200)  # pass@1 is the share correct
    assert pass_at_k(1000, 5, 100) == pytest.approx(1 - math.comb(995, 100) / math.comb(1000, 100))
    with pytest.raises(ValueError, match="k <= n"):
        pass_at_k(3, 1, 4)


GSM_ITEMS = [
    {"question": "Q one?", "answer": "work\n#### 18"},
    {"question": "Q two?", "answer": "#### 1000"},
    {"question": "Q three?", "answer": "#### 7"},
    {"question": "Q four?", "answer": "#### 42"},
]
GSM_REPLIES = [
    " 9 * 2 = 18\n#### 18\n\nQuestion: and the next one",  # cut at "Question:"; strict and flexible
    " It is 1,000 in all.\n#### 1,000",  # numbers compared as numbers
    " The answer is 7.",  # no ####: flexible only
    " 40 + 2 = 42\n#### 41",  # wrong under both rules (flexible takes the last number)
]


def test_gsm8k_exact_match_on_a_scripted_model(tmp_path, small_tokenizer, monkeypatch):
    tok, _ = small_tokenizer
    test = write_jsonl(tmp_path / "test.jsonl", GSM_ITEMS)
    train = write_jsonl(
        tmp_path / "train.jsonl",
        [{"question": f"Train {i}?", "answer": f"Add.\n#### {i}"} for i in range(5)],
    )
    spec = TaskSpec(
        name="gsm",
        kind="exact_match",
        data=test,
        prompt="Question: {question}\nAnswer:",
        target="{answer}",
        fewshot=2,
        fewshot_data=train,
        until=["Question:"],
        max_new_tokens=40,
    )
    pool = spec.fewshot_pool()
    bos = tok.token_to_id(BOS)
    scripts = {}
    for i, (item, reply) in enumerate(zip(GSM_ITEMS, GSM_REPLIES, strict=True)):
        context = spec.context(item, pool, i)
        # lm-eval's layout: k worked examples, blank lines between, then the question.
        shots = context.split("\n\n")
        assert len(shots) == 3 and shots[-1] == f"Question: {item['question']}\nAnswer:"
        assert all(
            s.startswith("Question: Train ") and "\nAnswer: Add.\n#### " in s for s in shots[:2]
        )
        prompt = (bos, *tok.encode(context, add_special_tokens=False).ids)
        scripts[prompt] = tok.encode(reply, add_special_tokens=False).ids
    model = ScriptedLM(tok.get_vocab_size(), scripts, tok.token_to_id(END))
    drive_with_reference_generate(monkeypatch)
    result = run_task(spec, model, tok)
    assert sorted(model.seen_prompts) == sorted(scripts)
    assert [r["strict"] for r in result["items"]] == [True, True, False, False]
    assert [r["flexible"] for r in result["items"]] == [True, True, True, False]
    assert result["metrics"] == {"exact_match_strict": 0.5, "exact_match_flexible": 0.75}
    assert result["items"][0]["completion"] == " 9 * 2 = 18\n#### 18\n\n"


def test_pass_at_k_task_counts_correct_samples(tmp_path, small_tokenizer, monkeypatch):
    """n samples of a scripted model (the same reply each time): all right or all wrong."""
    tok, _ = small_tokenizer
    data = write_jsonl(tmp_path / "t.jsonl", GSM_ITEMS[:2])
    spec = TaskSpec(
        name="p",
        kind="pass_at_k",
        data=data,
        prompt="Question: {question}\nAnswer:",
        samples=3,
        k=[1, 2],
        temperature=0.7,
        until=["Question:"],
        max_new_tokens=30,
    )
    bos = tok.token_to_id(BOS)
    scripts = {
        (
            bos,
            *tok.encode(f"Question: {item['question']}\nAnswer:", add_special_tokens=False).ids,
        ): tok.encode(reply, add_special_tokens=False).ids
        for item, reply in zip(GSM_ITEMS[:2], [" #### 18", " #### 3"], strict=True)
    }
    model = ScriptedLM(tok.get_vocab_size(), scripts, tok.token_to_id(END))
    drive_with_reference_generate(monkeypatch)
    result = run_task(spec, model, tok)
    assert [r["correct"] for r in result["items"]] == [3, 0]
    assert result["metrics"] == {"pass@1": 0.5, "pass@2": 0.5}


def test_python_tests_verifier_runs_the_program():
    assert run_python_tests("def f(x):\n    return x + 1\nassert f(1) == 2\n", 10)
    assert not run_python_tests("assert 1 == 2\n", 10)
    assert not run_python_tests("while True:\n    pass\n", 1.0)


def test_humaneval_canonical_solutions_pass(tmp_path):
    from frontierlm.eval.pass_at_k import check_sample

    spec = load_spec("humaneval")
    items = spec.items(3)
    for item in items:
        assert check_sample(spec, item, item["canonical_solution"])
        assert not check_sample(spec, item, "    return None\n")


def test_shipped_specs_load_and_fit_their_items():
    for name in (
        "mmlu",
        "mmlu_cloze",
        "gsm8k",
        "gsm8k_chat",
        "gsm8k_pass",
        "humaneval",
        "wikitext2",
    ):
        spec = load_spec(name)
        items = spec.items(5)
        assert len(items) == 5 or spec.kind == "bpb"
        if spec.kind != "bpb":
            assert spec.context(items[0], spec.fewshot_pool(), 0)
    mmlu = load_spec("mmlu")
    subjects = {item["subject"] for item in mmlu.items(50)}
    assert len(subjects) > 20  # a seeded sample across subjects, not the first subject's items
    five = mmlu.model_copy(update={"fewshot": 5})
    item = five.items(1)[0]
    context = five.context(item, five.fewshot_pool(), 0)
    assert context.count("\nAnswer:") == 6 and context.endswith(
        "D. " + item["choices"][3] + "\nAnswer:"
    )


def test_bad_specs_and_items_name_the_problem(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('kind = "multiple_choice"\ndata = "x.jsonl"\n')
    with pytest.raises(EvalTaskError, match="exactly one of choices_field and choices"):
        load_spec(str(bad))
    with pytest.raises(EvalTaskError, match="not shipped"):
        load_spec("no_such_task")
    data = write_jsonl(tmp_path / "d.jsonl", [{"q": "a"}])
    spec = TaskSpec(name="t", kind="exact_match", data=data, prompt="{question}")
    with pytest.raises(EvalTaskError, match="template '\\{question\\}' does not fit item"):
        spec.context(spec.items()[0], [], 0)
    (tmp_path / "broken.jsonl").write_text('{"a": 1}\nnot json\n')
    spec = TaskSpec(name="t", kind="exact_match", data=str(tmp_path / "broken.jsonl"))
    with pytest.raises(EvalTaskError, match=r"broken\.jsonl:2: not JSON"):
        spec.items()


def test_recipe_names_a_bad_task():
    from frontierlm.config import ConfigError, load_config

    root = Path(__file__).resolve().parents[2]
    with pytest.raises(ConfigError, match=r"eval.tasks\[1\].*not shipped"):
        load_config(root / "recipes" / "micro.toml", ["--eval.tasks=['mmlu', 'mmluu']"])


def test_paired_comparison_matches_scipy_binomial_and_wilson():
    """McNemar's exact test is a two-sided binomial test of the discordant items at p = 1/2."""
    from scipy.stats import binomtest

    from frontierlm.eval.exact_match import paired_comparison
    from frontierlm.eval.safety import wilson

    # 100 items: 40 right in both, 15 only after, 5 only before, 40 wrong in both.
    before = [True] * 40 + [False] * 15 + [True] * 5 + [False] * 40
    after = [True] * 40 + [True] * 15 + [False] * 5 + [False] * 40
    out = paired_comparison(before, after)
    assert (out["n"], out["both"], out["only_after"], out["only_before"]) == (100, 40, 15, 5)
    assert (out["before"], out["after"]) == (0.45, 0.55)
    assert out["mcnemar_p"] == pytest.approx(binomtest(5, 20, 0.5).pvalue, rel=1e-12)
    assert out["mcnemar_p"] == pytest.approx(2 * sum(math.comb(20, k) for k in range(6)) / 2**20)
    assert out["after_ci"] == wilson(55, 100)
    low, high = out["after_ci"]
    assert low == pytest.approx(0.4524, abs=1e-4) and high == pytest.approx(0.6438, abs=1e-4)
    assert paired_comparison([True, False], [True, False])["mcnemar_p"] == 1.0
    with pytest.raises(ValueError, match="items"):
        paired_comparison([True], [True, False])
