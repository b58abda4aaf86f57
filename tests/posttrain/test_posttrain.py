"""SFT masking, HH parsing, windows and the DPO loss."""

import math

import pytest
import torch

from frontierlm.config import ModelConfig
from frontierlm.model import Transformer
from frontierlm.posttrain.batches import fit_window, pad_batch
from frontierlm.posttrain.chat_data import parse_hh
from frontierlm.posttrain.preference import dpo_loss, pair_batch, sequence_logps
from frontierlm.posttrain.sft import masked_lm_loss
from frontierlm.tokenizer.chat import ChatRenderer, Message, RenderedChat


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


def test_dpo_loss_against_direct_formula():
    torch.manual_seed(1)
    policy = torch.randn(6) * 5 - 40  # 3 chosen then 3 rejected sequence log-probs
    ref = torch.randn(6) * 5 - 40
    loss, margins = dpo_loss(policy, ref, beta=0.1)
    for i in range(3):
        expected = 0.1 * ((policy[i] - ref[i]) - (policy[i + 3] - ref[i + 3]))
        assert margins[i].item() == pytest.approx(expected.item(), rel=1e-6)
    direct = sum(math.log1p(math.exp(-m)) for m in margins.tolist()) / 3
    assert loss.item() == pytest.approx(direct, rel=1e-6)
    # Identical policy and reference: margin 0, loss log 2.
    loss0, margins0 = dpo_loss(ref, ref, beta=0.1)
    assert margins0.abs().max() == 0 and loss0.item() == pytest.approx(math.log(2))


def test_dpo_step_raises_the_margin(small_tokenizer):
    tok, _ = small_tokenizer
    torch.manual_seed(0)
    policy = Transformer(ModelConfig(d_model=32, n_layers=2, n_heads=2, max_seq_len=64), 1024)
    reference = Transformer(ModelConfig(d_model=32, n_layers=2, n_heads=2, max_seq_len=64), 1024)
    reference.load_state_dict(policy.state_dict())
    renderer = ChatRenderer(tok)
    prompt = [Message("user", "Is it ok to insult people?")]
    pairs = [
        (
            renderer.render([*prompt, Message("assistant", "No, be kind.")], last_turn_only=True),
            renderer.render([*prompt, Message("assistant", "Yes, go ahead.")], last_turn_only=True),
        )
    ]
    batch = pair_batch(pairs, tok.token_to_id("<|pad|>"))
    opt = torch.optim.SGD(policy.parameters(), lr=0.5)
    margins = []
    for _ in range(3):
        with torch.no_grad():
            ref = sequence_logps(reference, batch)
        loss, margin = dpo_loss(sequence_logps(policy, batch), ref, beta=0.1)
        margins.append(margin.item())
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert margins[0] == 0.0 and margins[2] > margins[1] > 0.0
