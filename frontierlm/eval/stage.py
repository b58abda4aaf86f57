"""The eval stage: score every model of the run on the same held-out data, and sample from each.

text bpb    held-out pretraining documents (tokenize stage's val split)
chat bpb    assistant tokens of held-out SFT chats
preference  on held-out preference pairs: the aligned model's mean implicit reward margin and
            accuracy (SFT model as reference), and both models' log-prob accuracy
tasks       `eval.tasks` (frontierlm/eval/tasks.py): one `<task>.json` per task with every
            model's metrics and per-item records; the metrics also go into results.json
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import torch

from frontierlm.console import console, track
from frontierlm.eval.bpb import UnigramLM, bits_per_byte, sequential_windows
from frontierlm.eval.harness import run_task
from frontierlm.eval.tasks import load_spec
from frontierlm.inference.engine import generate
from frontierlm.inference.sampling import SamplingParams
from frontierlm.posttrain.align import compare_on_pairs, split_pairs
from frontierlm.posttrain.batches import fixed_batches, pad_batch
from frontierlm.posttrain.sft import sft_examples
from frontierlm.stages import StageContext
from frontierlm.tokenizer.chat import ChatRenderer, Message
from frontierlm.tokenizer.shards import TokenSplit
from frontierlm.tokenizer.train import BOS, END, EOS, PAD, load_tokenizer, token_byte_lengths
from frontierlm.train.checkpoint import load_model_dir
from frontierlm.train.parallel import autocast

MODEL_STAGES = ("pretrain", "sft", "align")


def run_eval_stage(ctx: StageContext) -> dict[str, Any]:
    # Scored in the precision the models were trained in (bf16 autocast where that was asked).
    with torch.no_grad(), autocast(ctx.device, ctx.cfg.pretrain.precision):
        return evaluate_models(ctx)


def evaluate_models(ctx: StageContext) -> dict[str, Any]:
    cfg, device = ctx.cfg, ctx.device
    tok = load_tokenizer(ctx.path("tokenizer"))
    renderer = ChatRenderer(tok)
    pad_id = tok.token_to_id(PAD)
    byte_lengths = torch.tensor(token_byte_lengths(tok))
    val_tokens = TokenSplit.open(ctx.path("tokenize"), "val").tokens
    seq_len, batch_size = cfg.pretrain.seq_len, cfg.pretrain.batch_size
    _, val_chats = sft_examples(cfg.sft, renderer)
    chat_batches = [pad_batch(c, pad_id) for c in fixed_batches(val_chats, cfg.sft.batch_size)]
    _, val_pairs = split_pairs(cfg.align, renderer, cfg.run.seed)
    models = {
        name: load_model_dir(ctx.path(name) / "model", device).eval() for name in MODEL_STAGES
    }
    stop = tuple(tok.token_to_id(t) for t in (END, EOS, BOS))
    greedy = SamplingParams(max_new_tokens=cfg.eval.max_new_tokens, temperature=0, stop_ids=stop)

    bos_id = tok.token_to_id(BOS) if cfg.pretrain.document_mask else None

    def text_windows():  # the same held-out windows for every model
        return sequential_windows(val_tokens, seq_len, batch_size, cfg.eval.bpb_batches, bos_id)

    unigram = UnigramLM(np.load(ctx.path("tokenize") / "unigram.npy")).to(device)
    results: dict[str, Any] = {
        "unigram_text_bpb": bits_per_byte(unigram, text_windows(), byte_lengths, device)["bpb"]
    }
    samples: list[str] = ["# Greedy samples\n"]
    for name, model in track(models.items(), "eval models", total=len(models)):
        text = bits_per_byte(model, text_windows(), byte_lengths, device)
        chat = bits_per_byte(model, chat_batches, byte_lengths, device)
        results[f"{name}_text_bpb"] = text["bpb"]
        results[f"{name}_chat_bpb"] = chat["bpb"]
        console.print(f"  {name:<9} text bpb {text['bpb']:.4f}   chat bpb {chat['bpb']:.4f}")
        samples.append(f"\n## {name}\n")
        prompts = [
            [tok.token_to_id(BOS), *tok.encode(p, add_special_tokens=False).ids]
            for p in cfg.eval.prompts
        ]
        chats = [
            renderer.render([Message("user", p)], add_generation_prompt=True).ids
            for p in cfg.eval.chat_prompts
        ]
        outs = [tok.decode(c.ids) for c in generate(model, prompts + chats, greedy)]
        for prompt, out in zip(cfg.eval.prompts, outs, strict=False):
            samples.append(f"- **{prompt}**{out}\n")
        for prompt, out in zip(cfg.eval.chat_prompts, outs[len(prompts) :], strict=True):
            samples.append(f"- user: {prompt}\n  assistant: {out}\n")

    pref = compare_on_pairs(cfg.align, models["align"], models["sft"], val_pairs, pad_id)
    results["align_val_margin"] = pref["margin"]
    results["align_val_accuracy"] = pref["ref_accuracy"]
    results["align_val_logp_accuracy"] = pref["logp_accuracy"]
    results["sft_val_logp_accuracy"] = pref["sft_logp_accuracy"]
    results["val_pairs"] = len(val_pairs)
    console.print(
        f"  align     held-out implicit reward margin {pref['margin']:+.4f}, accuracy "
        f"{pref['ref_accuracy']:.3f}; log-prob accuracy {pref['logp_accuracy']:.3f} "
        f"(SFT model {pref['sft_logp_accuracy']:.3f})"
    )
    if cfg.eval.tasks:
        results["tasks"] = run_tasks(ctx, tok, models)
    (ctx.work_dir / "results.json").write_text(json.dumps(results, indent=2))
    (ctx.work_dir / "samples.md").write_text("".join(samples))
    return results


def run_tasks(ctx: StageContext, tok, models: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Every `eval.tasks` task on every `eval.task_models` model: `<task>.json` per task,
    {task: {model: metrics}} returned for results.json."""
    cfg = ctx.cfg.eval
    summary: dict[str, dict[str, Any]] = {}
    for task in cfg.tasks:
        spec = load_spec(task)
        limit = cfg.task_limits.get(spec.name, cfg.task_limit)
        per_model = {}
        for name in track(cfg.task_models, f"task {spec.name}", total=len(cfg.task_models)):
            result = run_task(
                spec, models[name], tok, limit, cfg.task_batch_size, seed=ctx.cfg.run.seed
            )
            per_model[name] = result
            shown = "  ".join(f"{k} {v:.4f}" for k, v in result["metrics"].items())
            console.print(f"  {spec.name:<12} {name:<9} n={result['n']:<5} {shown}")
        record = {"task": spec.name, "kind": spec.kind, "spec": spec.model_dump(), **per_model}
        (ctx.work_dir / f"{spec.name}.json").write_text(json.dumps(record, indent=1))
        summary[spec.name] = {
            name: {"n": r["n"], "seconds": r["seconds"], **r["metrics"]}
            for name, r in per_model.items()
        }
    return summary
