"""The align stage: preference optimisation of the SFT model on chosen/rejected reply pairs with
the loss `align.loss_type` (posttrain/preference.py: DPO and its family against the frozen SFT
model, KTO on unpaired replies, ORPO and SimPO without a reference).

Reference log-probs (the SFT model's) are computed once for every example before training and
cached in the stage directory (`align.precompute_ref`); the reference model is then freed, so
training holds one model. KTO trains on unpaired data: every HH pair gives a desirable example
(prompt, chosen reply) and an undesirable one (prompt, rejected reply); its KL reference point
pairs each prompt with another example's reply (a fixed seeded rotation, as TRL fixes it when it
prepares the dataset).

Held-out metrics, on the held-out pairs, at every evaluation:
  rewards/chosen, rewards/rejected, rewards/margins, rewards/accuracies  the loss's own rewards
      as TRL logs them (beta x log-ratio to the SFT model; beta x average log-prob for ORPO/SimPO)
  kl                KTO's batch KL estimate (KTO only)
  ref_accuracy      share of pairs whose log-ratio to the SFT model is higher for the chosen
                    reply: DPO's implicit-reward accuracy, for every loss type alike
  logp_accuracy     share of pairs with log p(chosen) > log p(rejected), summed over the reply
  avg_logp_accuracy the same with per-token average log-probs
The SFT model's own logp_accuracy and avg_logp_accuracy (its ref_accuracy is undefined: every
margin is 0) are the baseline, reported as sft_logp_accuracy / sft_avg_logp_accuracy.
"""

from __future__ import annotations

import copy
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from frontierlm.atomic import atomic_file
from frontierlm.config import AlignConfig
from frontierlm.console import console, track
from frontierlm.posttrain.batches import fit_window, fixed_batches, pad_batch
from frontierlm.posttrain.chat_data import PreferencePair, load_pairs
from frontierlm.posttrain.preference import (
    REFERENCE_FREE,
    kto_loss,
    orpo_loss,
    pair_loss,
    simpo_loss,
)
from frontierlm.stages import StageContext
from frontierlm.tokenizer.chat import ChatRenderer, Message, RenderedChat
from frontierlm.tokenizer.shards import hash_fraction
from frontierlm.tokenizer.train import PAD, load_tokenizer
from frontierlm.train.checkpoint import load_model_dir
from frontierlm.train.loop import Batch, TrainTask, train
from frontierlm.train.losses import model_token_losses, sequence_logprobs
from frontierlm.train.parallel import autocast
from frontierlm.train.sampler import EpochSampler

Tensor = torch.Tensor


@dataclass
class AlignSplit:
    """Rendered examples of one split. Pairs: chosen[i] vs rejected[i]. KTO's unpaired examples
    are chosen + rejected (desirable, undesirable), with kl[j] the j-th one's KL completion."""

    chosen: list[RenderedChat]
    rejected: list[RenderedChat]
    kl: list[RenderedChat]

    def __len__(self) -> int:
        return len(self.chosen)

    @property
    def unpaired(self) -> list[RenderedChat]:
        return self.chosen + self.rejected


def split_pairs(
    cfg: AlignConfig, renderer: ChatRenderer, seed: int = 0
) -> tuple[AlignSplit, AlignSplit]:
    """(train, held-out) examples; held-out is a salted-hash share of the pairs, stable."""
    window = cfg.seq_len + 1
    splits: dict[bool, list[PreferencePair]] = {False: [], True: []}
    for source in cfg.sources:
        for pair in load_pairs(source):
            is_val = hash_fraction(pair.prompt[0].content + pair.chosen, "align-val")
            splits[is_val < cfg.val_fraction].append(pair)

    def render(prompt: list[Message], reply: str) -> RenderedChat:
        chat = renderer.render([*prompt, Message("assistant", reply)], last_turn_only=True)
        return fit_window(chat, window)

    def build(pairs: list[PreferencePair], salt: int) -> AlignSplit:
        rendered = [(p, render(p.prompt, p.chosen), render(p.prompt, p.rejected)) for p in pairs]
        rendered = [r for r in rendered if 1 in r[1].mask and 1 in r[2].mask]
        kept = [p for p, _, _ in rendered]
        split = AlignSplit([c for _, c, _ in rendered], [r for _, _, r in rendered], [])
        if cfg.loss_type == "kto":  # each prompt with the reply of the example before it
            prompts = [p.prompt for p in kept] * 2
            replies = [p.chosen for p in kept] + [p.rejected for p in kept]
            order = list(range(len(prompts)))
            random.Random(seed * 7919 + salt).shuffle(order)
            partner = {order[i]: order[i - 1] for i in range(len(order))}
            split.kl = [render(prompts[j], replies[partner[j]]) for j in range(len(prompts))]
        return split

    return build(splits[False], 0), build(splits[True], 1)


