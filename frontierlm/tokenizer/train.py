"""Byte-level BPE trained with HF `tokenizers`, saved as a `tokenizer.json` transformers loads.

The split regex is GPT-4's (cl100k): contractions, letter runs, 1-3 digit groups, punctuation
runs and whitespace, so numbers tokenise digit-group by digit-group and code keeps its
indentation. Special tokens come first in the vocabulary so their ids are stable across vocab
sizes: BOS/EOS/PAD and the chat-role markers used by `frontierlm.tokenizer.chat`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

BOS = "<|bos|>"
EOS = "<|eos|>"
PAD = "<|pad|>"
SYSTEM = "<|system|>"
USER = "<|user|>"
ASSISTANT = "<|assistant|>"
END = "<|end|>"
SPECIAL_TOKENS = [BOS, EOS, PAD, SYSTEM, USER, ASSISTANT, END]

SPLIT_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*"""
    r"""|\s*[\r\n]|\s+(?!\S)|\s+"""
)


def new_tokenizer() -> Tokenizer:
    tok = Tokenizer(models.BPE(byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    return tok


def train_tokenizer(texts: Iterable[str], vocab_size: int, min_frequency: int = 2) -> Tokenizer:
    tok = new_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def capped(texts: Iterable[str], max_chars: int) -> Iterator[str]:
    """Feed the trainer at most `max_chars` characters (documents are not cut)."""
    total = 0
    for text in texts:
        if total >= max_chars:
            return
        total += len(text)
        yield text


# A Jinja chat template equivalent to `frontierlm.tokenizer.chat.render`, with
# `{% generation %}` markers so transformers' `return_assistant_tokens_mask` matches our mask.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|assistant|>' }}{% generation %}{{ message['content'] + '<|end|>' }}{% endgeneration %}"
    "{% else %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


def save_tokenizer(tok: Tokenizer, out_dir: Path) -> None:
    """Write `tokenizer.json` plus the transformers side files (special tokens, chat template)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": PAD,
        "model_max_length": 1 << 20,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    special = {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD}
    (out_dir / "special_tokens_map.json").write_text(json.dumps(special, indent=2))


def load_tokenizer(path: Path) -> Tokenizer:
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"no tokenizer at {file}: run `frontierlm tokenizer RECIPE` first")
    return Tokenizer.from_file(str(file))


def token_byte_lengths(tok: Tokenizer) -> list[int]:
    """UTF-8 byte length of each token id; 0 for special tokens (they carry no text).

    bits-per-byte divides by these, so special tokens never count as predicted text."""
    specials = set(SPECIAL_TOKENS)
    lengths = [0] * tok.get_vocab_size()
    for token, idx in tok.get_vocab().items():
        # Byte-level BPE spells every byte as exactly one printable symbol.
        lengths[idx] = 0 if token in specials else len(token)
    return lengths
