"""The lm-eval adapter: its scores equal FrontierLM's own evaluator, request by request and
through `lm_eval.simple_evaluate` on a local task (offline: the task reads a JSONL file)."""

from __future__ import annotations

import json
import os
import textwrap
from pathlib import Path

import pytest

# lm-eval is a test dependency (pip install -e ".[dev]"); tasks read local files only.
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import lm_eval
from lm_eval.api.instance import Instance
from lm_eval.tasks import TaskManager
from scripted_lm import ScriptedLM, drive_with_reference_generate

from frontierlm.eval.harness import run_task
from frontierlm.eval.lm_eval_adapter import FrontierLMEval
from frontierlm.eval.tasks import TaskSpec
from frontierlm.tokenizer.train import BOS, END

ITEMS = [
    {
        "question": "What do cows drink?",
        "choices": ["water", "milk from the moon", "oil"],
        "label": 0,
    },
    {"question": "Which is a colour?", "choices": ["blue", "seven"], "label": 0},
    {"question": "Pick the animal.", "choices": ["a stone", "a fast brown horse"], "label": 1},
    {
        "question": "Where is Paris?",
        "choices": ["in France", "under the sea", "on Mars"],
        "label": 0,
    },
    {"question": "How many legs has a cat?", "choices": ["four", "eleven"], "label": 0},
    {"question": "Is ice cold?", "choices": ["yes", "no, it is hot"], "label": 0},
]


def write_task(folder, name: str, data: str, body: str) -> None:
    (folder / f"{name}.yaml").write_text(
        f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\n" + textwrap.dedent(body)
    )


# lm-eval's task config for the items of `mc_spec`, scored as our multiple-choice kind scores them.
MC_TASK_YAML = """\
output_type: multiple_choice
doc_to_text: "Question: {{question}}\\nAnswer:"
doc_to_choice: "{{choices}}"
doc_to_target: label
metric_list:
  - metric: acc
  - metric: acc_norm
"""


def mc_spec(tmp_path: Path) -> TaskSpec:
    """The multiple-choice task over ITEMS, written to `tmp_path`."""
    data = tmp_path / "mc.jsonl"
    data.write_text("".join(json.dumps(i) + "\n" for i in ITEMS))
    return TaskSpec(
        name="mc",
        kind="multiple_choice",
        data=str(data),
        prompt="Question: {question}\nAnswer:",
        choices_field="choices",
        gold="label",
    )


def test_loglikelihood_equals_our_multiple_choice_scores(
    tmp_path, small_tokenizer, make_random_model
):
    tok, _ = small_tokenizer
    model = make_random_model(vocab_size=tok.get_vocab_size(), max_seq_len=64)
    spec = mc_spec(tmp_path)
    ours = run_task(spec, model, tok)
    adapter = FrontierLMEval(pretrained=model, tokenizer=tok, batch_size=5)
    requests = [
        Instance("loglikelihood", item, (f"Question: {item['question']}\nAnswer:", " " + c), i)
        for item in ITEMS
        for i, c in enumerate(item["choices"])
    ]
    theirs = [lp for lp, _ in adapter.loglikelihood(requests)]
    assert theirs == pytest.approx(
        [x for r in ours["items"] for x in r["loglikelihoods"]], abs=1e-5
    )
    # a context ending in a space: lm-eval moves the space to the continuation
    a = adapter.loglikelihood([Instance("loglikelihood", {}, ("Answer: ", "blue"), 0)])[0][0]
    b = adapter.loglikelihood([Instance("loglikelihood", {}, ("Answer:", " blue"), 0)])[0][0]
    assert a == pytest.approx(b, abs=1e-6)

    # The whole harness, offline: the same items as a local lm-eval task.
    write_task(
        tmp_path,
        "local_mc",
        spec.data,
        MC_TASK_YAML,
    )
    out = lm_eval.simple_evaluate(
        model=adapter,
        tasks=["local_mc"],
        task_manager=TaskManager(include_path=str(tmp_path), include_defaults=False),
        num_fewshot=0,
    )
    metrics = out["results"]["local_mc"]
    assert metrics["acc,none"] == pytest.approx(ours["metrics"]["acc"])
    assert metrics["acc_norm,none"] == pytest.approx(ours["metrics"]["acc_norm"])