@torch.no_grad()
def sequence_stats(
    model: nn.Module, chats: list[RenderedChat], pad_id: int, batch_size: int, chunked: bool
) -> tuple[Tensor, Tensor]:
    """(summed reply log-probs, reply token counts) of each chat, float32 on the CPU."""
    device = next(model.parameters()).device
    logps, lengths = [], []
    for chunk in fixed_batches(chats, batch_size):
        batch = {k: v.to(device) for k, v in pad_batch(chunk, pad_id).items()}
        logps.append(
            sequence_logprobs(model_token_losses(model, batch, chunked), batch["loss_mask"])
        )
        lengths.append(batch["loss_mask"].sum(-1))
    return torch.cat(logps).float().cpu(), torch.cat(lengths).float().cpu()


def reference_logps(
    cfg: AlignConfig,
    reference: nn.Module,
    split: AlignSplit,
    pad_id: int,
    device,
    what: str,
    keep: dict[str, set[int]] | None = None,
) -> dict[str, Tensor]:
    """The reference model's summed log-probs of the examples of a split (of those in
    `keep[part]` when given; the others are NaN)."""
    out = {}
    parts = {"chosen": split.chosen, "rejected": split.rejected, "kl": split.kl}
    for name, chats in parts.items():
        if not chats:
            continue
        wanted = sorted(keep[name]) if keep is not None else list(range(len(chats)))
        values = torch.full((len(chats),), float("nan"))
        for chunk in track(fixed_batches(wanted, cfg.batch_size), f"reference {what} {name}"):
            rows = [chats[j] for j in chunk]
            with autocast(device, cfg.precision):
                logps, _ = sequence_stats(reference, rows, pad_id, len(rows), cfg.chunked_ce)
            values[list(chunk)] = logps
        out[name] = values
    return out


def visited_examples(cfg: AlignConfig, split: AlignSplit, seed: int) -> dict[str, set[int]]:
    """The training examples the run's batches use: its steps plus a margin of batches for
    steps thrown away (non-finite losses, spikes), by the same seeded sampler as training."""
    kto = cfg.loss_type == "kto"
    sampler = EpochSampler(2 * len(split) if kto else len(split), cfg.batch_size, seed)
    batches = (cfg.steps + REFERENCE_SPARE_STEPS) * cfg.grad_accum
    rows = {j for i in range(batches) for j in sampler(i)}
    if not kto:
        return {"chosen": rows, "rejected": rows}
    n = len(split)
    return {
        "chosen": {j for j in rows if j < n},
        "rejected": {j - n for j in rows if j >= n},
        "kl": rows,
    }


# Batches beyond `steps` whose reference log-probs are precomputed too: a skipped step moves
# the data on by one batch.
REFERENCE_SPARE_STEPS = 8


def cached_reference_logps(
    cfg: AlignConfig,
    reference: nn.Module,
    splits: dict[str, AlignSplit],
    pad_id: int,
    device,
    path: Path,
    keep: dict[str, dict[str, set[int]]],
) -> dict[str, dict[str, Tensor]]:
    """Reference log-probs of the splits (only of the examples in `keep[split]`, where given),
    computed once and kept in `path` (a resumed stage reads them back; the stage's
    fingerprint covers everything they depend on)."""
    if path.is_file():
        return torch.load(path)
    table = {
        name: reference_logps(cfg, reference, split, pad_id, device, name, keep.get(name))
        for name, split in splits.items()
    }
    with atomic_file(path) as f:
        torch.save(table, f)
    return table


