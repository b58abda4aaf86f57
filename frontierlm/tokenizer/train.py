"""Byte-level BPE trained with HF `tokenizers`, saved as a `tokenizer.json` transformers loads.

Text is split by a regex before BPE (`PRETOKENIZERS`), then mapped byte by byte onto printable
symbols (ByteLevel), so any input, even invalid UTF-8 passed in as surrogate escapes, has a
spelling. The default split ("cl100k", GPT-4's) separates contractions, letter runs with one
optional leading non-letter, 1-3 digit groups, punctuation runs, newlines and whitespace, so
numbers tokenise digit-group by digit-group and code keeps its indentation. "o200k" (GPT-4o's)
also splits letter runs at lower-to-upper case changes and keeps contractions on their word;
"gpt2" is the older split that lumps whole digit runs and whitespace with the next word: the
baseline the compression report compares against.

Vocabulary layout, the ids stable across vocab sizes where they can be:
  0..6                 CORE_SPECIAL_TOKENS: BOS/EOS/PAD and the chat markers of `chat.py`
  7..vocab_size-1      the 256 byte symbols, then merges in the order the trainer learned them
  vocab_size           TOOL, the tool-result role marker
  vocab_size+1...      `<|reserved_i|>` slots, for special tokens a later stage may need
  then                 DEVELOPER, the developer role (between system and user in privilege),
                       last so that it moves no id the tokens above had before it existed;
                       tokenizers trained before it lack it (chat.py refuses the role there)
Tokens after the trained vocabulary are appended (as Llama 3 appends its 256 specials to 128k
BPE tokens) so adding them never shifts a merge's id: shards and checkpoints of a tokenizer
trained before they existed keep their meaning.
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
TOOL = "<|tool|>"
DEVELOPER = "<|developer|>"
# Trained first, at fixed ids; TOOL, DEVELOPER and the reserved slots follow the trained
# vocabulary.
CORE_SPECIAL_TOKENS = [BOS, EOS, PAD, SYSTEM, USER, ASSISTANT, END]


def reserved_token(i: int) -> str:
    return f"<|reserved_{i}|>"


# o200k matches contractions only as the tail of a letter run ("don't" is one piece).
_CONTRACTIONS = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)"""
# Letter classes of o200k: a run of upper/title/modifier/other letters (and combining marks)
# followed by lower ones, or the reverse, so "XMLHttpRequest" splits as "XMLHttp" "Request".
_UPPER = r"""[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]"""
_LOWER = r"""[\p{Ll}\p{Lm}\p{Lo}\p{M}]"""

PRETOKENIZERS: dict[str, str] = {
    # GPT-4 (cl100k), as written in tiktoken; the default since the first quickstart.
    "cl100k": (
        r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}"""
        r"""| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""
    ),
    # GPT-4o (o200k): case-aware letter runs carrying their contraction, "/" kept after
    # punctuation runs (paths, URLs), newline runs kept together.
    "o200k": "|".join(
        [
            rf"""[^\r\n\p{{L}}\p{{N}}]?{_UPPER}*{_LOWER}+{_CONTRACTIONS}?""",
            rf"""[^\r\n\p{{L}}\p{{N}}]?{_UPPER}+{_LOWER}*{_CONTRACTIONS}?""",
            r"""\p{N}{1,3}""",
            r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
            r"""\s*[\r\n]+""",
            r"""\s+(?!\S)""",
            r"""\s+""",
        ]
    ),
    # GPT-2: whole digit runs, a leading space glued to words, numbers and punctuation.
    "gpt2": r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""",
}
DEFAULT_PRETOKENIZER = "cl100k"
SPLIT_PATTERN = PRETOKENIZERS[DEFAULT_PRETOKENIZER]


def new_tokenizer(pre_tokenizer: str = DEFAULT_PRETOKENIZER) -> Tokenizer:
    if pre_tokenizer not in PRETOKENIZERS:
        choices = list(PRETOKENIZERS)
        raise ValueError(
            f"unknown tokenizer.pre_tokenizer {pre_tokenizer!r}; choose from {choices}"
        )
    tok = Tokenizer(models.BPE(byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(
                Regex(PRETOKENIZERS[pre_tokenizer]), behavior="isolated", invert=False
            ),
            # The regex has split already; ByteLevel only maps bytes to symbols.
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    return tok


def train_tokenizer(
    texts: Iterable[str],
    vocab_size: int,
    min_frequency: int = 2,
    pre_tokenizer: str = DEFAULT_PRETOKENIZER,
    reserved_special_tokens: int = 0,
) -> Tokenizer:
    """Train on `texts`, consumed once as a stream (pass a generator to keep the corpus on
    disk); `vocab_size` counts the core special tokens, bytes and merges, and TOOL, DEVELOPER
    and the reserved slots come on top. Small corpora may stop short of `vocab_size` merges."""
    tok = new_tokenizer(pre_tokenizer)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=CORE_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    reserved = [reserved_token(i) for i in range(reserved_special_tokens)]
    tok.add_special_tokens([TOOL, *reserved, DEVELOPER])
    return tok


def special_token_ids(tok: Tokenizer) -> set[int]:
    """Ids of every special token the tokenizer knows (core, TOOL, reserved, any added)."""
    return {i for i, t in tok.get_added_tokens_decoder().items() if t.special}


def capped(texts: Iterable[str], max_chars: int) -> Iterator[str]:
    """Feed the trainer at most `max_chars` characters (documents are not cut)."""
    total = 0
    for text in texts:
        if total >= max_chars:
            return
        total += len(text)
        yield text


# A Jinja chat template equivalent to `frontierlm.tokenizer.chat.ChatRenderer.render`, with
# `{% generation %}` markers so transformers' `return_assistant_tokens_mask` matches our mask.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'developer', 'user', 'assistant', 'tool'] %}"
    "{{ raise_exception('unknown chat role ' + message['role']) }}"
    "{% endif %}"
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
    specials = special_token_ids(tok)
    lengths = [0] * tok.get_vocab_size()
    for token, idx in tok.get_vocab().items():
        # Byte-level BPE spells every byte as exactly one printable symbol.
        lengths[idx] = 0 if idx in specials else len(token)
    return lengths
