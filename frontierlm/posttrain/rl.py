"""The rl stage: GRPO (and Dr. GRPO, DAPO, BNPO aggregations) or PPO on the one training loop.

How RL fits `TrainTask` (train/loop.py): the task's `batch(index)` is where rollouts happen.
At the first micro-step of a rollout batch it samples `num_generations` completions for each
of `batch_size * grad_accum / num_generations` prompts with `inference.engine.generate` from the
policy as it is now (the loop asks for batches synchronously: `rl.prefetch` is 0), scores them
with the configured reward functions, and turns them into tensors: token ids, the completion
mask, advantages, and (when needed) the rollout policy's and the reference's per-token
log-probs. That batch serves `num_iterations` optimizer steps (several PPO-style passes, the
ratio then moving away from 1 and the clipping acting), split in `grad_accum` micro-batches of
whole groups. `loss` is the clipped surrogate of rl_losses.py.

Sampling is seeded by (run seed, rollout number), so a resumed run samples what the
uninterrupted run would have, given the same policy; a run killed in the middle of a rollout
batch's `num_iterations` steps resamples that batch from the policy it resumes with. The
reference model (needed only when `beta` > 0) is the initial model, or, with `ref_sync_every`
N, the policy as it was at the last multiple of N steps (DeepSeek-R1-Zero's refresh); each
refreshed reference is written under `reference/` so a resumed run finds it.
"""

from __future__ import annotations

import copy
import gzip
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from frontierlm.config import RLConfig
from frontierlm.console import console
from frontierlm.inference.engine import Completion, generate
from frontierlm.inference.sampling import SamplingParams
from frontierlm.model import Transformer
from frontierlm.posttrain import arithmetic
from frontierlm.posttrain.rewards import RewardFn, exact_match, reward_function
from frontierlm.posttrain.rl_losses import (
    clipped_policy_loss,
    clipped_value_loss,
    gae,
    group_advantages,
    informative_groups,
    overlong_penalty,
    token_entropy,
    whiten,
)
from frontierlm.tokenizer.chat import ChatRenderer, Message
from frontierlm.tokenizer.train import PAD
from frontierlm.train.checkpoint import load_model_dir, save_model_dir
from frontierlm.train.loop import Batch, TrainTask, train
from frontierlm.train.losses import token_cross_entropy
from frontierlm.train.parallel import world
from frontierlm.train.sampler import EpochSampler


@dataclass(frozen=True)
class Prompt:
    question: str
    reference: str  # "#### 42" or a GSM8K worked answer ending in one


# ----------------------------------------------------------------------------- prompts


class PromptSource:
    """Training prompts as a pure function of their position, and a fixed held-out set."""

    def __init__(self, cfg: RLConfig, seed: int) -> None:
        task = cfg.task
        self.kind = task.kind
        if task.kind == "arithmetic":
            a = task.arithmetic
            self.difficulty = arithmetic.Difficulty(a.digits, a.operators, a.terms)
            self.seed = a.seed
            held_out = arithmetic.problems(self.difficulty, a.seed + 1, task.eval_prompts)
            self.eval = [Prompt(p.question, p.answer) for p in held_out]
        else:
            train_path = Path(task.gsm8k_path)
            self.train = _read_qa(train_path, task.gsm8k_max_prompts)
            self.sampler = EpochSampler(len(self.train), 1, seed)
            test_path = train_path.with_name(train_path.name.replace("train", "test"))
            if test_path == train_path or not test_path.is_file():
                raise FileNotFoundError(
                    f"rl.task.gsm8k_path={train_path}: the held-out prompts are read from "
                    f"{test_path} (the name with 'train' -> 'test'), which does not exist"
                )
            self.eval = _read_qa(test_path, task.eval_prompts)

    def keep_fitting(self, fits: Callable[[Prompt], bool]) -> int:
        """Drop the GSM8K prompts that leave no room for the completion; return how many."""
        if self.kind == "arithmetic":
            return 0
        before = len(self.train) + len(self.eval)
        self.train = [p for p in self.train if fits(p)]
        self.eval = [p for p in self.eval if fits(p)]
        if not self.train or not self.eval:
            raise ValueError("rl.task: no GSM8K prompt fits model.max_seq_len - max_new_tokens")
        self.sampler = EpochSampler(len(self.train), 1, self.sampler.seed)
        return before - len(self.train) - len(self.eval)

    def __call__(self, position: int) -> Prompt:
        if self.kind == "arithmetic":
            p = arithmetic.make_problem(self.difficulty, self.seed, position)
            return Prompt(p.question, p.answer)
        return self.train[self.sampler.example(position)]


