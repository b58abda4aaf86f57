"""Document masking: a packed sequence predicts every token exactly as its documents alone do."""

import numpy as np
import pytest
import torch

from frontierlm.model.attention import attention_mask
from frontierlm.train.losses import token_cross_entropy
from frontierlm.train.pretrain import ShuffledWindows

BOS = 0


def packed_and_alone(make_random_model, **fields):
    model = make_random_model(
        vocab_size=200, d_model=64, n_layers=2, n_heads=4, max_seq_len=128, **fields
    )
    torch.manual_seed(5)
    docs = [torch.cat([torch.tensor([BOS]), torch.randint(1, 200, (n,))]) for n in (30, 7, 52)]
    packed = torch.cat(docs)[None]  # 92 tokens, three documents
    doc_ids = (packed == BOS).cumsum(dim=1)
    with torch.no_grad():
        together = token_cross_entropy(model(packed[:, :-1], doc_ids[:, :-1]), packed[:, 1:])[0]
        alone = []
        for doc in docs:
            logits = model(doc[None])
            alone.append(torch.log_softmax(logits, -1)[0])
    return model, docs, packed, doc_ids, together, alone


MLA = {
    "attention": "mla",
    "mla_q_lora_rank": 24,
    "mla_kv_lora_rank": 16,
    "mla_qk_nope_head_dim": 12,
    "mla_qk_rope_head_dim": 8,
    "mla_v_head_dim": 10,
}


@pytest.mark.parametrize("fields", [{}, {"n_kv_heads": 2, "qk_norm": True}, MLA])
def test_packed_loss_equals_each_document_alone(make_random_model, fields):
    _, docs, packed, _, together, alone = packed_and_alone(make_random_model, **fields)
    start = 0
    for doc, logp in zip(docs, alone, strict=True):
        # Within a document, token t+1 is predicted from tokens <= t of that document only.
        n = len(doc)
        expected = -logp[:-1].gather(-1, doc[1:, None])[:, 0]
        got = together[start : start + n - 1]
        assert torch.allclose(got, expected, atol=1e-5), (got - expected).abs().max()
        start += n
    # Without the mask the later documents see the earlier ones: the losses differ.
    model = packed_and_alone(make_random_model, **fields)[0]
    with torch.no_grad():
        plain = token_cross_entropy(model(packed[:, :-1]), packed[:, 1:])[0]
    assert (plain[40:] - together[40:]).abs().max() > 1e-3


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("fields", [{}, MLA])
def test_flex_block_mask_matches_dense_mask(make_random_model, fields):
    """The GPU path (FlexAttention with a BlockMask), run forward-only on the CPU."""
    model, _, packed, doc_ids, _, _ = packed_and_alone(make_random_model, **fields)
    from frontierlm.model import attention

    with torch.no_grad():
        dense = model(packed, doc_ids)
        mask = attention_mask(packed.shape[1], doc_ids, None, flex=True, device=packed.device)
        assert isinstance(mask, attention.BlockMask)
        cos, sin = model.rope_cos[: packed.shape[1]], model.rope_sin[: packed.shape[1]]
        x = model.embed_tokens(packed)
        for layer in model.layers:
            x = layer(x, cos, sin, mask)
        flex = model.lm_head(model.norm(x))
    assert torch.allclose(dense, flex, atol=1e-5)


def test_windows_carry_document_ids():
    tokens = np.array(
        [BOS, 5, 6, BOS, 7, 8, 9, BOS, 4, 3, 2, 1, BOS, 9, 9, 9, 9] * 4, dtype=np.uint16
    )
    batch = ShuffledWindows(tokens, seq_len=8, batch_size=3, seed=0, bos_id=BOS)(0)
    ids, docs = batch["input_ids"], batch["doc_ids"]
    # The id steps up exactly at each BOS and nowhere else.
    steps = docs[:, 1:] - docs[:, :-1]
    assert torch.equal(steps.bool(), ids[:, 1:] == BOS)
    assert "doc_ids" not in ShuffledWindows(tokens, 8, 3, 0)(0)
