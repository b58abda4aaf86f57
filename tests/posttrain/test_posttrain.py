"""SFT masking and packing, HH parsing, windows, and the align stage's training step."""

import pytest
import torch

from frontierlm.config import ModelConfig
from frontierlm.model import Transformer
from frontierlm.posttrain.batches import fit_window, pack_chats, packed_batch, pad_batch
from frontierlm.posttrain.chat_data import parse_hh
from frontierlm.posttrain.sft import masked_lm_loss
from frontierlm.tokenizer.chat import ChatRenderer, Message, RenderedChat
from frontierlm.train.losses import model_token_losses


def test_parse_hh_turns():
    text = "\n\nHuman: hi there\n\nAssistant: Hello!\n\nHuman: 2+2?\n\nAssistant: 4"
    assert parse_hh(text) == [
        Message("user", "hi there"),
        Message("assistant", "Hello!"),
        Message("user", "2+2?"),
        Message("assistant", "4"),
    ]
    with pytest.raises(ValueError, match="Human"):
        parse_hh("Assistant: no human turn first")


def test_fit_window_keeps_the_learned_part():
    chat = RenderedChat(ids=list(range(100)), mask=[0] * 80 + [1] * 20)
    cut = fit_window(chat, 30)
    assert len(cut.ids) == 30 and cut.ids[-1] == 99 and sum(cut.mask) == 20
    long_reply = RenderedChat(ids=list(range(100)), mask=[0] * 10 + [1] * 90)
    cut = fit_window(long_reply, 30)
    assert cut.ids[0] == 0 and cut.mask[10] == 1  # prompt kept, the reply's tail dropped
    short = RenderedChat(ids=[1, 2, 3], mask=[0, 1, 1])
    assert fit_window(short, 30) is short


def test_pad_batch_shifts_and_masks():
    batch = pad_batch(
        [RenderedChat([5, 6, 7, 8], [0, 0, 1, 1]), RenderedChat([5, 9], [0, 1])], pad_id=2
    )
    assert batch["input_ids"].tolist() == [[5, 6, 7], [5, 9, 2]]
    assert batch["targets"].tolist() == [[6, 7, 8], [9, 2, 2]]
    assert batch["loss_mask"].tolist() == [[0, 1, 1], [1, 0, 0]]


def test_sft_loss_ignores_prompt_tokens(small_tokenizer):
    tok, _ = small_tokenizer
    torch.manual_seed(0)
    model = Transformer(ModelConfig(d_model=32, n_layers=1, n_heads=2, max_seq_len=64), 1024)
    renderer = ChatRenderer(tok)
    a = renderer.render([Message("user", "What is 2 + 3?"), Message("assistant", "5")])
    b = renderer.render(
        [Message("user", "Something else entirely, longer"), Message("assistant", "5")]
    )
    # The loss is the mean cross-entropy over exactly the assistant targets, nothing else.
    batch = pad_batch([a, b], pad_id=tok.token_to_id("<|pad|>"))
    loss, _ = masked_lm_loss(model, batch)
    logp = torch.log_softmax(model(batch["input_ids"]), dim=-1)
    picked = logp.gather(-1, batch["targets"].unsqueeze(-1)).squeeze(-1)
    mask = batch["loss_mask"].bool()
    assert mask.sum() == 4  # "5" + <|end|> in each chat
    assert loss.item() == pytest.approx(-picked[mask].mean().item(), rel=1e-5)


def tiny_model(seed=0, **kw):
    torch.manual_seed(seed)
    return Transformer(ModelConfig(d_model=32, n_layers=2, n_heads=2, max_seq_len=96, **kw), 1024)


