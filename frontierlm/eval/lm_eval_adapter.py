"""FrontierLM models in EleutherAI's lm-evaluation-harness: the `frontierlm` model class.

    pip install "frontierlm[lmeval]"
    python -m frontierlm.eval.lm_eval_adapter run --model frontierlm \
        --model_args pretrained=runs/quickstart/sft --tasks hellaswag,gsm8k

(`python -m frontierlm.eval.lm_eval_adapter` is lm-eval's own command line with this class
registered; from Python, `import frontierlm.eval.lm_eval_adapter` registers it for
`lm_eval.simple_evaluate(model="frontierlm", ...)`, or pass an `FrontierLMEval` instance.)

The three request types go through FrontierLM's own code, so the harness's scores are the ones
the eval stage computes: `loglikelihood` through `eval/loglik.py` (the multiple-choice scorer,
pairs split as lm-eval's `_encode_pair`), `loglikelihood_rolling` through the same scorer over
lm-eval's rolling windows, `generate_until` through `inference.engine.generate`. Sequences start
with BOS, as every training document does. Nothing else in FrontierLM imports lm_eval: it stays
an optional extra.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from frontierlm.eval.exact_match import stop_ids
from frontierlm.eval.loglik import encode_pair, score_continuations
from frontierlm.inference.engine import generate
from frontierlm.inference.loader import load_inference_model
from frontierlm.inference.sampling import SamplingParams
from frontierlm.tokenizer.train import BOS, load_tokenizer


@register_model("frontierlm")
class FrontierLMEval(LM):
    def __init__(
        self,
        pretrained: str | torch.nn.Module | None = None,
        tokenizer: Any = None,
        batch_size: int | str = 16,
        device: str = "cpu",
        max_gen_toks: int = 256,
        **_: Any,  # lm-eval passes max_batch_size and others the class has no use for
    ) -> None:
        super().__init__()
        if pretrained is None:
            raise ValueError("frontierlm: give pretrained=<model, stage or exported HF directory>")
        if isinstance(pretrained, torch.nn.Module):
            self.model = pretrained
            if tokenizer is None:
                raise ValueError("frontierlm: a model object needs tokenizer=")
        else:  # the loader `frontierlm generate` uses: stage, model or exported HF directory
            loaded = load_inference_model(pretrained, tokenizer, device)
            self.model, tokenizer = loaded.model, loaded.tokenizer
        self.tok = (
            load_tokenizer(Path(tokenizer)) if isinstance(tokenizer, str | Path) else tokenizer
        )
        self.bos = self.tok.token_to_id(BOS)
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 16
        self.max_gen_toks = int(max_gen_toks)

    @property
    def max_length(self) -> int:
        return self.model.cfg.max_seq_len

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = [encode_pair(self.tok, self.bos, *req.args) for req in requests]
        return [
            (s.logprob, s.greedy) for s in score_continuations(self.model, pairs, self.batch_size)
        ]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        out = []
        for req in requests:
            (text,) = req.args
            ids = self.tok.encode(text, add_special_tokens=False).ids
            windows = [
                make_disjoint_window(w)
                for w in get_rolling_token_windows(ids, self.bos, self.max_length, context_len=1)
            ]
            scores = score_continuations(self.model, windows, self.batch_size)
            out.append(sum(s.logprob for s in scores))
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out = []
        for req in requests:
            context, kwargs = req.args
            kwargs = dict(kwargs or {})
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            sample = bool(kwargs.pop("do_sample", False))
            temperature = float(kwargs.pop("temperature", 1.0 if sample else 0.0))
            params = SamplingParams(
                max_new_tokens=int(kwargs.pop("max_gen_toks", self.max_gen_toks)),
                temperature=temperature if sample else 0.0,
                top_p=float(kwargs.pop("top_p", 1.0) or 1.0),
                stop_ids=stop_ids(self.tok),
                stop_strings=tuple(until),
            )
            prompt = [self.bos, *self.tok.encode(context, add_special_tokens=False).ids]
            completion = generate(self.model, [prompt], params, tokenizer=self.tok)[0]
            text = self.tok.decode(completion.ids)
            for stop in until:  # the harness cuts at its stop strings too; do it here as well
                text = text.split(stop)[0]
            out.append(text)
        return out


def main() -> None:
    """lm-eval's command line, with the `frontierlm` model registered."""
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()