def preference_loss(
    cfg: AlignConfig,
    logps: Tensor,
    lengths: Tensor,
    ref: Tensor | None,
    kl: tuple[Tensor, Tensor] | None = None,
    desirable: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The batch loss of `cfg.loss_type` and TRL's reward metrics. Pairs: `logps`, `lengths`
    and `ref` are (2B,), chosen rows first. KTO: (B,) unpaired examples with `desirable`, and
    `kl` = (policy, reference) log-probs of the KL completions."""
    beta, kind = cfg.beta, cfg.loss_type
    stats: dict[str, Tensor] = {}
    if kind == "kto":
        assert ref is not None and kl is not None and desirable is not None
        losses, chosen_r, rejected_r, z0 = kto_loss(
            logps, ref, desirable, *kl, beta, cfg.desirable_weight, cfg.undesirable_weight
        )
        stats["kl"] = z0
    else:
        half = logps.shape[0] // 2
        chosen, rejected = logps[:half], logps[half:]
        chosen_len, rejected_len = lengths[:half], lengths[half:]
        if kind == "orpo":
            avg_c, avg_r = chosen / chosen_len.clamp(min=1), rejected / rejected_len.clamp(min=1)
            nll = -chosen.sum() / chosen_len.sum().clamp(min=1)  # token mean, as TRL reduces it
            losses, chosen_r, rejected_r = orpo_loss(avg_c, avg_r, nll, beta)
            stats["nll_loss"] = nll.detach()
        elif kind == "simpo":
            avg_c, avg_r = chosen / chosen_len.clamp(min=1), rejected / rejected_len.clamp(min=1)
            losses, chosen_r, rejected_r = simpo_loss(
                avg_c, avg_r, beta, cfg.simpo_gamma, cfg.label_smoothing
            )
        else:
            assert ref is not None
            losses, chosen_r, rejected_r = pair_loss(
                kind, chosen, rejected, ref[:half], ref[half:], beta, cfg.label_smoothing,
                chosen_lengths=chosen_len, rejected_lengths=rejected_len,
            )  # fmt: skip
        stats["rewards/accuracies"] = (chosen_r > rejected_r).float().mean()
        stats["rewards/margins"] = (chosen_r - rejected_r).mean()
    stats["rewards/chosen"] = chosen_r.mean() if chosen_r.numel() else torch.zeros(())
    stats["rewards/rejected"] = rejected_r.mean() if rejected_r.numel() else torch.zeros(())
    if kind == "kto":  # TRL's KTO margin: the difference of the two means
        stats["rewards/margins"] = stats["rewards/chosen"] - stats["rewards/rejected"]
    return losses.mean(), stats


def pair_accuracies(
    chosen: Tensor, rejected: Tensor, lengths: tuple[Tensor, Tensor], ref: tuple[Tensor, Tensor]
) -> dict[str, float]:
    """The loss-independent held-out accuracies (see the module docstring)."""
    chosen_len, rejected_len = lengths
    return {
        "ref_accuracy": ((chosen - ref[0]) > (rejected - ref[1])).float().mean().item(),
        "logp_accuracy": (chosen > rejected).float().mean().item(),
        "avg_logp_accuracy": (chosen / chosen_len > rejected / rejected_len).float().mean().item(),
    }


def held_out_fn(cfg: AlignConfig, val: AlignSplit, ref: dict[str, Tensor], pad_id: int):
    """Held-out loss, the loss's reward metrics and the pair accuracies, over the whole split."""

    def evaluate(model: nn.Module) -> dict[str, float]:
        chunked = cfg.chunked_ce
        chosen, chosen_len = sequence_stats(model, val.chosen, pad_id, cfg.batch_size, chunked)
        rejected, rejected_len = sequence_stats(
            model, val.rejected, pad_id, cfg.batch_size, chunked
        )
        if cfg.loss_type == "kto":
            kl, _ = sequence_stats(model, val.kl, pad_id, cfg.batch_size, chunked)
            labels = torch.cat([torch.ones(len(val)), torch.zeros(len(val))]).bool()
            loss, stats = preference_loss(
                cfg,
                torch.cat([chosen, rejected]),
                torch.cat([chosen_len, rejected_len]),
                torch.cat([ref["chosen"], ref["rejected"]]),
                (kl, ref["kl"]),
                labels,
            )
            # The pairs' implicit-reward view, as the pair losses log it.
            margins = cfg.beta * ((chosen - ref["chosen"]) - (rejected - ref["rejected"]))
            stats["rewards/accuracies"] = (margins > 0).float().mean()
        else:
            loss, stats = preference_loss(
                cfg,
                torch.cat([chosen, rejected]),
                torch.cat([chosen_len, rejected_len]),
                torch.cat([ref["chosen"], ref["rejected"]]),
            )
        accuracies = pair_accuracies(
            chosen, rejected, (chosen_len, rejected_len), (ref["chosen"], ref["rejected"])
        )
        return {"loss": loss.item(), **{k: v.item() for k, v in stats.items()}, **accuracies}

    return evaluate


def align_task(
    cfg: AlignConfig,
    train_split: AlignSplit,
    val_split: AlignSplit,
    train_ref: dict[str, Tensor] | None,
    val_ref: dict[str, Tensor],
    reference: nn.Module | None,
    pad_id: int,
    seed: int,
) -> TrainTask:
    """Batches: pairs as chosen rows then rejected rows (one forward for both; under torchrun
    rank_rows' strided split keeps each pair on one process); KTO as unpaired rows plus their
    KL rows. Reference log-probs come from `train_ref` (precomputed) or else `reference`."""
    kto = cfg.loss_type == "kto"
    needs_ref = cfg.loss_type not in REFERENCE_FREE
    examples = train_split.unpaired if kto else train_split.chosen
    sampler = EpochSampler(len(examples), cfg.batch_size, seed)
    n_pairs = len(train_split)

    def batch(index: int) -> Batch:
        rows = sampler(index)
        if kto:
            out = pad_batch([examples[j] for j in rows], pad_id)
            kl = pad_batch([train_split.kl[j] for j in rows], pad_id)
            out |= {f"kl_{k}": v for k, v in kl.items()}
            out["desirable"] = torch.tensor([j < n_pairs for j in rows])
            if train_ref is not None:
                both = torch.cat([train_ref["chosen"], train_ref["rejected"]])
                out["ref_logps"] = both[rows]
                out["ref_kl_logps"] = train_ref["kl"][rows]
            return out
        out = pad_batch(
            [train_split.chosen[j] for j in rows] + [train_split.rejected[j] for j in rows], pad_id
        )
        if train_ref is not None and needs_ref:
            idx = torch.tensor(rows)
            out["ref_logps"] = torch.cat([train_ref["chosen"][idx], train_ref["rejected"][idx]])
        return out

    def reference_seq(batch: Batch, prefix: str = "") -> Tensor:
        sub = {k: batch[prefix + k] for k in ("input_ids", "targets", "loss_mask")}
        with torch.no_grad():
            losses = model_token_losses(reference, sub, cfg.chunked_ce)
        return sequence_logprobs(losses, sub["loss_mask"])

    def loss(model: nn.Module, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        if "ref_logps" in batch and batch["ref_logps"].isnan().any():
            raise RuntimeError(
                f"align: a batch past the {REFERENCE_SPARE_STEPS} spare steps whose reference "
                "log-probs were precomputed (many skipped steps); rerun with "
                "--align.precompute_ref=false"
            )
        mask = batch["loss_mask"]
        logps = sequence_logprobs(model_token_losses(model, batch, cfg.chunked_ce), mask)
        lengths = mask.sum(-1).float()
        ref_logps = None
        if needs_ref:
            ref_logps = batch["ref_logps"] if "ref_logps" in batch else reference_seq(batch)
        kl = desirable = None
        if kto:
            kl_sub = {k: batch["kl_" + k] for k in ("input_ids", "targets", "loss_mask")}
            with torch.no_grad():  # the KL point is a detached estimate: no gradient
                kl_policy = sequence_logprobs(
                    model_token_losses(model, kl_sub, cfg.chunked_ce), kl_sub["loss_mask"]
                )
            kl_ref = (
                batch["ref_kl_logps"] if "ref_kl_logps" in batch else reference_seq(batch, "kl_")
            )
            kl, desirable = (kl_policy, kl_ref), batch["desirable"]
        return preference_loss(cfg, logps, lengths, ref_logps, kl, desirable)

    return TrainTask(
        name="align",
        batch=batch,
        loss=loss,
        evaluate=held_out_fn(cfg, val_split, val_ref, pad_id),
    )


def run_align_stage(ctx: StageContext) -> dict[str, Any]:
    cfg = ctx.cfg.align
    tok = load_tokenizer(ctx.path("tokenizer"))
    pad_id = tok.token_to_id(PAD)
    train_split, val_split = split_pairs(cfg, ChatRenderer(tok), ctx.cfg.run.seed)
    if not len(val_split):
        raise ValueError("align: no held-out pairs; raise align.val_fraction or add pairs")
    if not len(train_split):
        raise ValueError("align: no training pairs; lower align.val_fraction or add pairs")
    console.print(
        f"  {cfg.loss_type}: {len(train_split):,} training pairs, {len(val_split):,} held out"
    )
    policy = load_model_dir(ctx.path("sft") / "model", ctx.device)
    reference = copy.deepcopy(policy).eval().requires_grad_(False)
    # The held-out metrics always need the SFT model's log-probs of the held-out pairs; the
    # training pairs' only when the loss uses a reference and they are precomputed.
    splits = {"val": val_split}
    if cfg.precompute_ref and cfg.loss_type not in REFERENCE_FREE:
        splits["train"] = train_split
    keep = {"train": visited_examples(cfg, train_split, ctx.cfg.run.seed)}
    ref = cached_reference_logps(
        cfg, reference, splits, pad_id, ctx.device, ctx.work_dir / "reference_logps.pt", keep
    )
    if cfg.precompute_ref or cfg.loss_type in REFERENCE_FREE:
        del reference  # training holds one model
        reference = None
    val_ref = ref["val"]
    sft = pair_accuracies(
        val_ref["chosen"],
        val_ref["rejected"],
        (sequence_lengths(val_split.chosen), sequence_lengths(val_split.rejected)),
        (val_ref["chosen"], val_ref["rejected"]),
    )
    console.print(
        f"  SFT model on held-out pairs: log-prob accuracy {sft['logp_accuracy']:.3f}, "
        f"per-token {sft['avg_logp_accuracy']:.3f}"
    )
    task = align_task(
        cfg, train_split, val_split, ref.get("train"), val_ref, reference, pad_id, ctx.cfg.run.seed
    )
    metrics = train(policy, cfg, task, ctx.work_dir, ctx.device, ctx.cfg.run)
    return {
        **metrics,
        "loss_type": cfg.loss_type,
        "sft_logp_accuracy": sft["logp_accuracy"],
        "sft_avg_logp_accuracy": sft["avg_logp_accuracy"],
        "train_pairs": len(train_split),
        "val_pairs": len(val_split),
    }


def sequence_lengths(chats: list[RenderedChat]) -> Tensor:
    """Reply tokens scored per chat (the loss mask shifted with the targets)."""
    return torch.tensor([float(sum(c.mask[1:])) for c in chats])


def compare_on_pairs(
    cfg: AlignConfig, policy: nn.Module, sft: nn.Module, val: AlignSplit, pad_id: int
) -> dict[str, float]:
    """The aligned model against the SFT model on held-out pairs: the mean implicit reward
    margin (beta x log-ratio difference) and the pair accuracies of both models."""
    args = (pad_id, cfg.batch_size, cfg.chunked_ce)
    chosen, chosen_len = sequence_stats(policy, val.chosen, *args)
    rejected, rejected_len = sequence_stats(policy, val.rejected, *args)
    ref_c, _ = sequence_stats(sft, val.chosen, *args)
    ref_r, _ = sequence_stats(sft, val.rejected, *args)
    lengths = (chosen_len, rejected_len)
    aligned = pair_accuracies(chosen, rejected, lengths, (ref_c, ref_r))
    base = pair_accuracies(ref_c, ref_r, lengths, (ref_c, ref_r))
    margin = cfg.beta * ((chosen - ref_c) - (rejected - ref_r))
    return {
        "margin": margin.mean().item(),
        **aligned,
        "sft_logp_accuracy": base["logp_accuracy"],
        "sft_avg_logp_accuracy": base["avg_logp_accuracy"],
    }
