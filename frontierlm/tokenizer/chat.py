"""Chat rendering: messages -> token ids and a loss mask that is 1 on assistant tokens only.

The format is the Jinja `CHAT_TEMPLATE` saved with the tokenizer:
  <|bos|><|system|>rules<|end|><|user|>question<|end|><|assistant|>call<|end|>
  <|tool|>result<|end|><|assistant|>answer<|end|>
Roles are system, developer, user, assistant and tool (a tool's output fed back to the model;
the call is assistant text, so it is learned, and the result is not). `ROLE_PRIVILEGE` orders
them for the instruction hierarchy: when instructions conflict, the model should follow the
higher one, system > developer > user > assistant > tool (eval/safety.py measures it). The
system message, when present, comes first, and developer messages come before the first user
turn: the privileged instructions are set before the conversation starts.
Each piece is encoded on its own; special tokens always split the text, so this equals
encoding the whole rendered string (tests check it against transformers'
`apply_chat_template` on the shipped HH and GSM8K chats).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from tokenizers import Tokenizer

from frontierlm.tokenizer.train import ASSISTANT, BOS, DEVELOPER, END, SYSTEM, TOOL, USER

ROLE_TOKENS = {
    "system": SYSTEM,
    "developer": DEVELOPER,
    "user": USER,
    "assistant": ASSISTANT,
    "tool": TOOL,
}
# Most privileged first.
ROLE_PRIVILEGE = ("system", "developer", "user", "assistant", "tool")


def check_role_order(roles: Sequence[str]) -> None:
    """System only first; developer only before the first user/assistant/tool turn."""
    for i, role in enumerate(roles):
        if role == "system" and i != 0:
            raise ValueError(f"chat message {i}: a system message must be the first message")
        if role == "developer" and any(r not in ("system", "developer") for r in roles[:i]):
            raise ValueError(
                f"chat message {i}: developer messages come before the conversation (after the "
                "system message, before the first user turn)"
            )


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
        # Tokenizers trained before the tool or developer role existed lack its token; they
        # render the other roles as before and refuse those messages.
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
        check_role_order([m.role for m in messages])
        ids: list[int] = [self.bos]
        mask = [0]
        for i, msg in enumerate(messages):
            if self.role_ids.get(msg.role) is None:
                known = [r for r, i in self.role_ids.items() if i is not None]
                raise ValueError(
                    f"chat role {msg.role!r} has no token in this tokenizer; allowed: {known} "
                    "(retrain the tokenizer stage for the tool and developer roles)"
                )
            body = [*self.encode_text(msg.content), self.end]
            is_last = i == len(messages) - 1
            learn = int(msg.role == "assistant" and (is_last or not last_turn_only))
            ids += [self.role_ids[msg.role], *body]
            mask += [0] + [learn] * len(body)
        if add_generation_prompt:
            ids.append(self.role_ids["assistant"])
            mask.append(0)
        return RenderedChat(ids=ids, mask=mask)