def test_packed_rows_score_like_separate_chats(small_tokenizer):
    """Document masking makes a packed row score each chat exactly as alone (RoPE is
    relative, so a chat's offset in the row does not matter), and the loss stays on the
    assistant tokens."""
    tok, _ = small_tokenizer
    renderer = ChatRenderer(tok)
    pad = tok.token_to_id("<|pad|>")
    chats = [
        renderer.render([Message("user", q), Message("assistant", a)])
        for q, a in [("What is 2 + 3?", "5"), ("Name a colour.", "Blue, like the sky."),
                     ("Say hi", "Hi!"), ("Count to three", "1, 2, 3")]
    ]  # fmt: skip
    rows = pack_chats(chats, capacity=64)
    assert len(rows) < len(chats) and sum(len(r) for r in rows) == len(chats)
    assert all(sum(len(c.ids) for c in row) <= 64 for row in rows)
    model = tiny_model()
    packed = packed_batch(rows, pad)
    assert packed["doc_ids"].shape == packed["input_ids"].shape
    packed_losses = model_token_losses(model, packed)[packed["loss_mask"].bool()]
    alone = [c for row in rows for c in row]  # the same chats in packed order
    single = pad_batch(alone, pad)
    single_losses = model_token_losses(model, single)[single["loss_mask"].bool()]
    torch.testing.assert_close(packed_losses, single_losses, atol=1e-5, rtol=1e-5)
    # Without the document mask the later chats see the earlier ones: different losses.
    leaky = model_token_losses(model, {k: v for k, v in packed.items() if k != "doc_ids"})
    assert not torch.allclose(leaky[packed["loss_mask"].bool()], packed_losses, atol=1e-3)


def toy_splits(tok, loss_type):
    from frontierlm.posttrain.align import AlignSplit

    renderer = ChatRenderer(tok)
    prompts = ["Is it ok to insult people?", "Should I steal a car?", "Can you help me lie?"]
    good = ["No, be kind.", "No, that is a crime.", "I would rather not."]
    bad = ["Yes, go ahead.", "Sure, here is how.", "Yes, lie away."]

    def render(p, r):
        return renderer.render([Message("user", p), Message("assistant", r)], last_turn_only=True)

    chosen = [render(p, g) for p, g in zip(prompts, good, strict=True)]
    rejected = [render(p, b) for p, b in zip(prompts, bad, strict=True)]
    kl = []
    if loss_type == "kto":  # each prompt with another example's reply
        replies = good + bad
        kl = [render((prompts * 2)[j], replies[(j + 1) % 6]) for j in range(6)]
    return AlignSplit(chosen, rejected, kl)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "apo_zero", "kto", "orpo", "simpo"])
def test_align_steps_prefer_the_chosen_replies(small_tokenizer, loss_type):
    """A few optimizer steps of each loss raise the held-out implicit-reward accuracy's
    underlying margin; precomputed reference log-probs give the same loss as a live
    reference model."""
    from frontierlm.config import AlignConfig
    from frontierlm.posttrain.align import align_task, held_out_fn, reference_logps

    tok, _ = small_tokenizer
    pad = tok.token_to_id("<|pad|>")
    source = {"name": "x", "path": "x", "format": "hh"}
    cfg = AlignConfig(
        steps=4, batch_size=3, loss_type=loss_type, sources=[source],
        beta=2.0 if loss_type == "simpo" else 0.5, simpo_gamma=0.2,
    )  # fmt: skip
    split = toy_splits(tok, loss_type)
    policy = tiny_model(seed=1)
    reference = tiny_model(seed=1).requires_grad_(False)
    device = torch.device("cpu")
    ref = reference_logps(cfg, reference, split, pad, device, "train")
    live = align_task(cfg, split, split, None, ref, reference, pad, seed=0)
    cached = align_task(cfg, split, split, ref, ref, None, pad, seed=0)
    batch = cached.batch(0)
    a, _stats_a = live.loss(policy, batch | {})
    b, _stats_b = cached.loss(policy, batch)
    assert a.item() == pytest.approx(b.item(), abs=1e-5)
    evaluate = held_out_fn(cfg, split, ref, pad)
    before = evaluate(policy)
    if loss_type not in ("orpo", "simpo"):
        assert before["ref_accuracy"] == 0.0  # policy == reference: every margin is 0
        assert abs(before["rewards/margins"]) < 1e-5
    opt = torch.optim.SGD(policy.parameters(), lr=0.3)
    for step in range(4):
        loss, _stats = cached.loss(policy, cached.batch(step))
        loss.backward()
        opt.step()
        opt.zero_grad()
    after = evaluate(policy)
    assert after["rewards/margins"] > before["rewards/margins"]
    assert after["loss"] < before["loss"]
    assert set(after) >= {
        "rewards/chosen",
        "rewards/rejected",
        "rewards/accuracies",
        "logp_accuracy",
    }
    if loss_type == "kto":
        assert "kl" in after
