"""A model ready to sample from: weights, its tokenizer, the chat template and the stop tokens.

`load_inference_model(path)` takes what users point at: a model directory (`config.json` +
`model.safetensors`), a stage directory of a run (`runs/quickstart/sft`, whose `model/` it
reads), a training checkpoint (`.../checkpoints/step_0000100`) or an exported Hugging Face
directory. The tokenizer is the one next to the model or the run's `tokenizer/` stage.

Prompts are encoded as training saw them: raw text as a pretraining document (BOS, then the
text), chats through `ChatRenderer` with the assistant generation prompt. A chat reply ends at
END (end of turn); EOS and BOS (a new document) end either kind.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer

from frontierlm.inference.sampling import SamplingParams
from frontierlm.model import Transformer, load
from frontierlm.tokenizer.chat import ChatRenderer, Message
from frontierlm.tokenizer.train import BOS, EOS, load_tokenizer

ROLES = ("system", "user", "assistant", "tool")


@dataclass
class InferenceModel:
    model: Transformer
    tokenizer: Tokenizer
    name: str  # what the server reports as the model id

    def __post_init__(self) -> None:
        self.renderer = ChatRenderer(self.tokenizer)
        self.bos = self.tokenizer.token_to_id(BOS)
        self.eos = self.tokenizer.token_to_id(EOS)
        self.text_stop_ids = tuple(i for i in (self.eos, self.bos) if i is not None)
        self.chat_stop_ids = (self.renderer.end, *self.text_stop_ids)

    @property
    def max_seq_len(self) -> int:
        return self.model.cfg.max_seq_len

    def text_ids(self, text: str) -> list[int]:
        """A raw prompt as pretraining documents were encoded: BOS, then the text."""
        return [self.bos, *self.renderer.encode_text(text)]

    def chat_ids(self, messages: Sequence[Message | dict]) -> list[int]:
        """A conversation rendered with the chat template, ending with the assistant's turn
        marker so that the model writes the reply."""
        parsed = [
            m if isinstance(m, Message) else Message(m["role"], m["content"]) for m in messages
        ]
        return self.renderer.render(parsed, add_generation_prompt=True).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids))

    def params(self, chat: bool, **fields) -> SamplingParams:
        """SamplingParams that also stop at the end-of-turn (chat) or end-of-text tokens."""
        stops = self.chat_stop_ids if chat else self.text_stop_ids
        extra = tuple(fields.pop("stop_ids", ()))
        return SamplingParams(stop_ids=(*stops, *extra), **fields)

    def room(self, prompt_len: int, max_new_tokens: int) -> int:
        """`max_new_tokens` cut to what the context window leaves after the prompt."""
        return max(0, min(max_new_tokens, self.max_seq_len - prompt_len))


def find_tokenizer(model_path: Path) -> Path:
    """The tokenizer beside a model: in the directory itself (exported HF), in a `tokenizer/`
    next to it, or the run's `tokenizer/` stage a few levels up."""
    looked = []
    for parent in [model_path, *list(model_path.resolve().parents)[:4]]:
        for candidate in (parent, parent / "tokenizer"):
            looked.append(candidate)
            if (candidate / "tokenizer.json").is_file():
                return candidate
    raise FileNotFoundError(
        f"no tokenizer.json for the model at {model_path} (looked in "
        f"{', '.join(str(p) for p in looked[:4])} and above); pass --tokenizer DIR"
    )


def load_inference_model(
    path: str | Path,
    tokenizer: str | Path | None = None,
    device: str | torch.device = "cpu",
    name: str | None = None,
) -> InferenceModel:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"model path {path} does not exist")
    if not (path / "config.json").is_file() and not (path / "model" / "config.json").is_file():
        raise FileNotFoundError(
            f"{path} holds no model: expected config.json there or in {path / 'model'} "
            "(a model directory, a run's stage directory such as runs/quickstart/sft, or an "
            "exported Hugging Face directory)"
        )
    model = load(path).to(device).eval()
    tok_dir = Path(tokenizer) if tokenizer is not None else find_tokenizer(path)
    tok = load_tokenizer(tok_dir)
    n_tokens = tok.get_vocab_size(with_added_tokens=True)
    # The tokenizer may carry reserved slots past the model's embedding table; only the ids it
    # can emit must fit, and every special id we stop on or prompt with must.
    special = [tok.token_to_id(t) for t in (BOS, EOS)]
    if (
        any(i is None or i >= model.vocab_size for i in special)
        or tok.get_vocab_size(with_added_tokens=False) > model.vocab_size
    ):
        raise ValueError(
            f"tokenizer {tok_dir} ({n_tokens} tokens) does not fit the model at {path} "
            f"(vocab {model.vocab_size}): pass the tokenizer the model was trained with "
            "(--tokenizer DIR)"
        )
    if name is None:
        # runs/quickstart/sft (or its model/) -> "quickstart/sft"; other directories: their name
        where = path.resolve()
        where = where.parent if where.name == "model" else where
        name = (
            f"{where.parent.name}/{where.name}" if (where / "stage.json").is_file() else where.name
        )
    return InferenceModel(model, tok, name)
