"""Lossless encoding of any input, valid UTF-8 or not, with a byte-level BPE tokenizer.

`tokenizers` takes Python strings and hands Rust valid UTF-8, so a string holding lone
surrogates (how Python carries undecodable bytes) cannot go through it, and its decoder turns
byte sequences that are not UTF-8 into U+FFFD. The byte-level vocabulary still has one token
per byte, so here:
  - bytes are split into runs of valid UTF-8 and single invalid bytes; valid runs are encoded
    as usual, each invalid byte becomes its byte token;
  - a string becomes bytes with `surrogateescape` (U+DC80..U+DCFF stand for the bytes
    0x80..0xFF, as `open(..., errors="surrogateescape")` and `os.fsdecode` produce them); other
    lone surrogates (a JSON "\\ud800") fall back to their `surrogatepass` bytes;
  - `decode_bytes` joins the tokens' bytes, `decode_text` turns them back into a string with
    `surrogateescape`, so decode_text(encode_text(x)) == x for every valid or escaped x.
Valid UTF-8 text gives exactly the ids of `Tokenizer.encode` (tests check it), so token shards
of ordinary text do not change.

Batches of valid text go through tiktoken when the vocabulary exports to it (export.py: the same
ids, checked on every code point): its encoder runs ~3x faster than `tokenizers`' on the same
vocabulary and cores. Texts that spell a special token (`tokenizers` turns the spelling into the
special id, tiktoken's ordinary encoding does not) stay on `tokenizers`, so the ids never depend
on which engine ran.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from functools import cache
from typing import Any

from tokenizers import Tokenizer

ESCAPED = re.compile("[\udc80-\udcff]")


@cache
def byte_symbols() -> dict[str, int]:
    """The printable symbol ByteLevel spells each byte with -> the byte (GPT-2's table):
    printable Latin-1 bytes stand for themselves, the other 68 take code points 256 and up."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    table = {chr(b): b for b in printable}
    extra = 0
    for b in range(256):
        if b not in printable:
            table[chr(256 + extra)] = b
            extra += 1
    return table


class ByteCodec:
    """Byte-exact encode/decode around one tokenizer (tables built once)."""

    def __init__(self, tok: Tokenizer, engine: str = "auto") -> None:
        """`engine`: "auto" (tiktoken when the vocabulary exports to it and tiktoken is
        installed, else `tokenizers`) or "tokenizers"."""
        self.tok = tok
        self.fast = _tiktoken_encoding(tok) if engine == "auto" else None
        specials = [t.content for t in tok.get_added_tokens_decoder().values()]
        self._special_text = (
            re.compile("|".join(map(re.escape, specials))) if specials else re.compile("(?!)")
        )
        symbols = byte_symbols()
        vocab = tok.get_vocab()
        self.byte_ids = [0] * 256
        for symbol, byte in symbols.items():
            self.byte_ids[byte] = vocab[symbol]
        self.token_bytes: list[bytes] = [b""] * tok.get_vocab_size()
        added = tok.get_added_tokens_decoder()
        for token, idx in vocab.items():
            # Special tokens decode to their text: they are not byte-level spellings.
            if idx in added:
                self.token_bytes[idx] = token.encode()
            else:
                self.token_bytes[idx] = bytes(symbols[c] for c in token)

    def encode_bytes(self, data: bytes) -> list[int]:
        text = data.decode("utf-8", "surrogateescape")
        if not ESCAPED.search(text):
            return self.tok.encode(text, add_special_tokens=False).ids
        ids: list[int] = []
        pieces = ESCAPED.split(text)
        bad = ESCAPED.findall(text)
        encoded = self.tok.encode_batch([p for p in pieces if p], add_special_tokens=False)
        runs = iter(encoded)
        for i, piece in enumerate(pieces):
            if piece:
                ids += next(runs).ids
            if i < len(bad):
                ids.append(self.byte_ids[ord(bad[i]) - 0xDC00])
        return ids

    def encode_text(self, text: str) -> list[int]:
        return self.encode_bytes(to_bytes(text))

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Ids per text: valid texts in one parallel batch, the rest byte by byte as above."""
        ids: list[list[int] | None] = [None] * len(texts)
        valid: list[int] = []
        for i, text in enumerate(texts):
            if _has_surrogate(text):
                ids[i] = self.encode_text(text)
            else:
                valid.append(i)
        slow = valid
        if self.fast is not None:
            plain = [i for i in valid if not self._special_text.search(texts[i])]
            slow = [i for i in valid if self._special_text.search(texts[i])]
            encoded = self.fast.encode_ordinary_batch(
                [texts[i] for i in plain], num_threads=os.cpu_count() or 1
            )
            for i, one in zip(plain, encoded, strict=True):
                ids[i] = one
        encode = getattr(self.tok, "encode_batch_fast", self.tok.encode_batch)
        for i, enc in zip(
            slow, encode([texts[i] for i in slow], add_special_tokens=False), strict=True
        ):
            ids[i] = enc.ids
        return [x if x is not None else [] for x in ids]

    def decode_bytes(self, ids: Sequence[int]) -> bytes:
        return b"".join(self.token_bytes[i] for i in ids)

    def decode_text(self, ids: Sequence[int]) -> str:
        return self.decode_bytes(ids).decode("utf-8", "surrogateescape")


def _tiktoken_encoding(tok: Tokenizer) -> Any | None:
    """tiktoken's Encoding of the same vocabulary, or None where it cannot be exact."""
    try:
        from frontierlm.tokenizer.export import to_tiktoken

        return to_tiktoken(tok)
    except (ImportError, ValueError):
        return None


def _has_surrogate(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def to_bytes(text: str) -> bytes:
    """The bytes a string stands for: escaped bytes restored, other lone surrogates kept."""
    try:
        return text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogatepass")
