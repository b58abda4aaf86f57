"""Reading chat sources: single-turn Q/A records and Anthropic HH dialogues (and their pairs).

Records are selected by `ChatSource.take`, a range of a salted hash of the record's line, so
sources over the same file (SFT on one part, DPO on another) never overlap, whatever the order.
A malformed line is skipped and reported with its file and line number.
"""

from __future__ import annotations

import gzip
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from frontierlm.config import ChatSource
from frontierlm.console import console
from frontierlm.tokenizer.chat import Message
from frontierlm.tokenizer.shards import hash_fraction

HH_TURN = re.compile(r"\n\nHuman: |\n\nAssistant: ")


@dataclass
class PreferencePair:
    prompt: list[Message]
    chosen: str
    rejected: str


def parse_hh(text: str) -> list[Message]:
    """'\\n\\nHuman: a\\n\\nAssistant: b' -> [user a, assistant b]."""
    roles = ["user" if m.group() == "\n\nHuman: " else "assistant" for m in HH_TURN.finditer(text)]
    bodies = HH_TURN.split(text)
    if not roles or bodies[0].strip():
        raise ValueError("text does not start with a '\\n\\nHuman: ' turn")
    return [Message(role, body.strip()) for role, body in zip(roles, bodies[1:], strict=True)]


def _records(source: ChatSource) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, JSON object) for records inside the source's `take` range."""
    path = Path(source.path)
    opener = gzip.open if path.suffix == ".gz" else open
    lo, hi = source.take
    taken = 0
    with opener(path, "rt", encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip() or not lo <= hash_fraction(line.strip()) < hi:
                continue
            try:
                record = json.loads(line)
                if not isinstance(record, dict):
                    raise ValueError("not a JSON object")
            except ValueError as err:
                console.print(f"[yellow]{path}:{line_no}: skipped, {err}")
                continue
            yield line_no, record
            taken += 1
            if source.max_examples and taken >= source.max_examples:
                return


def load_conversations(source: ChatSource) -> list[list[Message]]:
    chats = []
    for line_no, record in _records(source):
        try:
            if source.format == "qa":
                chats.append(
                    [
                        Message("user", str(record[source.prompt_field]).strip()),
                        Message("assistant", str(record[source.response_field]).strip()),
                    ]
                )
            else:
                messages = parse_hh(record["chosen"])
                if messages[-1].role != "assistant":
                    raise ValueError("dialogue does not end with an assistant turn")
                chats.append(messages)
        except (KeyError, ValueError) as err:
            console.print(f"[yellow]{source.path}:{line_no}: skipped, {err!r}")
    return chats


def load_pairs(source: ChatSource) -> list[PreferencePair]:
    pairs = []
    for line_no, record in _records(source):
        try:
            chosen, rejected = parse_hh(record["chosen"]), parse_hh(record["rejected"])
            if (
                chosen[:-1] != rejected[:-1]
                or chosen[-1].role != "assistant"
                or rejected[-1].role != "assistant"
            ):
                raise ValueError(
                    "chosen and rejected must share the prompt and end with an assistant turn"
                )
            if chosen[-1].content == rejected[-1].content:
                raise ValueError("chosen and rejected responses are identical")
            pairs.append(PreferencePair(chosen[:-1], chosen[-1].content, rejected[-1].content))
        except (KeyError, ValueError) as err:
            console.print(f"[yellow]{source.path}:{line_no}: skipped, {err}")
    return pairs
