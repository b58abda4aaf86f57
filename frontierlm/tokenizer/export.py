"""Export a trained byte-level BPE tokenizer to tiktoken's format.

tiktoken encodes a piece by repeatedly merging the adjacent pair whose concatenated bytes has
the lowest rank, where the rank is the token id. `tokenizers` applies its merge list in order.
The two agree when ids grow with merge order (each merge's result has a larger id than every
earlier merge's, as the BPE trainer assigns them), so a tokenizer trained by
`frontierlm.tokenizer.train` exports as:
  mergeable_ranks   token bytes -> id, for the 256 bytes and every merge
  pat_str           the split regex of its pre-tokenizer (tiktoken's regex engine reads it)
  special_tokens    every added token (core, tool, reserved) -> id
Files written by `export_tiktoken`: `tokenizer.tiktoken` (base64 token and rank per line, what
`tiktoken.load.load_tiktoken_bpe` reads) and `tiktoken.json` (pattern, special tokens, size).
tiktoken itself is needed only to build an `Encoding` (`to_tiktoken`), not to write the files.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from frontierlm.tokenizer.codec import byte_symbols


@dataclass
class TiktokenSpec:
    name: str
    pat_str: str
    mergeable_ranks: dict[bytes, int]
    special_tokens: dict[str, int]

    @property
    def n_vocab(self) -> int:
        return max([*self.mergeable_ranks.values(), *self.special_tokens.values()]) + 1


def _split_pattern(spec: dict[str, Any]) -> str:
    """The regex of a Split + ByteLevel(use_regex=False) pre-tokenizer, else why not."""
    pre = spec.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    if (
        len(parts) != 2
        or parts[0].get("type") != "Split"
        or "Regex" not in parts[0].get("pattern", {})
        or parts[0].get("behavior") != "Isolated"
        or parts[0].get("invert")
        or parts[1].get("type") != "ByteLevel"
        or parts[1].get("use_regex")
        or parts[1].get("add_prefix_space")
    ):
        raise ValueError(
            "cannot export to tiktoken: the pre-tokenizer is not a regex Split followed by "
            f"ByteLevel(use_regex=False) (found {json.dumps(pre)[:200]})"
        )
    return parts[0]["pattern"]["Regex"]


def tiktoken_spec(tok: Tokenizer, name: str = "frontierlm") -> TiktokenSpec:
    """What tiktoken needs to encode exactly as `tok`; ValueError says why a vocabulary does
    not map (not byte-level BPE, a normaliser, merges out of id order, ...)."""
    spec = json.loads(tok.to_str())
    model = spec["model"]
    if model.get("type") != "BPE":
        raise ValueError(f"cannot export to tiktoken: model is {model.get('type')}, not BPE")
    for key in ("continuing_subword_prefix", "end_of_word_suffix", "dropout"):
        if model.get(key):
            raise ValueError(f"cannot export to tiktoken: BPE {key} is set")
    if model.get("byte_fallback") or spec.get("normalizer") is not None:
        raise ValueError("cannot export to tiktoken: byte fallback or a normaliser is set")
    pattern = _split_pattern(spec)

    specials = {t["content"]: t["id"] for t in spec["added_tokens"]}
    symbols = byte_symbols()
    ranks: dict[bytes, int] = {}
    for token, idx in model["vocab"].items():
        if token in specials:
            continue
        try:
            ranks[bytes(symbols[c] for c in token)] = idx
        except KeyError:
            raise ValueError(
                f"cannot export to tiktoken: token {token!r} (id {idx}) is not byte-level"
            ) from None
    if sum(len(t) == 1 for t in ranks) != 256:
        raise ValueError("cannot export to tiktoken: the vocabulary lacks some of the 256 bytes")

    # tiktoken merges the lowest-id result first; the merge list must be in that order too,
    # and build each token from parts made earlier.
    vocab = model["vocab"]
    last = -1
    for merge in model["merges"]:
        left, right = merge if isinstance(merge, list) else merge.split(" ", 1)
        made = vocab[left + right]
        if made <= last or made <= max(vocab[left], vocab[right]):
            raise ValueError(
                f"cannot export to tiktoken: merge {left!r} + {right!r} -> id {made} is out of "
                "id order, so rank-based merging would differ"
            )
        last = made
    return TiktokenSpec(name, pattern, ranks, specials)


def export_tiktoken(tok: Tokenizer, out_dir: Path, name: str = "frontierlm") -> TiktokenSpec:
    spec = tiktoken_spec(tok, name)
    out_dir.mkdir(parents=True, exist_ok=True)
    lines = (
        f"{base64.b64encode(token).decode()} {rank}"
        for token, rank in sorted(spec.mergeable_ranks.items(), key=lambda kv: kv[1])
    )
    (out_dir / "tokenizer.tiktoken").write_text("\n".join(lines) + "\n")
    meta = {
        "name": spec.name,
        "pat_str": spec.pat_str,
        "special_tokens": spec.special_tokens,
        "n_vocab": spec.n_vocab,
        "mergeable_ranks": "tokenizer.tiktoken",
    }
    (out_dir / "tiktoken.json").write_text(json.dumps(meta, indent=2, ensure_ascii=False))
    return spec


def to_tiktoken(tok_or_dir: Tokenizer | Path, name: str = "frontierlm") -> Any:
    """A `tiktoken.Encoding` of a tokenizer, or of a directory `export_tiktoken` wrote."""
    import tiktoken

    if isinstance(tok_or_dir, Tokenizer):
        spec = tiktoken_spec(tok_or_dir, name)
        pat_str, ranks, specials = spec.pat_str, spec.mergeable_ranks, spec.special_tokens
    else:
        from tiktoken.load import load_tiktoken_bpe

        meta = json.loads((tok_or_dir / "tiktoken.json").read_text())
        ranks = load_tiktoken_bpe(str(tok_or_dir / meta["mergeable_ranks"]))
        pat_str, specials, name = meta["pat_str"], meta["special_tokens"], meta["name"]
    return tiktoken.Encoding(name, pat_str=pat_str, mergeable_ranks=ranks, special_tokens=specials)
