"""Chat rendering: messages -> token ids and a loss mask that is 1 on assistant tokens only.

The format is the Jinja `CHAT_TEMPLATE` saved with the tokenizer:
  <|bos|><|user|>question<|end|><|assistant|>answer<|end|>...
Each piece is encoded on its own; special tokens always split the text, so this equals encoding
the whole rendered string (tests check it against transformers' `apply_chat_template`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from tokenizers import Tokenizer

from frontierlm.tokenizer.train import ASSISTANT, BOS, END, SYSTEM, USER

ROLE_TOKENS = {"system": SYSTEM, "user": USER, "assistant": ASSISTANT}


@dataclass
class Message:
    role: str
    content: str


@dataclass
class RenderedChat:
    ids: list[int]
    mask: list[int]  # 1 where the token is predicted by the loss (assistant text and its END)


class ChatRenderer:
    def __init__(self, tok: Tokenizer) -> None:
        self.tok = tok
        self.bos = tok.token_to_id(BOS)
        self.end = tok.token_to_id(END)
        self.role_ids = {role: tok.token_to_id(t) for role, t in ROLE_TOKENS.items()}

    def encode_text(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def render(
        self,
        messages: Sequence[Message],
        add_generation_prompt: bool = False,
        last_turn_only: bool = False,
    ) -> RenderedChat:
        """Token ids and loss mask; `last_turn_only` masks earlier assistant turns (they are
        context, as in preference pairs whose dialogues differ only in the final reply)."""
        ids = [self.bos]
        mask = [0]
        for i, msg in enumerate(messages):
            if msg.role not in self.role_ids:
                raise ValueError(f"unknown chat role {msg.role!r}; allowed: {list(self.role_ids)}")
            body = [*self.encode_text(msg.content), self.end]
            is_last = i == len(messages) - 1
            learn = int(msg.role == "assistant" and (is_last or not last_turn_only))
            ids += [self.role_ids[msg.role], *body]
            mask += [0] + [learn] * len(body)
        if add_generation_prompt:
            ids.append(self.role_ids["assistant"])
            mask.append(0)
        return RenderedChat(ids=ids, mask=mask)
