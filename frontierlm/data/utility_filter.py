"""Per-document utility filtering: a reference pretraining run decides what the next run reads.

`frontierlm data utility` ranks a run's documents by how much its training still taught them;
this carries the same scores into the data stage, for any document, seen in training or not.
The reference run (`data.utility_filter.run`, a `runs/NAME` directory) scores each document
with its tokenizer and pretrain models, as the pretrain stage reads it (BOS, then the text,
cut into windows of the run's seq_len + 1 tokens, at most `max_tokens` predicted tokens):

  meta["utility_loss"]        mean loss under the `to_model` (nats per token)
  meta["utility_reduction"]   mean loss under `from_model` minus under `to_model`: what the
                              reference run's training between the two taught this document
                              (only with `from_model`)
  meta["utility_score"]       the reduction with `from_model`; else minus the loss (CCNet's
                              perplexity ranking: text the reference model reads easily first)

`UtilityFilter` drops by thresholds, with one reason each:
  too_hard          loss > max_loss: text the reference model cannot predict (noise, tables of
                    random ids, another language it never saw)
  already_learned   loss < min_loss: text it already knows by heart (boilerplate, repeats)
  teaches_little    reduction < min_reduction: training on its like lowered its loss little
and `UtilityTopFraction` keeps the top share of the stream by utility score (the two-pass step
of `QualityTopFraction`, reusing the score the filter stored).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from frontierlm.config import RecipeConfig, UtilityFilterConfig
from frontierlm.data.documents import Document
from frontierlm.data.pipeline import Step
from frontierlm.data.quality import QualityTopFraction


def model_files(cfg: UtilityFilterConfig) -> list[Path]:
    """The files whose content decides the scores (the data stage fingerprints them)."""
    from frontierlm.eval.utility import model_path

    run = Path(cfg.run)
    files = [run / "config.json", run / "tokenizer" / "tokenizer.json"]
    for which in (cfg.from_model, cfg.to_model):
        path = model_path(run, which) if which is not None else None
        if path is not None:  # init: rebuilt from config.json's seed
            files.append(path / "model.safetensors")
    return files


class ReferenceScorer:
    """A reference run's tokenizer and one or two of its pretrain models, scoring texts."""

    def __init__(self, cfg: UtilityFilterConfig) -> None:
        from frontierlm.eval.utility import resolve_model
        from frontierlm.tokenizer.codec import ByteCodec
        from frontierlm.tokenizer.train import BOS, load_tokenizer

        run = Path(cfg.run)
        config = run / "config.json"
        if not config.is_file():
            raise FileNotFoundError(
                f"data.utility_filter.run: {config} missing; point it at a run directory "
                "(runs/NAME) whose pretrain stage has finished"
            )
        recipe = RecipeConfig.model_validate_json(config.read_text())
        tok = load_tokenizer(run / "tokenizer")
        self.codec, self.bos = ByteCodec(tok), tok.token_to_id(BOS)
        self.seq_len, self.max_tokens = recipe.pretrain.seq_len, cfg.max_tokens
        vocab = tok.get_vocab_size()
        self.to_model = resolve_model(run, recipe, cfg.to_model, vocab)[0].eval()
        self.from_model = None
        if cfg.from_model is not None:
            self.from_model = resolve_model(run, recipe, cfg.from_model, vocab)[0].eval()

    @torch.no_grad()
    def losses(self, text: str) -> tuple[float, float | None]:
        """(mean loss under the `to` model, under the `from` model or None) in nats per
        predicted token; NaN for a text with no token to predict."""
        ids = [self.bos, *self.codec.encode_batch([text])[0]][: self.max_tokens + 1]
        if len(ids) < 2:
            return math.nan, None if self.from_model is None else math.nan
        tokens = torch.tensor(ids, dtype=torch.int64)
        totals = [0.0, 0.0]
        models = [self.to_model] + ([self.from_model] if self.from_model is not None else [])
        # Windows of seq_len + 1 tokens, each predicting seq_len, as the pretrain stage cuts.
        for start in range(0, len(ids) - 1, self.seq_len):
            window = tokens[start : start + self.seq_len + 1][None]
            for k, model in enumerate(models):
                logits = model(window[:, :-1])
                totals[k] += float(
                    torch.nn.functional.cross_entropy(
                        logits[0].float(), window[0, 1:], reduction="sum"
                    )
                )
        n = len(ids) - 1
        return totals[0] / n, (totals[1] / n if self.from_model is not None else None)

    def score(self, text: str) -> float:
        """The utility score of the module docstring (higher: keep first)."""
        loss_to, loss_from = self.losses(text)
        return -loss_to if loss_from is None else loss_from - loss_to

    def annotate(self, doc: Document) -> dict[str, Any]:
        """Score `doc` and record its losses in `doc.meta` (once: a later step reuses them)."""
        if "utility_score" not in doc.meta:
            loss_to, loss_from = self.losses(doc.text)
            doc.meta["utility_loss"] = round(loss_to, 6)
            if loss_from is not None:
                doc.meta["utility_reduction"] = round(loss_from - loss_to, 6)
            score = -loss_to if loss_from is None else loss_from - loss_to
            # NaN (nothing to predict) ranks last in the top fraction.
            doc.meta["utility_score"] = round(score, 6) if score == score else -math.inf
        return doc.meta


class UtilityFilter(Step):
    """Score each document with the reference run and drop it by the thresholds of the module
    docstring (None: that rule is off; with none set the step only scores)."""

    name = "utility"

    def __init__(
        self,
        scorer: ReferenceScorer,
        max_loss: float | None = None,
        min_loss: float | None = None,
        min_reduction: float | None = None,
    ) -> None:
        if min_reduction is not None and scorer.from_model is None:
            raise ValueError("data.utility_filter.min_reduction needs from_model")
        self.scorer = scorer
        self.max_loss, self.min_loss, self.min_reduction = max_loss, min_loss, min_reduction

    def drop_reason(self, doc: Document) -> str | None:
        meta = self.scorer.annotate(doc)
        loss = meta["utility_loss"]
        if loss != loss:  # nothing to predict: nothing to judge
            return None
        if self.max_loss is not None and loss > self.max_loss:
            return "too_hard"
        if self.min_loss is not None and loss < self.min_loss:
            return "already_learned"
        reduction = meta.get("utility_reduction")
        if self.min_reduction is not None and reduction < self.min_reduction:
            return "teaches_little"
        return None


class UtilityTopFraction(QualityTopFraction):
    """Keep the top `fraction` of the stream by utility score (reason `below_top_utility`);
    scores the documents the filter did not (it runs before, and stores them)."""

    name = "utility_top"
    score_key = "utility_score"
    reason = "below_top_utility"

    def __init__(self, scorer: ReferenceScorer, fraction: float, work_dir: Path | None = None):
        super().__init__(None, fraction, work_dir)
        self.scorer = scorer

    def observe(self, index: int, doc: Document) -> None:
        self.scorer.annotate(doc)
        super().observe(index, doc)
