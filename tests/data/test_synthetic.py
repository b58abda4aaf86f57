"""Synthetic data: selection, regeneration limit and dedup checked exactly with a scripted
sampler; the fidelity check; the stage end to end on a scripted model."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from frontierlm.data.synthetic import (
    PASS,
    SourceItem,
    exact_match_judge,
    fidelity,
    rephrase_judge,
    synthesize,
    text_key,
)

RIGHT_A, RIGHT_A2 = "2 + 2 = 4\n#### 4", "Two and two make four.\n#### 4"


def test_selection_regeneration_and_dedup_exactly():
    items = [
        SourceItem(1, "A?", "#### 4"),  # right in round 0 (two right replies: the first kept)
        SourceItem(2, "B?", "#### 5"),  # wrong, then right in round 1
        SourceItem(3, "C?", "#### 6"),  # never right: sampled 3 times (2 regenerations), dropped
        SourceItem(4, "D?", "#### 7"),  # right but already SFT data, then the next right reply
        SourceItem(5, "A?", "#### 4"),  # the same problem again: right, but only A's reply
    ]
    script = {
        (1, 0): ["#### 3", RIGHT_A, RIGHT_A2],
        (2, 0): ["#### 1", "#### 2", "no answer"],
        (2, 1): ["#### 9", "5 apples\n#### 5", "#### 5"],
        (3, 0): ["#### 1"] * 3,
        (3, 1): ["#### 2"] * 3,
        (3, 2): ["#### 3"] * 3,
        (4, 0): ["seven.  \n#### 7", "#### 8", "#### 8"],
        (4, 1): ["Seven.\n#### 7", "3 + 4 = 7\n#### 7", "#### 1"],
        (5, 0): [RIGHT_A, "#### 0", "#### 0"],
        (5, 1): ["2 + 2 = 4\n####  4", "#### 0", "#### 0"],
        (5, 2): ["  2 + 2 =   4\n####   4", "#### 0", "#### 0"],
    }
    calls: list[tuple[int, list[int]]] = []

    def sample(batch: list[SourceItem], round_no: int) -> list[list[str]]:
        calls.append((round_no, [it.line for it in batch]))
        return [script[(it.line, round_no)] for it in batch]

    existing = {text_key("D?", "Seven.\n#### 7")}  # an SFT chat (matched up to case/spaces)
    key = lambda item, reply: text_key(item.prompt, reply)  # noqa: E731
    result = synthesize(items, sample, exact_match_judge, key, existing, max_regenerations=2)

    assert calls == [(0, [1, 2, 3, 4, 5]), (1, [2, 3, 4, 5]), (2, [3, 5])]
    kept = [(k["item"].line, k["reply"], k["round"], k["score"]) for k in result.kept]
    assert kept == [
        (1, RIGHT_A, 0, 1.0),
        (2, "5 apples\n#### 5", 1, 1.0),
        (4, "3 + 4 = 7\n#### 7", 1, 1.0),
    ]
    assert result.dropped == {"wrong_answer": 1, "duplicate_in_output": 1}
    assert result.samples == 33
    assert result.samples_accepted == 4 + 5 + 1
    assert result.rounds == [
        {"round": 0, "items": 5, "kept": 1},
        {"round": 1, "items": 4, "kept": 2},
        {"round": 2, "items": 2, "kept": 0},
    ]


def test_regeneration_limit_and_drop_reasons():
    items = [SourceItem(i, f"P{i}?", "#### 1") for i in range(3)]
    existing = {text_key("P0?", "#### 1")}
    rounds_seen = []

    def sample(batch, round_no):
        rounds_seen.append(round_no)
        # P0: only a reply that is in the SFT data; P1: always wrong; P2: P0's reply text,
        # but to another prompt, so a new chat (kept).
        replies = {0: ["#### 1"], 1: ["#### 2"], 2: ["#### 1"]}
        return [replies[it.line] for it in batch]

    key = lambda item, reply: text_key(item.prompt, reply)  # noqa: E731
    for limit in (0, 1, 2):
        rounds_seen.clear()
        result = synthesize(
            items, sample, exact_match_judge, key, existing, max_regenerations=limit
        )
        assert rounds_seen == list(range(limit + 1))
        assert [k["item"].line for k in result.kept] == [2]
        assert result.dropped == {"duplicate_of_existing": 1, "wrong_answer": 1}
        assert result.samples == 3 + 2 * limit
        assert result.samples_accepted == 2 + limit  # P0's reply passes the verifier each round


def test_fidelity_bounds():
    passage = "The Nile is the longest river in Africa and flows north into the Mediterranean Sea."
    copy = passage
    rephrased = "Flowing north to the Mediterranean Sea, the Nile is Africa's longest river."
    unrelated = "Bananas are yellow fruit that monkeys enjoy eating every day."
    recall, overlap = fidelity(passage, copy, 4)
    assert (recall, overlap) == (1.0, 1.0)
    recall, overlap = fidelity(passage, rephrased, 3)
    # 13 distinct passage words, of which the rephrasing keeps 9 (the, nile, is, longest,
    # river, africa, north, mediterranean, sea); of its 11 word 3-grams two are verbatim in
    # the passage ("the mediterranean sea", "the nile is")
    assert (recall, overlap) == (pytest.approx(9 / 13), pytest.approx(2 / 11))
    assert fidelity(passage, rephrased, 4)[1] == 0.0
    from frontierlm.config import SynthConfig

    judge = rephrase_judge(SynthConfig(source="x", mode="rephrase", min_word_recall=0.4))
    item = SourceItem(1, "Rephrase", passage)
    verdicts = [j.verdict for j in judge(item, [copy, rephrased, unrelated, "Nile"])]
    assert verdicts == ["copied", PASS, "unfaithful", "too_short"]


def test_synth_stage_writes_verified_chats_sft_reads(tmp_path, monkeypatch, small_tokenizer):
    """The stage on a scripted model: right answers kept as SFT-ready chats, a wrong one
    dropped after 2 regenerations, a copy of an SFT chat dropped as a duplicate."""
    import gzip
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "eval"))
    from scripted_lm import ScriptedLM, drive_with_reference_generate

    from frontierlm.config import ChatSource, load_config
    from frontierlm.data.synthetic import run_synth_stage
    from frontierlm.posttrain.chat_data import load_conversations
    from frontierlm.stages import STAGES, StageContext
    from frontierlm.tokenizer.chat import ChatRenderer, Message
    from frontierlm.tokenizer.train import END, save_tokenizer

    tok, _ = small_tokenizer
    root = Path(__file__).resolve().parents[2]
    with gzip.open(root / "data" / "gsm8k" / "train.jsonl.gz", "rt") as f:
        known = json.loads(next(f))  # the micro recipe's SFT data holds this chat
    problems = [
        {"question": "Ann has 2 cats and gets 3 more. How many cats?", "answer": "2+3=5\n#### 5"},
        {"question": "What is 6 times 7?", "answer": "#### 42"},
        known,
    ]
    replies = ["2 + 3 = 5 cats.\n#### 5", "6 * 7 = 41\n#### 41", known["answer"]]
    source = tmp_path / "problems.jsonl"
    source.write_text("".join(json.dumps(p) + "\n" for p in problems) + "not json\n")
    renderer = ChatRenderer(tok)
    scripts = {
        tuple(
            renderer.render([Message("user", p["question"])], add_generation_prompt=True).ids
        ): tok.encode(r, add_special_tokens=False).ids
        for p, r in zip(problems, replies, strict=True)
    }
    model = ScriptedLM(tok.get_vocab_size(), scripts, tok.token_to_id(END))
    drive_with_reference_generate(monkeypatch)
    monkeypatch.setattr("frontierlm.train.checkpoint.load_model_dir", lambda *a, **k: model)
    monkeypatch.chdir(root)
    cfg = load_config(
        root / "recipes" / "micro.toml",
        [f"--run.out_dir={tmp_path}", f"--synth.source={source}", "--synth.samples=2"],
    )
    save_tokenizer(tok, cfg.run.run_dir / "tokenizer")
    work = tmp_path / "synth.partial"
    work.mkdir()
    metrics = run_synth_stage(StageContext(cfg, STAGES["synth"], work))

    stats = json.loads((work / "stats.json").read_text())
    assert stats["items"] == 3 and stats["kept"] == 1
    assert stats["dropped"] == {"wrong_answer": 1, "duplicate_of_existing": 1, "malformed_json": 1}
    assert [r["items"] for r in stats["rounds"]] == [3, 2, 2]
    assert stats["samples"] == 2 * (3 + 2 + 2) and metrics["acceptance_rate"] == 1 / 3
    chats = load_conversations(
        ChatSource(name="synth", path=str(work / "synth.jsonl"), format="qa")
    )
    assert [(c[0].content, c[1].content) for c in chats] == [(problems[0]["question"], replies[0])]


def test_dpo_reward_judge_is_the_implicit_reward(small_tokenizer, make_random_model):
    import torch

    from frontierlm.data.synthetic import dpo_reward_judge
    from frontierlm.tokenizer.chat import ChatRenderer, Message

    tok, _ = small_tokenizer
    policy = make_random_model(vocab_size=tok.get_vocab_size(), seed=1, max_seq_len=128)
    reference = make_random_model(vocab_size=tok.get_vocab_size(), seed=2, max_seq_len=128)
    renderer = ChatRenderer(tok)
    item = SourceItem(1, "What is 2 + 2?", "#### 4")
    replies = ["It is 4.\n#### 4", "Five."]

    def logp(model, reply: str) -> float:  # log p(reply + END | chat prompt), by hand
        prompt = renderer.render([Message("user", item.prompt)], add_generation_prompt=True).ids
        full = prompt + renderer.encode_text(reply) + [renderer.end]
        with torch.no_grad():
            lp = model(torch.tensor([full[:-1]]))[0].log_softmax(-1)
        return sum(float(lp[t - 1, full[t]]) for t in range(len(prompt), len(full)))

    rewards = [0.1 * (logp(policy, r) - logp(reference, r)) for r in replies]
    threshold = (rewards[0] + rewards[1]) / 2
    judged = dpo_reward_judge(policy, reference, 0.1, renderer, threshold)(item, replies)
    assert [j.score for j in judged] == pytest.approx(rewards, abs=1e-5)
    best = max(range(2), key=rewards.__getitem__)
    assert [j.verdict for j in judged] == [
        PASS if i == best else "below_threshold" for i in range(2)
    ]


def test_synth_stage_needs_a_synth_table(tmp_path):
    from frontierlm.config import load_config
    from frontierlm.stages import run_stage

    root = Path(__file__).resolve().parents[2]
    cfg = load_config(root / "recipes" / "micro.toml", [f"--run.out_dir={tmp_path}"])
    with pytest.raises(ValueError, match=r"add a \[synth\] table"):
        run_stage(cfg, "synth")


def choice_lm(vocab_size: int, scripts: dict[tuple[int, ...], list[list[int]]], end_id: int):
    """A model that, after a scripted prompt, puts equal logits on the next token of every
    scripted reply the output so far still matches: sampling at temperature 1 picks among the
    replies (a coin flip between a right and a wrong one), through the real sampler."""
    from types import SimpleNamespace

    import torch
    from torch import nn

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.vocab_size = vocab_size
            self.cfg = SimpleNamespace(max_seq_len=100_000)
            self._anchor = nn.Parameter(torch.zeros(1))

        def forward(self, input_ids: torch.Tensor, doc_ids=None) -> torch.Tensor:
            # Only the last position is read by generation: (batch, 1, vocab).
            logits = torch.full((input_ids.shape[0], 1, vocab_size), -30.0)
            for r, row in enumerate(input_ids.tolist()):
                prompt = next(p for p in scripts if tuple(row[: len(p)]) == p)
                done = row[len(prompt) :]
                for reply in scripts[prompt]:
                    if reply[: len(done)] == done:
                        nxt = reply[len(done)] if len(done) < len(reply) else end_id
                        logits[r, -1, nxt] = 30.0
            return logits

    return Model()


def test_synth_keeps_only_verified_word_problem_answers(tmp_path, monkeypatch, small_tokenizer):
    """The synth stage of recipes/synth-arithmetic.toml on 12 of its real prompts, sampled at
    temperature 1 from a model that answers 4 of them always right, 4 always wrong (the result
    off by one) and 4 by a coin flip: every written answer equals the generator's own value,
    every item that was never answered right is dropped as wrong_answer after 2 regenerations,
    and the counts equal those of the samples actually drawn."""
    import gzip
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "eval"))
    from scripted_lm import drive_with_reference_generate

    from frontierlm.config import load_config
    from frontierlm.data.synthetic import run_synth_stage
    from frontierlm.inference import engine
    from frontierlm.posttrain.arithmetic import Difficulty, make_problem
    from frontierlm.posttrain.rewards import extract_answer
    from frontierlm.stages import STAGES, StageContext
    from frontierlm.tokenizer.chat import ChatRenderer, Message
    from frontierlm.tokenizer.train import END, save_tokenizer

    tok, _ = small_tokenizer
    root = Path(__file__).resolve().parents[2]
    with gzip.open(root / "data" / "arithmetic" / "word-prompts.jsonl.gz", "rt") as f:
        problems = [json.loads(next(f)) for _ in range(12)]
    truth = [make_problem(Difficulty(1, "+-", 2, "word"), 11, i) for i in range(12)]
    assert [p["question"] for p in problems] == [t.question for t in truth]  # the file's stream
    values = [int(t.answer.rsplit("#### ", 1)[1]) for t in truth]
    wrong = [t.answer.replace(f"= {v}\n#### {v}", f"= {v + 1}\n#### {v + 1}") for t, v in
             zip(truth, values, strict=True)]  # fmt: skip
    kinds = ["right", "wrong", "coin"] * 4
    replies = {
        "right": lambda i: [truth[i].answer],
        "wrong": lambda i: [wrong[i]],
        "coin": lambda i: [truth[i].answer, wrong[i]],
    }
    renderer = ChatRenderer(tok)
    prompt_of = [
        tuple(renderer.render([Message("user", p["question"])], add_generation_prompt=True).ids)
        for p in problems
    ]
    encode = lambda text: tok.encode(text, add_special_tokens=False).ids  # noqa: E731
    scripts = {
        prompt_of[i]: [encode(r) for r in replies[kinds[i]](i)] for i in range(len(problems))
    }
    model = choice_lm(tok.get_vocab_size(), scripts, tok.token_to_id(END))
    drive_with_reference_generate(monkeypatch)
    drawn: list[tuple[int, str]] = []  # every sample the stage drew: (item, text)
    reference_generate = engine.generate

    def recording_generate(model, prompts, params, **kw):
        out = reference_generate(model, prompts, params, **kw)
        drawn.extend((prompt_of.index(tuple(p)), tok.decode(c.ids).strip())
                     for p, c in zip(prompts, out, strict=True))  # fmt: skip
        return out

    monkeypatch.setattr(engine, "generate", recording_generate)
    monkeypatch.setattr("frontierlm.train.checkpoint.load_model_dir", lambda *a, **k: model)
    monkeypatch.chdir(root)
    source = tmp_path / "prompts.jsonl"
    source.write_text("".join(json.dumps(p) + "\n" for p in problems))
    cfg = load_config(
        root / "recipes" / "synth-arithmetic.toml",
        [f"--run.out_dir={tmp_path}", f"--synth.source={source}", "--synth.samples=2",
         "--synth.temperature=1.0", "--synth.scorer=exact_match"],  # fair coin flips
    )  # fmt: skip
    assert cfg.synth.max_regenerations == 2
    save_tokenizer(tok, cfg.run.run_dir / "tokenizer")
    work = tmp_path / "synth.partial"
    work.mkdir()
    run_synth_stage(StageContext(cfg, STAGES["synth"], work))

    stats = json.loads((work / "stats.json").read_text())
    written = [json.loads(line) for line in (work / "synth.jsonl").read_text().splitlines()]
    right_items = {i for i, text in drawn if extract_answer(text) == str(values[i])}
    # Only verified answers are written: each one is the generator's value, once per item.
    for record in written:
        i = next(i for i, p in enumerate(problems) if p["question"] == record["question"])
        assert extract_answer(record["answer"]) == str(values[i])
        assert record["answer"] == truth[i].answer and record["meta"]["line"] == i + 1
    assert {r["question"] for r in written} == {problems[i]["question"] for i in right_items}
    assert len(written) == len(right_items) == stats["kept"]
    assert {i for i in range(12) if kinds[i] == "right"} <= right_items
    assert not {i for i in range(12) if kinds[i] == "wrong"} & right_items
    coins = sum(1 for i in right_items if kinds[i] == "coin")
    assert stats["dropped"] == {"wrong_answer": 12 - len(right_items)}
    # Sample counts: 2 per item per round; accepted = the right answers among those drawn.
    assert stats["samples"] == len(drawn) == 2 * sum(r["items"] for r in stats["rounds"])
    assert stats["samples_accepted"] == sum(
        1 for i, text in drawn if extract_answer(text) == str(values[i])
    )
    # An item kept in round r was sampled r + 1 times; a dropped one 3 times (2 regenerations).
    per_item = Counter(i for i, _ in drawn)
    rounds = {r["question"]: r["meta"]["round"] for r in written}
    for i, p in enumerate(problems):
        assert per_item[i] == 2 * (rounds.get(p["question"], 2) + 1)
        if kinds[i] == "right":
            assert rounds[p["question"]] == 0
    kept_by_round = [r["kept"] for r in stats["rounds"]]
    still = [12, 12 - kept_by_round[0], 12 - sum(kept_by_round[:2])]
    assert [r["items"] for r in stats["rounds"]] == still
    assert 1 <= coins <= 4 and stats["samples_accepted"] < stats["samples"]


def test_exact_match_steps_judge_rejects_right_answers_from_wrong_work():
    from frontierlm.data.synthetic import exact_match_steps_judge

    item = SourceItem(1, "Mia has 2 apples. She buys 6 more. How many?", "2 + 6 = 8\n#### 8")
    replies = ["2 + 6 = 8\n#### 8", "2 + 6 = 13\n#### 8", "2 + 6 = 9\n#### 9", "#### 8"]
    verdicts = [j.verdict for j in exact_match_steps_judge(item, replies)]
    assert verdicts == [PASS, "wrong_calculation", "wrong_answer", PASS]
    assert [j.verdict for j in exact_match_judge(item, replies)] == [
        PASS, PASS, "wrong_answer", PASS
    ]  # fmt: skip
