"""Streaming text from tokens as they come, never showing text the final answer will not have.

`generate` reports each accepted token through `on_token`, including tokens that later turn
out to belong to a stop string, and it cuts a finished completion at the last token whose text
ends before the stop string (`engine._trim_to_stop_string`). A token's text is also not final
while it ends inside a UTF-8 sequence (decoded as U+FFFD). So the stream holds text back until
it is certain: what it has emitted is always a prefix of the text of the final completion, and
`finish` emits the rest.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


class TextStream:
    def __init__(self, tokenizer: Any, stop_strings: Sequence[str] = ()) -> None:
        self.tokenizer = tokenizer
        self.stops = tuple(s for s in stop_strings if s)
        self.ids: list[int] = []
        self.emitted = ""
        self.safe_tokens = 0  # tokens whose text has been emitted

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids))

    def _earliest_stop_start(self, text: str) -> int:
        """Where a stop string could still begin: a whole one already in the text, or a suffix
        of the text that a stop string starts with."""
        bound = len(text)
        for stop in self.stops:
            hit = text.find(stop)
            if hit >= 0:
                bound = min(bound, hit)
                continue
            for k in range(min(len(stop) - 1, len(text)), 0, -1):
                if text.endswith(stop[:k]):
                    bound = min(bound, len(text) - k)
                    break
        return bound

    def feed(self, token: int) -> str:
        """Add one generated token; return the text that became certain."""
        self.ids.append(token)
        text = self._decode(self.ids)
        # Bytes at the end that do not yet form a character may still become one.
        bound = min(self._earliest_stop_start(text), len(text.rstrip("\ufffd")))
        # The most tokens whose text is settled: a prefix of the text so far (an earlier
        # partial character completed later decodes differently alone) within the bound.
        for k in range(len(self.ids), self.safe_tokens, -1):
            candidate = self._decode(self.ids[:k])
            if len(candidate) <= bound and text.startswith(candidate):
                self.safe_tokens = k
                delta = candidate[len(self.emitted) :]
                self.emitted = candidate
                return delta
        return ""

    def finish(self, final_ids: Sequence[int]) -> str:
        """The completion's final tokens (as `generate` returned them): the text not yet
        emitted."""
        text = self._decode(final_ids)
        delta = text[len(self.emitted) :] if text.startswith(self.emitted) else ""
        self.emitted += delta
        return delta