def test_rolling_loglikelihood_covers_every_token_once(small_tokenizer, make_random_model):
    import torch

    tok, _ = small_tokenizer
    model = make_random_model(vocab_size=tok.get_vocab_size(), max_seq_len=16)
    adapter = FrontierLMEval(pretrained=model, tokenizer=tok)
    text = "The quick brown fox jumps over the lazy dog, again and again, until the end."
    ids = tok.encode(text, add_special_tokens=False).ids
    assert len(ids) > 16  # several windows
    got = adapter.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])[0]
    # By hand, lm-eval's documented windows: blocks of 16 predicted tokens, each read after
    # the token before it (BOS first); the last, shorter block is read with a full context.
    stream, n = [tok.token_to_id(BOS), *ids], len(ids)
    expected = 0.0
    with torch.no_grad():
        for first in range(0, n, 16):
            last = min(first + 16, n)  # predict ids[first:last] = stream[first + 1 : last + 1]
            start = first if last - first == 16 or first == 0 else max(0, last - 16)
            window = stream[start:last]
            logp = model(torch.tensor([window]))[0].log_softmax(-1)
            for t in range(first + 1, last + 1):
                expected += float(logp[t - 1 - start, stream[t]])
    assert got == pytest.approx(expected, abs=1e-4)


GSM = [
    {"question": "Q one?", "answer": "work\n#### 18"},
    {"question": "Q two?", "answer": "#### 1000"},
    {"question": "Q three?", "answer": "#### 7"},
    {"question": "Q four?", "answer": "#### 42"},
]
REPLIES = [
    " 9 * 2 = 18\n#### 18",
    " It is 1,000 in all.\n#### 1,000",
    " The answer is 7.",
    " #### 41",
]


def test_gsm8k_exact_match_through_the_harness_equals_ours(tmp_path, small_tokenizer, monkeypatch):
    tok, _ = small_tokenizer
    data = tmp_path / "gsm.jsonl"
    data.write_text("".join(json.dumps(i) + "\n" for i in GSM))
    bos = tok.token_to_id(BOS)
    scripts = {
        (
            bos,
            *tok.encode(f"Question: {g['question']}\nAnswer:", add_special_tokens=False).ids,
        ): tok.encode(r, add_special_tokens=False).ids
        for g, r in zip(GSM, REPLIES, strict=True)
    }
    model = ScriptedLM(tok.get_vocab_size(), scripts, tok.token_to_id(END))
    drive_with_reference_generate(monkeypatch)
    spec = TaskSpec(
        name="gsm",
        kind="exact_match",
        data=str(data),
        prompt="Question: {question}\nAnswer:",
        until=["Question:"],
        max_new_tokens=32,
    )
    ours = run_task(spec, model, tok)["metrics"]
    # lm-eval's gsm8k.yaml, zero-shot, on the local file
    write_task(
        tmp_path,
        "local_gsm8k",
        spec.data,
        """\
        output_type: generate_until
        doc_to_text: "Question: {{question}}\\nAnswer:"
        doc_to_target: "{{answer}}"
        metric_list:
          - metric: exact_match
            aggregation: mean
            higher_is_better: true
            ignore_case: true
            ignore_punctuation: false
            regexes_to_ignore: [",", "\\\\$", "(?s).*#### ", "\\\\.$"]
        generation_kwargs:
          until: ["Question:", "</s>", "<|im_end|>"]
          do_sample: false
          temperature: 0.0
          max_gen_toks: 32
        filter_list:
          - name: "strict-match"
            filter:
              - function: "regex"
                regex_pattern: "#### (\\\\-?[0-9\\\\.\\\\,]+)"
              - function: "take_first"
          - name: "flexible-extract"
            filter:
              - function: "regex"
                group_select: -1
                regex_pattern: "(-?[$0-9.,]{2,})|(-?[0-9]+)"
              - function: "take_first"
        """,
    )
    adapter = FrontierLMEval(pretrained=model, tokenizer=tok)
    out = lm_eval.simple_evaluate(
        model=adapter,
        tasks=["local_gsm8k"],
        task_manager=TaskManager(include_path=str(tmp_path), include_defaults=False),
        num_fewshot=0,
    )
    metrics = out["results"]["local_gsm8k"]
    assert metrics["exact_match,strict-match"] == ours["exact_match_strict"] == 0.5
    assert metrics["exact_match,flexible-extract"] == ours["exact_match_flexible"] == 0.75


