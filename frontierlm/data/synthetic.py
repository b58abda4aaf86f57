"""Synthetic data: sample from a model, keep only what a verifier or reward accepts.

`frontierlm synth RECIPE` (the `synth` stage, `[synth]` table):

  verify    prompts -> `samples` replies each -> judged (GSM8K exact match against the reference,
            or the DPO implicit reward of the run's align model) -> the best accepted reply is
            kept as a question/answer chat; an item with none is sampled again, at most
            `max_regenerations` times (Kimi K2 allows 2 per source item)
  rephrase  passages -> the model rephrases each -> a reply is accepted when it keeps enough of
            the passage's words (`min_word_recall`) without copying it (`max_ngram_copy` of its
            word n-grams found verbatim) -> kept as a document

Accepted replies are deduplicated on normalised text (the data stage's `normalize`) against the
SFT sources and within the output; a duplicate gives way to the next-best accepted reply.
Every item ends kept or dropped with one reason, counted in `stats.json` as the data stage
counts its drops. The selection logic (`synthesize`) takes the sampler and the judge as plain
functions, so a scripted model tests it exactly.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from frontierlm.config import ChatSource, SynthConfig
from frontierlm.console import console, track
from frontierlm.data.dedup import normalize

PASS = "pass"
WORD = re.compile(r"\w+")


@dataclass
class SourceItem:
    line: int  # line of the source file, for the record's provenance
    prompt: str  # the user turn: a question, or the rephrasing instruction with the passage
    reference: str = ""  # verify: the reference answer; rephrase: the passage itself
    last_failure: str = "below_threshold"


@dataclass
class Judgement:
    score: float
    verdict: str  # PASS, or why the reply is rejected (e.g. below_threshold, copied)


@dataclass
class SynthResult:
    kept: list[dict[str, Any]] = field(default_factory=list)
    dropped: Counter = field(default_factory=Counter)
    samples: int = 0
    samples_accepted: int = 0
    rounds: list[dict[str, int]] = field(default_factory=list)


Sampler = Callable[[list[SourceItem], int], list[list[str]]]  # (items, round) -> replies each
Judge = Callable[[SourceItem, list[str]], list[Judgement]]
KeyFn = Callable[[SourceItem, str], bytes]


def text_key(*parts: str) -> bytes:
    """The dedup key of a chat or document: a digest of its normalised text."""
    return hashlib.blake2b(normalize("\n".join(parts)).encode("utf-8"), digest_size=16).digest()


def synthesize(
    items: Sequence[SourceItem],
    sample: Sampler,
    judge: Judge,
    key: KeyFn,
    existing: set[bytes],
    max_regenerations: int,
) -> SynthResult:
    """Round 0 samples every item; round r samples the items still without a kept reply. An
    item keeps its highest-scoring accepted reply that is new (first in sample order on ties)."""
    result = SynthResult()
    seen: set[bytes] = set()
    pending = list(items)
    for round_no in range(max_regenerations + 1):
        if not pending:
            break
        replies = sample(pending, round_no)
        if len(replies) != len(pending):
            raise RuntimeError(f"synth: sampler returned {len(replies)} lists for {len(pending)}")
        still: list[SourceItem] = []
        kept_before = len(result.kept)
        for item, texts in zip(pending, replies, strict=True):
            judgements = judge(item, texts)
            result.samples += len(texts)
            accepted = [j for j, v in enumerate(judgements) if v.verdict == PASS]
            result.samples_accepted += len(accepted)
            accepted.sort(key=lambda j: -judgements[j].score)  # stable: ties keep sample order
            failure = None
            for j in accepted:
                digest = key(item, texts[j])
                if digest in existing or digest in seen:
                    failure = failure or (
                        "duplicate_of_existing" if digest in existing else "duplicate_in_output"
                    )
                    continue
                seen.add(digest)
                result.kept.append(
                    {
                        "item": item,
                        "reply": texts[j],
                        "score": judgements[j].score,
                        "round": round_no,
                    }
                )
                break
            else:
                if failure is None:  # nothing accepted: the best reply's reason
                    best = max(range(len(texts)), key=lambda j: judgements[j].score, default=None)
                    failure = judgements[best].verdict if best is not None else "no_samples"
                item.last_failure = failure
                still.append(item)
        result.rounds.append(
            {"round": round_no, "items": len(pending), "kept": len(result.kept) - kept_before}
        )
        pending = still
    for item in pending:
        result.dropped[item.last_failure] += 1
    return result


# ----------------------------------------------------------------------------- judges


def exact_match_judge(item: SourceItem, texts: list[str]) -> list[Judgement]:
    """1 when the reply's `#### N` answer equals the reference's (strict: a kept reply shows
    the answer format SFT should teach), else 0."""
    from frontierlm.posttrain.rewards import exact_match

    out = []
    for text in texts:
        ok = exact_match(text, item.reference)
        out.append(Judgement(float(ok), PASS if ok else "wrong_answer"))
    return out


def exact_match_steps_judge(item: SourceItem, texts: list[str]) -> list[Judgement]:
    """exact_match, and every calculation the reply writes (`7 + 5 = 12`) is right: a right
    answer reached through wrong work is rejected (`wrong_calculation`), so SFT on the kept
    replies does not learn the wrong work (STaR's right-answer-wrong-reasoning failure)."""
    from frontierlm.posttrain.rewards import wrong_calculations

    out = []
    for text, judged in zip(texts, exact_match_judge(item, texts), strict=True):
        if judged.verdict == PASS and wrong_calculations(text):
            judged = Judgement(0.0, "wrong_calculation")
        out.append(judged)
    return out


def words(text: str) -> list[str]:
    """Lower-case word tokens, punctuation dropped."""
    return WORD.findall(normalize(text))


def fidelity(passage: str, reply: str, n: int) -> tuple[float, float]:
    """(share of the passage's distinct words the reply keeps, share of the reply's word
    n-grams found verbatim in the passage)."""
    source, rephrased = words(passage), words(reply)
    recall = len(set(source) & set(rephrased)) / max(len(set(source)), 1)
    grams = lambda ws: {tuple(ws[i : i + n]) for i in range(len(ws) - n + 1)}  # noqa: E731
    reply_grams = grams(rephrased)
    copy = len(reply_grams & grams(source)) / len(reply_grams) if reply_grams else 0.0
    return recall, copy


def rephrase_judge(cfg: SynthConfig) -> Judge:
    def judge(item: SourceItem, texts: list[str]) -> list[Judgement]:
        out = []
        for text in texts:
            recall, copy = fidelity(item.reference, text, cfg.copy_ngram)
            if len(words(text)) < cfg.copy_ngram:
                out.append(Judgement(0.0, "too_short"))
            elif copy > cfg.max_ngram_copy:
                out.append(Judgement(recall, "copied"))
            elif recall < cfg.min_word_recall:
                out.append(Judgement(recall, "unfaithful"))
            else:
                out.append(Judgement(recall, PASS))
        return out

    return judge


def dpo_reward_judge(policy, reference, beta: float, renderer, threshold: float) -> Judge:
    """The DPO implicit reward beta * (log p_policy(reply) - log p_reference(reply)) of the
    reply after the chat-rendered prompt: the align stage's reward model, no extra training."""
    from frontierlm.eval.loglik import score_continuations

    def judge(item: SourceItem, texts: list[str]) -> list[Judgement]:
        from frontierlm.tokenizer.chat import Message

        context = renderer.render([Message("user", item.prompt)], add_generation_prompt=True).ids
        requests = [(context, [*renderer.encode_text(t), renderer.end]) for t in texts]
        policy_lp = score_continuations(policy, requests)
        reference_lp = score_continuations(reference, requests)
        out = []
        for p, r in zip(policy_lp, reference_lp, strict=True):
            reward = beta * (p.logprob - r.logprob)
            out.append(Judgement(reward, PASS if reward >= threshold else "below_threshold"))
        return out

    return judge


# ----------------------------------------------------------------------------- the stage


def read_source(cfg: SynthConfig) -> tuple[list[SourceItem], Counter]:
    """The source's items inside `take`, and malformed records counted by reason (each
    reported with its file and line, as the data stage reports them)."""
    from frontierlm.eval.tasks import open_text
    from frontierlm.tokenizer.shards import hash_fraction

    path = Path(cfg.source)
    if not path.is_file():
        raise FileNotFoundError(f"synth.source {path} does not exist")
    malformed: Counter = Counter()
    items: list[SourceItem] = []
    lo, hi = cfg.take
    needed = (cfg.prompt_field, cfg.reference_field) if cfg.mode == "verify" else (cfg.text_field,)
    with open_text(path) as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip() or not lo <= hash_fraction(line.strip()) < hi:
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                malformed["malformed_json"] += 1
                console.print(f"[yellow]{path}:{line_no}: skipped, not JSON")
                continue
            missing = [k for k in needed if not isinstance(record, dict) or k not in record]
            if missing:
                malformed["missing_field"] += 1
                console.print(f"[yellow]{path}:{line_no}: skipped, no field {missing[0]!r}")
                continue
            if cfg.mode == "verify":
                prompt = str(record[cfg.prompt_field]).strip()
                items.append(SourceItem(line_no, prompt, str(record[cfg.reference_field])))
            else:
                passage = str(record[cfg.text_field]).strip()
                prompt = cfg.rephrase_prompt.replace("{text}", passage)
                items.append(SourceItem(line_no, prompt, passage))
            if cfg.max_items and len(items) >= cfg.max_items:
                break
    return items, malformed


def existing_keys(sources: list[ChatSource]) -> set[bytes]:
    """Dedup keys of every chat in the SFT sources."""
    from frontierlm.posttrain.chat_data import load_conversations

    return {text_key(*(m.content for m in chat)) for s in sources for chat in load_conversations(s)}


def model_sampler(model, tok, cfg: SynthConfig, seed: int) -> Sampler:
    """Chat-rendered prompts, `cfg.samples` replies each through the shared `generate`, a new
    seed every round and batch so regenerations draw new replies."""
    from frontierlm.eval.exact_match import stop_ids
    from frontierlm.inference.engine import generate
    from frontierlm.inference.sampling import SamplingParams
    from frontierlm.tokenizer.chat import ChatRenderer, Message

    renderer = ChatRenderer(tok)

    def sample(items: list[SourceItem], round_no: int) -> list[list[str]]:
        out: list[list[str]] = []
        batches = range(0, len(items), cfg.batch_items)
        for b in track(batches, f"synth round {round_no}", total=len(batches)):
            chunk = items[b : b + cfg.batch_items]
            prompts = [
                renderer.render([Message("user", it.prompt)], add_generation_prompt=True).ids
                for it in chunk
                for _ in range(cfg.samples)
            ]
            params = SamplingParams(
                max_new_tokens=cfg.max_new_tokens,
                temperature=cfg.temperature,
                top_p=cfg.top_p,
                stop_ids=stop_ids(tok),
                seed=seed + 1_000_003 * round_no + b,
            )
            texts = [tok.decode(c.ids).strip() for c in generate(model, prompts, params)]
            out += [texts[i : i + cfg.samples] for i in range(0, len(texts), cfg.samples)]
        return out

    return sample


def output_record(cfg: SynthConfig, kept: dict[str, Any], index: int) -> dict[str, Any]:
    item: SourceItem = kept["item"]
    meta = {"source": cfg.source, "line": item.line, "score": kept["score"], "round": kept["round"]}
    if cfg.mode == "verify":  # sft's "qa" chat format: question -> user, answer -> assistant
        return {"question": item.prompt, "answer": kept["reply"], "meta": meta}
    return {"id": f"synth-rephrase-{index}", "text": kept["reply"], "meta": meta}


def run_synth_stage(ctx) -> dict[str, Any]:
    from frontierlm.atomic import atomic_file
    from frontierlm.tokenizer.chat import ChatRenderer
    from frontierlm.tokenizer.train import load_tokenizer
    from frontierlm.train.checkpoint import load_model_dir
    from frontierlm.train.parallel import autocast

    cfg: SynthConfig = ctx.cfg.synth
    tok = load_tokenizer(ctx.path("tokenizer"))
    model = load_model_dir(ctx.path(cfg.model) / "model", ctx.device).eval()
    items, malformed = read_source(cfg)
    console.print(f"  {len(items):,} source items from {cfg.source} ({cfg.mode})")
    existing = existing_keys(ctx.cfg.sft.sources) if cfg.dedup_against_sft else set()
    if cfg.mode == "rephrase":
        judge = rephrase_judge(cfg)
        key: KeyFn = lambda item, reply: text_key(reply)  # noqa: E731
    elif cfg.scorer in ("exact_match", "exact_match_steps"):
        judge = exact_match_judge if cfg.scorer == "exact_match" else exact_match_steps_judge
        key = lambda item, reply: text_key(item.prompt, reply)  # noqa: E731
    else:
        reference = load_model_dir(ctx.path("sft") / "model", ctx.device).eval()
        policy = load_model_dir(ctx.path("align") / "model", ctx.device).eval()
        judge = dpo_reward_judge(
            policy, reference, ctx.cfg.align.beta, ChatRenderer(tok), cfg.threshold
        )
        key = lambda item, reply: text_key(item.prompt, reply)  # noqa: E731
    sampler = model_sampler(model, tok, cfg, ctx.cfg.run.seed)
    with torch.no_grad(), autocast(ctx.device, ctx.cfg.sft.precision):
        result = synthesize(items, sampler, judge, key, existing, cfg.max_regenerations)
    with atomic_file(ctx.work_dir / "synth.jsonl") as f:
        for i, kept in enumerate(result.kept):
            f.write((json.dumps(output_record(cfg, kept, i), ensure_ascii=False) + "\n").encode())
    dropped = dict(result.dropped + malformed)
    stats = {
        "mode": cfg.mode,
        "scorer": cfg.scorer if cfg.mode == "verify" else "fidelity",
        "model": cfg.model,
        "items": len(items),
        "kept": len(result.kept),
        "dropped": dict(sorted(dropped.items(), key=lambda kv: -kv[1])),
        "acceptance_rate": len(result.kept) / max(len(items), 1),
        "samples": result.samples,
        "samples_accepted": result.samples_accepted,
        "rounds": result.rounds,
    }
    (ctx.work_dir / "stats.json").write_text(json.dumps(stats, indent=2))
    print_stats(stats)
    return {k: v for k, v in stats.items() if k != "rounds"}


def print_stats(stats: dict[str, Any]) -> None:
    from rich.table import Table

    table = Table(title=f"synth ({stats['mode']}, {stats['scorer']})")
    for col in ("round", "items sampled", "kept"):
        table.add_column(col, justify="right")
    for r in stats["rounds"]:
        table.add_row(str(r["round"]), f"{r['items']:,}", f"{r['kept']:,}")
    console.print(table)
    reasons = ", ".join(f"{k} {v:,}" for k, v in stats["dropped"].items()) or "none"
    console.print(
        f"  kept {stats['kept']:,} of {stats['items']:,} items "
        f"({100 * stats['acceptance_rate']:.1f}%); dropped: {reasons}; "
        f"{stats['samples_accepted']:,} of {stats['samples']:,} samples accepted"
    )