def _read_qa(path: Path, limit: int | None) -> list[Prompt]:
    if not path.is_file():
        raise FileNotFoundError(f"rl.task: prompt file {path} does not exist")
    opener = gzip.open if path.suffix == ".gz" else open
    prompts = []
    with opener(path, "rt", encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                prompts.append(Prompt(str(record["question"]), str(record["answer"])))
            except (ValueError, KeyError) as err:
                raise ValueError(f"{path}:{line_no}: needs question and answer: {err!r}") from None
            if limit and len(prompts) >= limit:
                break
    return prompts


# ----------------------------------------------------------------------------- rollouts


@dataclass
class Rollout:
    """One rollout batch: tensors for the loss (rows of whole groups) and its statistics."""

    tensors: Batch
    stats: dict[str, float] = field(default_factory=dict)
    samples: list[tuple[str, str, float]] = field(default_factory=list)


class Rollouts:
    """Samples, scores and tensorises rollout batches (see the module docstring)."""

    def __init__(
        self,
        cfg: RLConfig,
        policy: Transformer,
        reference: Transformer | None,
        renderer: ChatRenderer,
        prompts: PromptSource,
        rewards: dict[str, tuple[RewardFn, float]],
        seed: int,
    ) -> None:
        self.cfg, self.policy, self.reference = cfg, policy, reference
        self.renderer, self.prompts, self.rewards, self.seed = renderer, prompts, rewards, seed
        self.end_id = renderer.end
        self.pad_id = renderer.tok.token_to_id(PAD)
        self.n_prompts = cfg.batch_size * cfg.grad_accum // cfg.num_generations
        self.params = SamplingParams(
            max_new_tokens=cfg.max_new_tokens,
            temperature=cfg.temperature,
            top_p=cfg.top_p,
            stop_ids=(self.end_id,),
        )

    def prompt_ids(self, prompt: Prompt) -> list[int]:
        return self.renderer.render([Message("user", prompt.question)], True).ids

    def score(self, prompts: Sequence[Prompt], texts: Sequence[str]) -> torch.Tensor:
        questions = [p.question for p in prompts]
        references = [p.reference for p in prompts]
        total = torch.zeros(len(texts), dtype=torch.float64)
        for fn, weight in self.rewards.values():
            total += weight * torch.tensor(fn(questions, texts, references), dtype=torch.float64)
        return total

    def sample(self, prompts: Sequence[Prompt], seed: int) -> list[Completion]:
        g = self.cfg.num_generations
        ids = [self.prompt_ids(p) for p in prompts for _ in range(g)]
        limit = self.policy.cfg.max_seq_len - self.cfg.max_new_tokens
        if too_long := [len(i) for i in ids if len(i) > limit]:
            raise ValueError(
                f"rl: a prompt of {max(too_long)} tokens leaves no room for max_new_tokens="
                f"{self.cfg.max_new_tokens} in model.max_seq_len="
                f"{self.policy.cfg.max_seq_len}; lower rl.max_new_tokens"
            )
        params = replace(self.params, seed=seed)
        return generate(self.policy, ids, params)

    def build(self, rollout_id: int) -> Rollout:
        cfg, g = self.cfg, self.cfg.num_generations
        rounds = 1 + (cfg.max_refills if cfg.dynamic_sampling else 0)
        kept: list[tuple[list[Prompt], list[Completion], torch.Tensor, bool]] = []
        spare: list[tuple[list[Prompt], list[Completion], torch.Tensor, bool]] = []
        first_round: dict[str, float] = {}
        samples: list[tuple[str, str, float]] = []
        for round_ in range(rounds):
            start = (rollout_id * rounds + round_) * self.n_prompts
            prompts = [self.prompts(start + j) for j in range(self.n_prompts)]
            completions = self.sample(prompts, seed=self.seed * 1_000_003 + start)
            group_prompts = [p for p in prompts for _ in range(g)]
            texts = [self.renderer.tok.decode(c.ids) for c in completions]
            task_rewards = self.score(group_prompts, texts)
            lengths = torch.tensor([len(c.ids) + (c.finish_reason == "stop") for c in completions])
            shaped = (
                task_rewards
                + overlong_penalty(lengths, cfg.max_new_tokens, cfg.overlong_buffer).double()
            )
            shaped -= cfg.length_penalty * lengths.double() / cfg.max_new_tokens
            if round_ == 0:
                correct = [
                    exact_match(t, p.reference) for t, p in zip(texts, group_prompts, strict=True)
                ]
                first_round = {
                    "reward_mean": task_rewards.mean().item(),
                    "reward_std": task_rewards.std().item(),
                    "accuracy": sum(correct) / len(correct),
                    "response_length": lengths.float().mean().item(),
                    "truncated": sum(c.finish_reason == "length" for c in completions)
                    / len(completions),
                }
                samples = [
                    (p.question, t, r)
                    for p, t, r in zip(
                        group_prompts[:g], texts[:g], shaped[:g].tolist(), strict=True
                    )
                ]
            useful = (
                informative_groups(shaped, g)
                if cfg.dynamic_sampling
                else torch.ones(self.n_prompts, dtype=torch.bool)
            )
            for j in range(self.n_prompts):
                rows = slice(j * g, (j + 1) * g)
                group = ([prompts[j]] * g, completions[rows], shaped[rows], bool(useful[j]))
                (kept if useful[j] else spare).append(group)
            if len(kept) >= self.n_prompts:
                break
        groups = kept[: self.n_prompts]
        # Too few informative groups even after the refills: fill up with uninformative ones
        # whose tokens are masked out, so every step has the same shape.
        groups += spare[: self.n_prompts - len(groups)]
        first_round["kept_groups"] = sum(k for *_, k in groups) / self.n_prompts
        first_round["sampling_rounds"] = float(round_ + 1)
        tensors = self.tensorise(groups)
        return Rollout(tensors, first_round, samples)

    def tensorise(self, groups) -> Batch:
        cfg, g = self.cfg, self.cfg.num_generations
        rows, masks, rewards, truncated = [], [], [], []
        for prompts, completions, shaped, useful in groups:
            for prompt, completion in zip(prompts, completions, strict=True):
                prompt_ids = self.prompt_ids(prompt)
                reply = completion.ids + (
                    [self.end_id] if completion.finish_reason == "stop" else []
                )
                rows.append(prompt_ids + reply)
                learn = useful and not (cfg.mask_truncated and completion.finish_reason == "length")
                # mask over targets: position t predicts token t + 1
                masks.append([0] * (len(prompt_ids) - 1) + [int(learn)] * len(reply))
                truncated.append(completion.finish_reason == "length")
            rewards.append(shaped)
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width - 1), dtype=torch.long)
        for i, (r, m) in enumerate(zip(rows, masks, strict=True)):
            ids[i, : len(r)] = torch.tensor(r)
            mask[i, : len(m)] = torch.tensor(m)
        reward = torch.cat(rewards).float()
        batch: Batch = {"input_ids": ids[:, :-1], "targets": ids[:, 1:], "mask": mask}
        batch["rewards"] = reward
        batch["num_items"] = mask.sum().float().expand(len(rows)).clone()
        need_old = cfg.num_iterations > 1 or cfg.algorithm == "ppo"
        if need_old:
            batch["old_logps"], old_values = self.forward_logps(self.policy, batch)
        if self.reference is not None:
            batch["ref_logps"], _ = self.forward_logps(self.reference, batch)
        if cfg.algorithm == "grpo":
            batch["advantages"] = group_advantages(reward, g, cfg.advantage_scale).float()
        else:
            # PPO: the score at the last completion token, a k1 KL penalty at every token.
            token_rewards = torch.zeros(mask.shape)
            if self.reference is not None:
                token_rewards -= cfg.beta * (batch["old_logps"] - batch["ref_logps"])
            last = mask.shape[1] - 1 - mask.flip(1).argmax(1)
            has = mask.sum(1) > 0
            token_rewards[has, last[has]] += reward[has]
            token_rewards *= mask
            advantages, returns = gae(token_rewards, old_values, mask, cfg.gamma, cfg.lam)
            batch["advantages"] = whiten(advantages, mask)
            batch["returns"], batch["old_values"] = returns, old_values * mask
        return batch

    @torch.no_grad()
    def forward_logps(self, model: Transformer, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token log-probs (and the value head's values, when the model has one) of the
        batch's targets, in chunks of `batch_size` rows."""
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        logps, values = [], []
        for start in range(0, len(batch["input_ids"]), self.cfg.batch_size):
            ids = batch["input_ids"][start : start + self.cfg.batch_size].to(device)
            targets = batch["targets"][start : start + self.cfg.batch_size].to(device)
            logps.append(-token_cross_entropy(model(ids), targets).cpu())
            if hasattr(model, "value_head"):
                values.append(model.value_head(model.final_hidden).squeeze(-1).float().cpu())
        model.train(was_training)
        value = torch.cat(values) if values else torch.zeros(0)
        return torch.cat(logps), value


# ----------------------------------------------------------------------------- the task


class RLTask:
    """Rollout batches by loop index, the loss, the evaluation and the reference refresh."""

    def __init__(
        self,
        cfg: RLConfig,
        policy: Transformer,
        rollouts: Rollouts,
        work_dir: Path,
        initial: Path | None,
    ) -> None:
        self.cfg, self.policy, self.rollouts, self.work_dir = cfg, policy, rollouts, work_dir
        self.initial = initial  # the initial model's directory (step-0 reference)
        self.current: tuple[int, Rollout] | None = None
        self.ref_step = 0
        self.sample_log = work_dir / "samples.jsonl"

    # ---- the reference
    def _sync_reference(self, step: int) -> None:
        reference, every = self.rollouts.reference, self.cfg.ref_sync_every
        if reference is None or not every:
            return
        wanted = step // every * every
        if wanted == self.ref_step:
            return
        saved = self.work_dir / "reference" / f"step_{wanted:06d}"
        if wanted == step:  # a refresh point: the policy now is the new reference
            reference.load_state_dict(self.policy.state_dict(), strict=False)  # no value head
            save_model_dir(saved, reference)
        elif saved.is_dir():  # resuming after a refresh
            reference.load_state_dict(load_model_dir(saved).state_dict())
        elif wanted == 0 and self.initial is not None:
            reference.load_state_dict(load_model_dir(self.initial).state_dict())
        else:
            raise RuntimeError(f"rl: resuming at step {step} needs the reference {saved}")
        self.ref_step = wanted

    # ---- TrainTask.batch
    def batch(self, index: int) -> Batch:
        cfg = self.cfg
        step, micro = divmod(index, cfg.grad_accum)
        rollout_id = step // cfg.num_iterations
        if self.current is None or self.current[0] != rollout_id:
            self._sync_reference(step)
            rollout = self.rollouts.build(rollout_id)
            self.current = (rollout_id, rollout)
            if world().main:
                with self.sample_log.open("a") as f:
                    for question, text, reward in rollout.samples[:2]:
                        record = {"rollout": rollout_id, "prompt": question, "reward": reward}
                        f.write(json.dumps({**record, "completion": text}) + "\n")
        rows = slice(micro * cfg.batch_size, (micro + 1) * cfg.batch_size)
        return {k: v[rows] for k, v in self.current[1].tensors.items()}

    # ---- TrainTask.loss
    def loss(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, Any]]:
        cfg = self.cfg
        logits = model(batch["input_ids"])
        logps = -token_cross_entropy(logits, batch["targets"])
        mask = batch["mask"]
        with torch.no_grad():
            entropy = (token_entropy(logits) * mask).sum() / mask.sum().clamp(min=1)
        # dapo normalises by the tokens of the whole rollout batch over all processes: undo the
        # loop's division by grad_accum and the data-parallel mean of gradients.
        num_items = batch["num_items"][0] / (cfg.grad_accum * world().size)
        loss, stats = clipped_policy_loss(
            logps,
            batch.get("old_logps"),
            batch["advantages"],
            mask,
            cfg.loss_type if cfg.algorithm == "grpo" else "dapo",
            cfg.epsilon_low,
            cfg.epsilon_high,
            cfg.beta if cfg.algorithm == "grpo" else 0.0,
            batch.get("ref_logps"),
            cfg.max_new_tokens,
            num_items,
        )
        parts: dict[str, Any] = {"policy_loss": loss.detach(), "entropy": entropy, **stats}
        if cfg.algorithm == "ppo":
            values = self.policy.value_head(self.policy.final_hidden).squeeze(-1).float()
            value_loss, value_clip = clipped_value_loss(
                values, batch["old_values"], batch["returns"], mask, cfg.cliprange_value
            )
            loss = loss + cfg.vf_coef * value_loss
            parts |= {"value_loss": value_loss.detach(), "value_clip_fraction": value_clip}
        if "ref_logps" in batch and "kl" not in parts:
            with torch.no_grad():
                delta = batch["ref_logps"] - logps
                kl = torch.exp(delta) - delta - 1
                parts["kl"] = (kl * mask).sum() / mask.sum().clamp(min=1)
        assert self.current is not None
        return loss, {**parts, **self.current[1].stats}

    # ---- TrainTask.evaluate
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        return evaluate_policy(self.policy, self.rollouts, self.cfg.task.eval_samples)

    def train_task(self) -> TrainTask:
        return TrainTask("rl", self.batch, self.loss, self.evaluate)


def evaluate_policy(
    policy: Transformer, rollouts: Rollouts, samples: int, seed: int = 12345
) -> dict[str, float]:
    """Greedy accuracy and mean reward on the held-out prompts, and the mean reward of
    `samples` completions per prompt at the rollout temperature (seeded, so comparable)."""
    prompts = rollouts.prompts.eval
    ids = [rollouts.prompt_ids(p) for p in prompts]
    greedy = replace(rollouts.params, temperature=0.0)
    texts = [rollouts.renderer.tok.decode(c.ids) for c in generate(policy, ids, greedy)]
    rewards = rollouts.score(prompts, texts)
    correct = [exact_match(t, p.reference) for t, p in zip(texts, prompts, strict=True)]
    out = {
        "greedy_accuracy": sum(correct) / len(correct),
        "greedy_reward": rewards.mean().item(),
    }
    if samples:
        params = replace(rollouts.params, seed=seed)
        repeated = [p for p in prompts for _ in range(samples)]
        done = generate(policy, [i for i in ids for _ in range(samples)], params)
        sampled = rollouts.score(repeated, [rollouts.renderer.tok.decode(c.ids) for c in done])
        out["sampled_reward"] = sampled.mean().item()
    return out


# ----------------------------------------------------------------------------- the stage


def build_rewards(
    cfg: RLConfig, reward_model: Callable | None
) -> dict[str, tuple[RewardFn, float]]:
    out: dict[str, tuple[RewardFn, float]] = {}
    for name, weight in cfg.rewards.items():
        if name == "reward_model":
            assert reward_model is not None
            out[name] = (reward_model, weight)
        else:
            out[name] = (reward_function(name), weight)
    return out


def run_rl(
    cfg: RLConfig,
    policy: Transformer,
    renderer: ChatRenderer,
    work_dir: Path,
    device: torch.device,
    seed: int,
    run=None,
    initial: Path | None = None,
    reward_model: Callable | None = None,
) -> dict[str, Any]:
    """RL-train `policy` (in place) and return the final metrics plus the step-0 evaluation."""
    reference = None
    if cfg.beta > 0:
        reference = copy.deepcopy(policy).eval().requires_grad_(False)
    if cfg.algorithm == "ppo":
        from frontierlm.posttrain.reward_model import VALUE_HEAD, attach_scalar_head

        attach_scalar_head(policy, VALUE_HEAD)
    prompts = PromptSource(cfg, seed)
    rollouts = Rollouts(
        cfg, policy, reference, renderer, prompts, build_rewards(cfg, reward_model), seed
    )
    limit = policy.cfg.max_seq_len - cfg.max_new_tokens
    if dropped := prompts.keep_fitting(lambda p: len(rollouts.prompt_ids(p)) <= limit):
        console.print(f"  {dropped} prompts longer than {limit} tokens left out")
    task = RLTask(cfg, policy, rollouts, work_dir, initial)
    work_dir.mkdir(parents=True, exist_ok=True)
    before_file = work_dir / "initial_eval.json"
    if before_file.is_file():  # a resumed run measured its starting point already
        before = json.loads(before_file.read_text())
    else:
        with torch.no_grad():
            before = evaluate_policy(policy, rollouts, cfg.task.eval_samples)
        if world().main:
            before_file.write_text(json.dumps(before))
    console.print(f"  initial policy on {len(prompts.eval)} held-out prompts: {before}")
    metrics = train(policy, cfg, task.train_task(), work_dir, device, run, export=False)
    if cfg.algorithm == "ppo":
        from frontierlm.posttrain.reward_model import VALUE_HEAD, detach_scalar_head

        detach_scalar_head(policy, VALUE_HEAD)
    save_model_dir(work_dir / "model", policy)
    return {**metrics, **{f"initial_val_{k}": v for k, v in before.items()}}


def run_rl_stage(ctx) -> dict[str, Any]:
    from frontierlm.tokenizer.train import load_tokenizer

    cfg = ctx.cfg.rl
    if cfg is None:
        raise ValueError(f"the rl stage needs an [rl] table in the recipe (see {__file__})")
    tok = load_tokenizer(ctx.path("tokenizer"))
    renderer = ChatRenderer(tok)
    initial = ctx.path("sft") / "model" if cfg.init == "sft" else Path(cfg.init)
    policy = load_model_dir(initial, ctx.device)
    scorer = None
    if "reward_model" in cfg.rewards:
        scorer = reward_model_scorer(ctx, cfg, initial, renderer)
    result = run_rl(
        cfg,
        policy,
        renderer,
        ctx.work_dir,
        ctx.device,
        ctx.cfg.run.seed,
        ctx.cfg.run,
        initial,
        scorer,
    )
    return result


def reward_model_scorer(ctx, cfg: RLConfig, initial: Path, renderer: ChatRenderer):
    """The configured reward model, trained first (from the initial policy) when no path is
    given."""
    from frontierlm.posttrain.chat_data import load_pairs
    from frontierlm.posttrain.reward_model import (
        RewardModelScorer,
        load_reward_model,
        render_pairs,
        split_pairs,
        train_reward_model,
    )

    rm_cfg = cfg.reward_model
    assert rm_cfg is not None
    pad_id = renderer.tok.token_to_id(PAD)
    if rm_cfg.path is not None:
        model = load_reward_model(Path(rm_cfg.path), ctx.device)
    else:
        if not rm_cfg.sources:
            raise ValueError("rl.reward_model: set path, or sources (preference pairs) to train on")
        pairs = [p for s in rm_cfg.sources for p in load_pairs(s)]
        train_set, val_set = split_pairs(pairs, 0.1)
        max_len = min(rm_cfg.seq_len, load_model_dir(initial).cfg.max_seq_len)
        model = load_model_dir(initial, ctx.device)
        rm_dir = ctx.work_dir / "reward_model"
        rm_metrics = train_reward_model(
            model,
            rm_cfg,
            render_pairs(train_set, renderer, max_len),
            render_pairs(val_set, renderer, max_len),
            pad_id,
            rm_dir,
            ctx.device,
            ctx.cfg.run,
            ctx.cfg.run.seed,
        )
        console.print(f"  reward model: {rm_metrics}")
        model = load_reward_model(rm_dir / "model", ctx.device)
    return RewardModelScorer(model.eval().requires_grad_(False), renderer, pad_id)