@pytest.mark.slow  # transformers + lm-eval's hf class: ~70 s under this machine's load
def test_exported_model_in_lm_evals_own_hf_class_equals_our_evaluator(
    tmp_path, small_tokenizer, make_random_model
):
    """The issue's check: our model exported to Hugging Face format, scored by lm-eval's own
    `hf` model class (transformers), gives the accuracy and the per-choice log-likelihoods of
    FrontierLM's evaluator on the FrontierLM checkpoint."""
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    from frontierlm.model.hf import export_hf
    from frontierlm.tokenizer.train import save_tokenizer

    tok, _ = small_tokenizer
    model = make_random_model(vocab_size=tok.get_vocab_size(), max_seq_len=64)
    tok_dir = tmp_path / "tokenizer"
    save_tokenizer(tok, tok_dir)
    export_hf(model, tmp_path / "hf", tok_dir)
    # lm-eval's hf class adds BOS through the tokenizer's post-processor (add_bos_token=True);
    # ours prepends it in code, so give the exported tokenizer one.
    with_bos = PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "hf" / "tokenizer.json"))
    bos = tok.token_to_id(BOS)
    with_bos.backend_tokenizer.post_processor = TemplateProcessing(
        single="<|bos|> $A", special_tokens=[("<|bos|>", bos)]
    )
    with_bos.bos_token = "<|bos|>"

    spec = mc_spec(tmp_path)
    ours = run_task(spec, model, tok)
    write_task(
        tmp_path,
        "local_mc_hf",
        spec.data,
        MC_TASK_YAML,
    )
    from lm_eval.models.huggingface import HFLM

    hf = HFLM(
        pretrained=str(tmp_path / "hf"),
        tokenizer=with_bos,
        add_bos_token=True,
        device="cpu",
        dtype="float32",
        batch_size=4,
    )
    out = lm_eval.simple_evaluate(
        model=hf,
        tasks=["local_mc_hf"],
        task_manager=TaskManager(include_path=str(tmp_path), include_defaults=False),
        num_fewshot=0,
        log_samples=True,
    )
    metrics = out["results"]["local_mc_hf"]
    assert metrics["acc,none"] == pytest.approx(ours["metrics"]["acc"])
    assert metrics["acc_norm,none"] == pytest.approx(ours["metrics"]["acc_norm"])
    samples = sorted(out["samples"]["local_mc_hf"], key=lambda s: s["doc_id"])
    theirs = [[float(r[0][0]) for r in s["resps"]] for s in samples]
    mine = [r["loglikelihoods"] for r in ours["items"]]
    for a, b in zip(theirs, mine, strict=True):
        assert a == pytest.approx(b, abs=1e-4)
    # and our adapter pointed at the exported directory (loaded back through load_hf)
    adapter = FrontierLMEval(pretrained=str(tmp_path / "hf"))
    requests = [
        Instance("loglikelihood", item, (f"Question: {item['question']}\nAnswer:", " " + c), i)
        for item in ITEMS
        for i, c in enumerate(item["choices"])
    ]
    got = [lp for lp, _ in adapter.loglikelihood(requests)]
    assert got == pytest.approx([x for r in mine for x in r], abs=1e-4)
