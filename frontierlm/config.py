"""One typed, validated config tree for every stage, loaded from a TOML recipe.

A recipe is a TOML file whose tables mirror `RecipeConfig` below. Dotted CLI overrides
(`--model.n_layers=4`) are applied to the parsed TOML before validation, so an override is
checked exactly like the file it overrides. Any unknown key, wrong type or impossible value
raises `ConfigError` naming the key and what is allowed, before any stage starts.
"""

from __future__ import annotations

import json
import math
import re
import tomllib
from fractions import Fraction
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class ConfigError(ValueError):
    """A recipe or override that cannot run; the message names the key and what is allowed."""


class Strict(BaseModel):
    """Base of every config table: unknown keys are errors; assignments are re-validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


# ----------------------------------------------------------------------------- run


class OffloadConfig(Strict):
    """Checkpoints copied to S3-compatible storage (train/offload.py); off while bucket is unset.
    Credentials come from the environment / ~/.aws as boto3 reads them, never from the recipe."""

    bucket: str | None = Field(None, description="bucket name; None = no offload")
    endpoint_url: str | None = Field(
        None, description="S3 API endpoint (MinIO, R2, ...); None = AWS S3"
    )
    prefix: str = Field("frontierlm", description="key prefix; keys are PREFIX/RUN/STAGE/step_N/")
    region: str | None = Field(None, description="region name, where the store needs one")
    retries: int = Field(5, ge=1, description="boto3 attempts per request")


class RunConfig(Strict):
    name: str = Field("quickstart", pattern=r"^[A-Za-z0-9_.-]+$", description="run directory name")
    out_dir: str = Field("runs", description="parent of the run directory")
    seed: int = Field(1337, ge=0)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: int = Field(0, ge=0, description="torch CPU threads; 0 keeps torch's default")
    parallel: Literal["auto", "ddp", "fsdp"] = Field(
        "auto",
        description="data parallelism under torchrun (WORLD_SIZE > 1): fsdp shards parameters, "
        "gradients and optimizer state (FSDP2), ddp replicates them; auto = fsdp. One process "
        "trains the plain model whatever the choice",
    )
    peak_tflops: float | None = Field(
        None,
        gt=0,
        description="the accelerator's dense bf16 peak, for MFU; unset: looked up by GPU name "
        "(train/metrics.py), no MFU where unknown (CPUs)",
    )
    offload: OffloadConfig = Field(default_factory=OffloadConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.out_dir) / self.name


# ----------------------------------------------------------------------------- data


# Suffixes (after a .gz/.zst compression suffix is removed) that name a document format.
# Parquet is compressed inside the file, so a compressed .parquet is no format.
FORMAT_SUFFIXES: dict[str, tuple[str, ...]] = {
    "wet": (".wet",),
    "warc": (".warc",),
    "jsonl": (".jsonl", ".json"),
    "parquet": (".parquet",),
    "txt": (".txt",),
}
COMPRESSION_SUFFIXES = (".gz", ".zst")


def format_of(path: str) -> str | None:
    """The document format a file name announces, or None when its suffix names none."""
    name = path.lower()
    compressed = name.endswith(COMPRESSION_SUFFIXES)
    name = name.removesuffix(".gz").removesuffix(".zst")
    for fmt, suffixes in FORMAT_SUFFIXES.items():
        if name.endswith(suffixes) and not (compressed and fmt == "parquet"):
            return fmt
    return None


def known_suffixes() -> str:
    """FORMAT_SUFFIXES in words, for error messages."""
    listed = ", ".join(f"{'/'.join(s)} ({fmt})" for fmt, s in FORMAT_SUFFIXES.items())
    return f"{listed}; all but .parquet optionally .gz or .zst"


class DataSource(Strict):
    """One raw input: a file, a folder (read recursively) or a glob pattern of files in any of
    the formats WARC (HTML pages), WET (extracted text), JSONL (optionally .gz/.zst), Parquet or
    plain text."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    path: str = Field(
        min_length=1,
        description="a file, a folder (every file inside, recursively, in sorted order) or a glob "
        "pattern (data/**/*.jsonl.zst); relative to the current directory",
    )
    format: Literal["auto", "warc", "wet", "txt", "jsonl", "parquet"] = Field(
        "auto",
        description="auto: each file's format from its suffix (.warc, .wet, .jsonl/.json, "
        ".parquet, .txt; a single file with another suffix is text); otherwise every file "
        "is read in this format",
    )
    text_field: str = Field(
        "text", description="jsonl/parquet: the field holding the document text"
    )
    text_template: str | None = Field(
        None,
        description='jsonl/parquet: build the text from fields, e.g. "{question}\\n{answer}"',
    )
    id_field: str | None = Field(None, description="jsonl/parquet: the field holding a document id")
    split_pattern: str | None = Field(
        None,
        description="txt: regex at which a file is cut into pieces (default: one document per "
        "file)",
    )
    group_chars: int = Field(
        0, ge=0, description="txt: merge consecutive pieces until a document has this many chars"
    )
    max_docs: int | None = Field(None, ge=1, description="read at most this many documents")
    # Applied by the tokenize stage, not the data stage: regrouping or reweighting sources
    # re-encodes the curated documents but never re-reads or re-filters the raw input.
    mixture: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9_.-]+$",
        description="the token source this input counts under in the token shards and in "
        'pretrain.mixture weights (several inputs may share one, e.g. "web"); default: name',
    )
    epochs: float = Field(
        1.0,
        gt=0,
        allow_inf_nan=False,
        description="times each kept training document enters the training tokens: 2.0 every "
        "document twice, 1.5 all once plus a seeded half again, 0.3 a seeded 30%; validation "
        "documents are held out first and never repeated",
    )

    @property
    def token_source(self) -> str:
        """The token-source name this input's documents are recorded under."""
        return self.mixture or self.name

    @model_validator(mode="after")
    def _check(self) -> DataSource:
        if self.split_pattern is not None:
            try:
                re.compile(self.split_pattern)
            except re.error as err:
                raise ValueError(f"split_pattern is not a valid regex: {err}") from err
        return self

    @property
    def resolved_format(self) -> str:
        """The format of a single-file source (folders and globs resolve per file)."""
        if self.format != "auto":
            return self.format
        return format_of(self.path) or "txt"


WebFilterName = Literal["language", "url", "gopher_quality", "gopher_repetition", "c4", "fineweb"]
# FineWeb's order; build_steps runs the chosen filters in it whatever order the recipe lists.
WEB_FILTER_ORDER: tuple[str, ...] = (
    "language",
    "url",
    "gopher_repetition",
    "gopher_quality",
    "c4",
    "fineweb",
)


class LanguageFilterConfig(Strict):
    languages: list[str] = Field(
        default_factory=lambda: ["en"],
        min_length=1,
        description="ISO 639-1 codes to keep (py3langid's labels, e.g. en, de, fr)",
    )
    min_score: float = Field(0.65, ge=0.0, le=1.0, description="minimum top-language probability")

    @model_validator(mode="after")
    def _codes(self) -> LanguageFilterConfig:
        bad = [c for c in self.languages if not re.fullmatch(r"[a-z]{2,3}", c)]
        if bad:
            raise ValueError(
                f"data.language.languages: {bad} are not language codes; use lower-case ISO "
                "639-1 codes such as 'en' or 'de'"
            )
        return self


class UrlFilterConfig(Strict):
    soft_word_threshold: int = Field(
        2, ge=1, description="soft-banned words a URL needs to be dropped"
    )
    extra_domains: list[str] = Field(default_factory=list, description="more blocked domains")
    extra_banned_words: list[str] = Field(default_factory=list)
    extra_banned_subwords: list[str] = Field(default_factory=list)
    extra_soft_banned_words: list[str] = Field(default_factory=list)


Fraction01 = Annotated[float, Field(ge=0.0, le=1.0)]


class GopherConfig(Strict):
    """Gopher quality thresholds (Rae et al. 2021, datatrove's defaults)."""

    min_words: int = Field(50, ge=0)
    max_words: int = Field(100_000, ge=1)
    min_avg_word_length: float = Field(3, ge=0)
    max_avg_word_length: float = Field(10, gt=0)
    max_symbol_word_ratio: float = Field(0.1, ge=0, description="'#' or ellipses per word")
    max_bullet_lines_ratio: Fraction01 = 0.9
    max_ellipsis_lines_ratio: Fraction01 = 0.3
    min_alpha_words_ratio: Fraction01 = 0.8
    min_stop_words: int = Field(2, ge=0)

    @model_validator(mode="after")
    def _ranges(self) -> GopherConfig:
        if self.min_words > self.max_words:
            raise ValueError(
                f"data.gopher.min_words ({self.min_words}) exceeds data.gopher.max_words "
                f"({self.max_words}); every document would be dropped"
            )
        if self.min_avg_word_length > self.max_avg_word_length:
            raise ValueError(
                f"data.gopher.min_avg_word_length ({self.min_avg_word_length}) exceeds "
                f"max_avg_word_length ({self.max_avg_word_length})"
            )
        return self


class GopherRepetitionConfig(Strict):
    dup_line_frac: Fraction01 = 0.3
    dup_para_frac: Fraction01 = 0.3
    dup_line_char_frac: Fraction01 = 0.2
    dup_para_char_frac: Fraction01 = 0.2
    top_2_gram_frac: Fraction01 = 0.20
    top_3_gram_frac: Fraction01 = 0.18
    top_4_gram_frac: Fraction01 = 0.16
    dup_ngram_fracs: list[Fraction01] = Field(
        default_factory=lambda: [0.15, 0.14, 0.13, 0.12, 0.11, 0.10],
        min_length=6,
        max_length=6,
        description="limits for characters in repeated 5-, 6-, 7-, 8-, 9- and 10-grams",
    )


class C4Config(Strict):
    filter_no_terminal_punct: bool = Field(
        True, description="drop lines not ending in . ? ! \" ' (FineWeb turned this off)"
    )
    min_sentences: int = Field(5, ge=0, description="drop documents with fewer kept sentences")
    min_words_per_line: int = Field(3, ge=0)
    max_word_length: int = Field(1000, ge=1, description="drop lines with a longer word")
    remove_citations: bool = True
    filter_lorem_ipsum: bool = True
    filter_javascript: bool = True
    filter_curly_bracket: bool = True
    filter_policy: bool = True


class FineWebFilterConfig(Strict):
    line_punct_thr: Fraction01 = Field(0.12, description="min share of lines ending a sentence")
    short_line_thr: Fraction01 = Field(0.67, description="max share of short lines")
    short_line_length: int = Field(30, ge=1, description="a line this long or shorter is short")
    char_duplicates_ratio: Fraction01 = Field(0.01, description="max share of chars in dup lines")
    new_line_ratio: float = Field(0.3, ge=0.0, description="max newlines per word")


class UtilityFilterConfig(Strict):
    """`[data.utility_filter]`: documents scored by a reference run's pretrain models
    (frontierlm/data/utility_filter.py); every threshold left unset is off."""

    run: str = Field(description="the reference run directory (runs/NAME, pretrain finished)")
    from_model: str | None = Field(
        None,
        description="init | oldest | latest | STEP | DIR: with it each document's score is its "
        "loss reduction from this model to to_model; without, minus its loss under to_model",
    )
    to_model: str = Field("final", description="final | oldest | latest | STEP | DIR")
    max_loss: float | None = Field(None, gt=0, description='drop above (nats/token): "too_hard"')
    min_loss: float | None = Field(
        None, ge=0, description='drop below (nats/token): "already_learned"'
    )
    min_reduction: float | None = Field(
        None, description='drop documents whose loss reduction is below: "teaches_little"'
    )
    top_fraction: float | None = Field(
        None, gt=0.0, le=1.0, description="keep only this top share of documents by score"
    )
    max_tokens: int = Field(1024, ge=1, description="predicted tokens scored per document")

    @model_validator(mode="after")
    def _reduction_needs_from(self) -> UtilityFilterConfig:
        if self.min_reduction is not None and self.from_model is None:
            raise ValueError(
                "data.utility_filter.min_reduction needs from_model (the reduction is measured "
                'from it to to_model), e.g. from_model = "oldest"'
            )
        return self


class DataConfig(Strict):
    sources: list[DataSource] = Field(default_factory=list, min_length=1)
    min_chars: int = Field(200, ge=0, description="drop documents shorter than this (characters)")
    min_words: int = Field(30, ge=0, description="drop documents with fewer words")
    min_alpha_fraction: float = Field(
        0.5, ge=0.0, le=1.0, description="drop documents whose letters are below this share"
    )
    dedup: bool = True
    # Fuzzy dedup (FineWeb/datatrove defaults). Off by default: it changes which documents
    # the quickstart keeps, and its small corpus has no near-duplicates worth the extra pass.
    minhash: bool = Field(
        False, description="drop near-duplicates (MinHash LSH over word n-grams) after dedup"
    )
    minhash_bands: int = Field(14, ge=1, le=1024, description="LSH bands")
    minhash_rows: int = Field(8, ge=1, le=64, description="hash functions per band")
    minhash_ngram: int = Field(5, ge=1, le=64, description="words per shingle")
    minhash_seed: int = Field(1, ge=0, description="seed of the hash functions")
    minhash_verify: Literal["none", "signature", "exact"] = Field(
        "exact",
        description="what a shared LSH bucket must also show to count as a duplicate: nothing "
        "(datatrove/FineWeb), signature agreement >= minhash_threshold, or exact Jaccard of "
        "the shingle sets >= minhash_threshold (8 bytes per shingle of scratch disk)",
    )
    minhash_threshold: float = Field(
        0.8, gt=0.0, le=1.0, description="Jaccard similarity at which verify counts a duplicate"
    )
    # Line/paragraph dedup across documents (frontierlm/data/line_dedup.py). Off by default:
    # it rewrites documents, so turning it on changes what the quickstart writes.
    line_dedup: Literal["off", "line", "paragraph"] = Field(
        "off",
        description="remove lines (or blank-line-separated paragraphs) already seen in an "
        "earlier document: boilerplate such as cookie banners, menus and footers",
    )
    line_dedup_min_chars: int = Field(
        30, ge=1, description="only lines/paragraphs of at least this many normalised chars count"
    )
    # Decontamination against the eval sets shipped in data/ (frontierlm/data/decontam.py).
    # Off by default: 10 of the quickstart's GSM8K *train* problems share 13-grams with test
    # problems, so turning it on changes what the quickstart keeps.
    decontaminate: list[Literal["gsm8k_test", "humaneval", "mmlu_test"]] = Field(
        default_factory=list,
        description="eval sets whose word n-grams mark a document contaminated",
    )
    decontam_ngram: int = Field(13, ge=4, le=64, description="words per decontamination n-gram")
    decontam_mode: Literal["drop", "flag"] = Field(
        "drop", description='drop contaminated documents, or "flag": only mark meta.contaminated'
    )
    # Quality classifier (frontierlm/data/quality.py; train one with `frontierlm
    # train-classifier`). Without a model nothing is scored.
    quality_model: str | None = Field(
        None, description="directory written by `frontierlm train-classifier`"
    )
    quality_threshold: float | None = Field(
        None, ge=0.0, le=1.0, description="drop documents whose quality score is below this"
    )
    quality_top_fraction: float | None = Field(
        None, gt=0.0, le=1.0, description="keep only this top share of documents by score"
    )
    utility_filter: UtilityFilterConfig | None = Field(
        None, description="score (and filter) documents by a reference run's losses"
    )
    pii: bool = Field(False, description="replace e-mail addresses, IP addresses and phone numbers")
    shard_docs: int = Field(
        2000, ge=1, description="documents per output shard (when shard_bytes is 0)"
    )
    shard_bytes: int = Field(
        0,
        ge=0,
        description="close a shard once its uncompressed UTF-8 text reaches this many bytes "
        "(0: shard by shard_docs)",
    )
    shard_format: Literal["jsonl", "parquet"] = Field(
        "jsonl", description="output shards: gzipped JSONL or zstd-compressed Parquet"
    )
    executor: Literal["local", "ray"] = Field(
        "local",
        description="what runs the per-file tasks (reading and per-document steps): a local "
        "process pool, or Ray (pip install 'frontierlm[ray]'); the output is the same",
    )
    workers: int = Field(
        0,
        ge=0,
        description="processes (or Ray CPUs) for the per-file tasks, 0 = every core; with a "
        "single task, its HTML extraction uses them instead",
    )
    ray_address: str | None = Field(
        None, description='executor = "ray": a running cluster to join (None: start Ray here)'
    )
    # Web-text heuristics (FineWeb's set). Off by default: the quickstart's Wikipedia,
    # Shakespeare and GSM8K documents are not web pages and several rules would drop them.
    filters: list[WebFilterName] = Field(
        default_factory=list,
        description="web filters to run after the length/alpha filters, in FineWeb's order: "
        + ", ".join(WEB_FILTER_ORDER),
    )
    language: LanguageFilterConfig = Field(default_factory=LanguageFilterConfig)
    url: UrlFilterConfig = Field(default_factory=UrlFilterConfig)
    gopher: GopherConfig = Field(default_factory=GopherConfig)
    gopher_repetition: GopherRepetitionConfig = Field(default_factory=GopherRepetitionConfig)
    c4: C4Config = Field(default_factory=C4Config)
    fineweb: FineWebFilterConfig = Field(default_factory=FineWebFilterConfig)

    @model_validator(mode="after")
    def _unique_filters(self) -> DataConfig:
        repeated = sorted({f for f in self.filters if self.filters.count(f) > 1})
        if repeated:
            raise ValueError(f"data.filters lists {repeated} more than once; list each once")
        return self

    @model_validator(mode="after")
    def _unique_names(self) -> DataConfig:
        names = [s.name for s in self.sources]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"source names must be unique, repeated: {sorted(dup)}")
        return self

    @model_validator(mode="after")
    def _quality_needs_model(self) -> DataConfig:
        if self.quality_model is None and (
            self.quality_threshold is not None or self.quality_top_fraction is not None
        ):
            raise ValueError(
                "data.quality_threshold and data.quality_top_fraction need data.quality_model "
                "(a directory from `frontierlm train-classifier`)"
            )
        return self

    @model_validator(mode="after")
    def _minhash_size(self) -> DataConfig:
        # Signatures cost 8 bytes per hash function per document on disk and time linear in it.
        perms = self.minhash_bands * self.minhash_rows
        if perms > 4096:
            raise ValueError(
                f"data.minhash_bands x data.minhash_rows = {perms} hash functions; keep it at "
                "most 4096 (FineWeb uses 14 x 8 = 112)"
            )
        return self


# ----------------------------------------------------------------------------- tokenizer


class TokenizerConfig(Strict):
    """Byte-level BPE (frontierlm/tokenizer/train.py). `vocab_size` counts the core special
    tokens, the 256 bytes and the merges; the tool-role token and `reserved_special_tokens`
    slots are appended after them. 4k-256k is the range measured (benchmarks/tokenizer.py);
    smaller vocabularies are for tiny test recipes."""

    vocab_size: int = Field(4096, ge=512, le=1 << 18)
    min_frequency: int = Field(2, ge=1)
    max_train_chars: int = Field(50_000_000, ge=1, description="cap on text fed to the trainer")
    pre_tokenizer: Literal["cl100k", "o200k", "gpt2"] = Field(
        "cl100k",
        description="split regex before BPE: GPT-4's (cl100k), GPT-4o's (o200k, case-aware "
        "letter runs) or GPT-2's (whole digit runs; the baseline)",
    )
    reserved_special_tokens: int = Field(
        0, ge=0, le=1 << 16, description="<|reserved_i|> slots appended after the vocabulary"
    )


class TokenizeConfig(Strict):
    val_fraction: float = Field(0.02, gt=0.0, lt=0.5, description="documents held out for bpb")


# ----------------------------------------------------------------------------- model


class ModelConfig(Strict):
    """A Llama-style dense decoder: RMSNorm, RoPE, GQA attention, SwiGLU MLP."""

    d_model: int = Field(256, ge=8)
    n_layers: int = Field(4, ge=1)
    n_heads: int = Field(4, ge=1)
    n_kv_heads: int | None = Field(None, ge=1, description="GQA groups; default = n_heads (MHA)")
    attn_head_dim: int | None = Field(
        None,
        ge=2,
        description="width of one attention head when not d_model / n_heads (Gemma 2 2B: 256 "
        "with d_model 2304 and 8 heads)",
    )
    ffn_hidden: int | None = Field(None, ge=1, description="SwiGLU width; default ~8/3 d_model")
    rope_theta: float = Field(10000.0, gt=0)
    yarn_factor: float | None = Field(
        None, gt=1, description="YaRN context extension: max_seq_len / yarn_original_max_len"
    )
    yarn_original_max_len: int | None = Field(
        None, ge=1, description="the context the model was pretrained with (YaRN)"
    )
    yarn_beta_fast: float = Field(32.0, gt=0)
    yarn_beta_slow: float = Field(1.0, gt=0)
    yarn_mscale: float | None = Field(
        None,
        gt=0,
        description="YaRN (DeepSeek-V3: 1.0): with yarn_mscale_all_dim also set, cos and sin are "
        "scaled by m(yarn_mscale) / m(yarn_mscale_all_dim), m(c) = 0.1 c ln(factor) + 1, "
        "instead of by m(1)",
    )
    yarn_mscale_all_dim: float | None = Field(
        None,
        gt=0,
        description="YaRN (DeepSeek-V3: 1.0): with yarn_mscale, divides the cos/sin factor; "
        "under attention='mla' also multiplies the softmax scale by m(yarn_mscale_all_dim)^2",
    )
    max_seq_len: int = Field(256, ge=8)
    tie_embeddings: bool = True
    qk_norm: bool = Field(False, description="RMSNorm on q and k per head, before RoPE (Qwen3)")
    attn_gate: bool = Field(
        False, description="sigmoid gate on the attention output, per head and dim (Qwen3-Next)"
    )
    attn_softcap: float | None = Field(
        None, gt=0, description="cap * tanh(score / cap) on attention logits (Gemma 2: 50.0)"
    )
    final_softcap: float | None = Field(
        None, gt=0, description="cap * tanh(logit / cap) on output logits (Gemma 2: 30.0)"
    )
    sliding_window: int | None = Field(
        None, ge=1, description="attention span of the layers `layer_pattern` marks L (local)"
    )
    norm: Literal["pre", "sandwich"] = Field(
        "pre", description="sandwich: also normalise each branch's output (Gemma 2/3)"
    )
    rope_pattern: str = Field(
        "R",
        pattern=r"^[RN]+$",
        description='per-layer positions, repeated over the layers: R RoPE, N NoPE; "N" is '
        'NoPE everywhere, "RRRN" is RNoPE (one NoPE layer in four)',
    )
    layer_pattern: str = Field(
        "G",
        pattern=r"^[GL]+$",
        description="per-layer attention, repeated over the layers: G global, L local "
        '(sliding window); Gemma 2 is "LG"',
    )
    mlp_activation: Literal["silu", "gelu_tanh"] = Field(
        "silu",
        description="gate activation of the gated MLP: silu (SwiGLU, Llama/Qwen3) or the tanh "
        "approximation of GELU (GeGLU, Gemma)",
    )
    embed_scale: bool = Field(
        False, description="multiply the embeddings by sqrt(d_model) (Gemma, with tied weights)"
    )
    attn_scale: float | None = Field(
        None,
        gt=0,
        description="multiplier of q.k before softcap and softmax; None: head_dim**-0.5 "
        "(Gemma 2: query_pre_attn_scalar**-0.5)",
    )
    norm_eps: float = Field(1e-5, gt=0)
    init_std: float = Field(0.02, gt=0)
    attention: Literal["gqa", "mla"] = Field(
        "gqa",
        description="gqa: grouped-query attention (n_kv_heads; MHA and MQA at the ends); mla: "
        "DeepSeek-V2/V3 multi-head latent attention (keys and values expanded from one small "
        "latent per token, which is all a KV cache holds), set by the mla_* fields",
    )
    mla_q_lora_rank: int | None = Field(
        None, ge=1, description="MLA query compression rank (DeepSeek-V3: 1536); None = direct"
    )
    mla_kv_lora_rank: int | None = Field(
        None, ge=1, description="MLA key-value latent width, cached per token (DeepSeek-V3: 512)"
    )
    mla_qk_nope_head_dim: int | None = Field(
        None, ge=1, description="MLA per-head query/key dims without RoPE (DeepSeek-V3: 128)"
    )
    mla_qk_rope_head_dim: int | None = Field(
        None,
        ge=2,
        description="MLA per-head query dims with RoPE, and the width of the one rotated key all "
        "heads share (DeepSeek-V3: 64)",
    )
    mla_v_head_dim: int | None = Field(
        None, ge=1, description="MLA per-head value dims (DeepSeek-V3: 128)"
    )
    moe_experts: int = Field(0, ge=0, description="routed experts per MoE layer; 0 = dense model")
    moe_top_k: int = Field(2, ge=1, description="routed experts per token")
    moe_shared_experts: int = Field(0, ge=0, description="experts every token passes through")
    moe_expert_hidden: int | None = Field(
        None, ge=1, description="SwiGLU width of one expert; default the dense width / top_k"
    )
    moe_first_dense: int = Field(
        0, ge=0, description="the first layers stay dense (DeepSeek-V3: 3)"
    )
    moe_score: Literal["softmax", "sigmoid"] = "softmax"
    moe_norm_topk: bool = Field(
        True,
        description="rescale the chosen experts' scores to sum to 1 before mixing (Qwen3-MoE's "
        "norm_topk_prob, true in Qwen3-30B-A3B; DeepSeek-V3: true); false mixes the raw scores",
    )
    moe_routed_scale: float = Field(
        1.0,
        gt=0,
        description="factor on the routed experts' mixing weights, after any normalisation "
        "(DeepSeek-V3's routed_scaling_factor: 2.5); shared experts are not scaled",
    )
    moe_groups: int = Field(
        1,
        ge=1,
        description="group-limited routing (DeepSeek-V3's n_group: 8): the experts fall into this "
        "many equal groups and a token chooses only within its moe_topk_groups best; 1 = off",
    )
    moe_topk_groups: int = Field(
        1, ge=1, description="groups a token may choose experts from (DeepSeek-V3's topk_group: 4)"
    )
    moe_balance: Literal["aux_loss", "bias", "smebu", "none"] = "aux_loss"
    moe_aux_weight: float = Field(0.01, ge=0, description="weight of the auxiliary balance loss")
    moe_seq_aux_weight: float = Field(
        0.0,
        ge=0,
        description="weight of DeepSeek-V3's sequence-wise balance loss (any moe_balance; "
        "DeepSeek-V3: 1e-4 with bias balancing); 0 = off",
    )
    moe_bias_rate: float = Field(1e-3, ge=0, description="selection-bias step (bias balancing)")
    moe_bias_schedule: Literal["constant", "lr"] = Field(
        "constant",
        description='"lr": the bias step follows the learning-rate schedule (warmup, decay), so '
        "it shrinks as the router settles; constant: DeepSeek-V3's fixed step",
    )
    moe_bias_momentum: float = Field(0.9, ge=0, lt=1, description="smoothing of the smebu step")

    @model_validator(mode="after")
    def _shapes(self) -> ModelConfig:
        if self.attn_head_dim is None and self.d_model % self.n_heads:
            raise ValueError(
                f"n_heads={self.n_heads} must divide d_model={self.d_model} (or set "
                f"attn_head_dim); allowed n_heads: {_divisors(self.d_model)}"
            )
        if self.head_dim % 2:
            source = "attn_head_dim" if self.attn_head_dim else "head_dim = d_model/n_heads"
            raise ValueError(f"{source} = {self.head_dim} must be even for RoPE")
        if self.moe_experts and self.mlp_activation != "silu":
            # The routed experts are SiLU-gated; a GeGLU MoE is no family we export or import.
            raise ValueError(
                f"mlp_activation={self.mlp_activation!r} is for dense models; MoE experts "
                '(moe_experts > 0) use "silu"'
            )
        if self.moe_experts and self.moe_top_k > self.moe_experts:
            raise ValueError(f"moe_top_k={self.moe_top_k} exceeds moe_experts={self.moe_experts}")
        if (self.yarn_factor is None) != (self.yarn_original_max_len is None):
            raise ValueError("YaRN needs both yarn_factor and yarn_original_max_len (or neither)")
        if self.yarn_factor is None and (self.yarn_mscale or self.yarn_mscale_all_dim):
            raise ValueError("yarn_mscale and yarn_mscale_all_dim apply only with yarn_factor")
        if "L" in self.layer_pattern and self.sliding_window is None:
            raise ValueError(
                f"layer_pattern={self.layer_pattern!r} has local (L) layers: set sliding_window"
            )
        if self.n_heads % self.kv_heads:
            raise ValueError(
                f"n_kv_heads={self.n_kv_heads} must divide n_heads={self.n_heads}; "
                f"allowed: {_divisors(self.n_heads)}"
            )
        return self

    @model_validator(mode="after")
    def _moe_groups(self) -> ModelConfig:
        if self.moe_topk_groups > self.moe_groups:
            raise ValueError(
                f"moe_topk_groups={self.moe_topk_groups} exceeds moe_groups={self.moe_groups}"
            )
        if not self.moe_experts or self.moe_groups == 1:
            return self
        if self.moe_experts % self.moe_groups:
            raise ValueError(
                f"moe_groups={self.moe_groups} must divide moe_experts={self.moe_experts}; "
                f"allowed: {_divisors(self.moe_experts)}"
            )
        per_group = self.moe_experts // self.moe_groups
        if per_group < 2:  # a group scores the sum of its two best experts
            raise ValueError(
                f"moe_groups={self.moe_groups} leaves {per_group} expert per group; "
                "group-limited routing needs at least 2"
            )
        if self.moe_top_k > self.moe_topk_groups * per_group:
            raise ValueError(
                f"moe_top_k={self.moe_top_k} exceeds the {self.moe_topk_groups * per_group} "
                f"experts in moe_topk_groups={self.moe_topk_groups} groups of {per_group}"
            )
        return self

    @model_validator(mode="after")
    def _mla(self) -> ModelConfig:
        given = [name for name in _MLA_FIELDS if getattr(self, name) is not None]
        if self.attention != "mla":
            if given:
                raise ValueError(f"{', '.join(given)} apply only with attention='mla'")
            return self
        required = [name for name in _MLA_FIELDS if name != "mla_q_lora_rank"]
        missing = [name for name in required if getattr(self, name) is None]
        if missing:
            raise ValueError(
                f"attention='mla' needs {', '.join(missing)} (DeepSeek-V3: kv_lora_rank 512, "
                "qk_nope_head_dim 128, qk_rope_head_dim 64, v_head_dim 128)"
            )
        if self.mla_qk_rope_head_dim % 2:
            raise ValueError(
                f"mla_qk_rope_head_dim={self.mla_qk_rope_head_dim} must be even (RoPE)"
            )
        if self.n_kv_heads not in (None, self.n_heads):
            raise ValueError(
                f"n_kv_heads={self.n_kv_heads} has no meaning with attention='mla': every head "
                "expands its keys and values from the one shared latent; leave it unset"
            )
        for switch in ("qk_norm", "attn_gate", "attn_softcap"):
            if getattr(self, switch) not in (False, None):
                raise ValueError(f"{switch} is not implemented for attention='mla'")
        return self

    @property
    def qk_head_dim(self) -> int:
        """Per-head width of queries and keys, over which attention scores are dot products."""
        if self.attention == "mla":
            return self.mla_qk_nope_head_dim + self.mla_qk_rope_head_dim
        return self.head_dim

    @property
    def v_head_dim(self) -> int:
        return self.mla_v_head_dim if self.attention == "mla" else self.head_dim

    @property
    def rope_dim(self) -> int:
        """Per-head dimensions RoPE rotates: MLA rotates only its rope slice."""
        return self.mla_qk_rope_head_dim if self.attention == "mla" else self.head_dim

    def kv_cache_bytes_per_token(self, dtype_bytes: int = 2) -> int:
        """Bytes an inference KV cache holds per token, over all layers: keys and values of every
        KV head under GQA; under MLA only the normalised latent and the shared rotated key, from
        which every head's keys and values are recomputed (or absorbed into the query and output
        projections). Local layers hold at most `sliding_window` tokens, not counted here."""
        if self.attention == "mla":
            per_layer = self.mla_kv_lora_rank + self.mla_qk_rope_head_dim
        else:
            per_layer = 2 * self.kv_heads * self.head_dim
        return self.n_layers * per_layer * dtype_bytes

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def expert_hidden(self) -> int:
        return self.moe_expert_hidden or max(1, self.hidden // self.moe_top_k)

    def layer_is_moe(self, layer: int) -> bool:
        return self.moe_experts > 0 and layer >= self.moe_first_dense

    def layer_uses_rope(self, layer: int) -> bool:
        return self.rope_pattern[layer % len(self.rope_pattern)] == "R"

    def layer_window(self, layer: int) -> int | None:
        """The sliding window of a layer, None for a global one."""
        local = self.layer_pattern[layer % len(self.layer_pattern)] == "L"
        return self.sliding_window if local else None

    @property
    def head_dim(self) -> int:
        return self.attn_head_dim or self.d_model // self.n_heads

    @property
    def hidden(self) -> int:
        if self.ffn_hidden:
            return self.ffn_hidden
        return 64 * ((8 * self.d_model // 3 + 63) // 64)


_MLA_FIELDS = (
    "mla_q_lora_rank",
    "mla_kv_lora_rank",
    "mla_qk_nope_head_dim",
    "mla_qk_rope_head_dim",
    "mla_v_head_dim",
)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


# ----------------------------------------------------------------------------- training


class LoopConfig(Strict):
    """What every training loop (pretrain, SFT, preference) shares."""

    steps: int = Field(ge=1)
    batch_size: int = Field(
        16,
        ge=1,
        description="sequences per micro-step over all processes: under torchrun each of N "
        "processes takes batch_size / N of them (batch_size must divide by N), so the run "
        "follows the same curve at any process count",
    )
    grad_accum: int = Field(1, ge=1)
    seq_len: int = Field(256, ge=8)
    lr: float = Field(1e-3, gt=0)
    optimizer: Literal["adamw", "muon"] = Field(
        "adamw",
        description="muon: Muon on the hidden matrices (update RMS matched to AdamW, so the same "
        "lr), AdamW on embeddings, head and vectors",
    )
    muon_momentum: float = Field(0.95, ge=0, lt=1)
    min_lr_ratio: float = Field(
        0.1, ge=0, le=1, description="the schedule's floor as a share of the peak lr"
    )
    schedule: Literal["cosine", "wsd"] = Field(
        "cosine", description="cosine decay, or warmup-stable-decay (see train/schedule.py)"
    )
    decay_fraction: float = Field(
        0.2, gt=0, le=1, description="wsd: share of the steps spent decaying at the end"
    )
    decay_shape: Literal["linear", "1-sqrt"] = "linear"
    lr_batch_scaling: Literal["none", "sqrt", "linear"] = Field(
        "none",
        description="scale lr by (batch tokens / lr_reference_batch_tokens) ** 0.5 or ** 1: "
        "sqrt for Adam-type optimizers, linear for SGD-like ones",
    )
    lr_reference_batch_tokens: int | None = Field(
        None, ge=1, description="the global batch, in tokens, at which `lr` was tuned"
    )
    warmup_steps: int = Field(0, ge=0)
    weight_decay: float = Field(0.1, ge=0)
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.95, ge=0, lt=1)
    grad_clip: float = Field(1.0, ge=0, description="max global grad norm; 0 disables")
    spike_loss_factor: float = Field(
        0.0,
        ge=0,
        description="skip a step whose loss exceeds this times the rolling median; 0 = off "
        "(non-finite losses and gradient norms are always skipped)",
    )
    spike_grad_factor: float = Field(
        0.0, ge=0, description="the same for the gradient norm (before clipping); 0 = off"
    )
    spike_window: int = Field(50, ge=1, description="accepted steps the rolling median spans")
    spike_min_history: int = Field(20, ge=1, description="steps before spikes are judged")
    spike_max_skips: int = Field(
        3, ge=1, description="skips in a row that roll back to the last checkpoint"
    )
    spike_max_rollbacks: int = Field(
        5, ge=0, description="rollbacks after which the run stops with an error"
    )
    eval_every: int = Field(50, ge=1)
    eval_batches: int = Field(8, ge=1)
    checkpoint_every: int = Field(
        100,
        ge=0,
        description="steps between checkpoints (and one at the end); 0 = none, which also "
        "leaves spikes nothing to roll back to",
    )
    keep_checkpoints: int = Field(2, ge=1)
    layer_stats_every: int = Field(
        0,
        ge=0,
        description="log each layer's gradient norm and relative update norm every this many "
        "steps (an extra copy of the weights on those steps); 0 = at every evaluation",
    )
    compile: Literal["auto", "none", "blocks", "model"] = Field(
        "auto",
        description="torch.compile per transformer block (regional: one compile serves every "
        "block) and of the loss, or of the whole model (longer start-up, fusions across "
        "blocks); auto = blocks on GPU, none on CPU",
    )
    activation_checkpointing: Literal["none", "block", "selective"] = Field(
        "none",
        description="recompute activations in the backward pass to save memory: block = all of "
        "each block's, selective = all but the matmul and attention outputs",
    )
    prefetch: int = Field(
        2, ge=0, description="batches built ahead in a background thread (pinned on GPU); 0 = none"
    )
    precision: Literal["auto", "fp32", "bf16", "fp8"] = Field(
        "auto",
        description="auto: bf16 autocast on GPU, fp32 on CPU; bf16 also pays on CPUs with "
        "AVX512-BF16/AMX; fp8: the linear layers' matmuls in float8 (train/fp8.py), the rest "
        "in bf16 (master weights and optimizer state stay fp32 in every case)",
    )
    fp8_scaling: Literal["tensorwise", "rowwise"] = Field(
        "tensorwise", description="fp8 scales: one per tensor (faster) or per row (outliers)"
    )
    fp8_backward: Literal["e5m2", "e4m3"] = Field(
        "e5m2", description="fp8 format of the output gradients in the backward pass"
    )
    chunked_ce: bool = Field(
        True,
        description="token losses from hidden states and the head weight one chunk of tokens at "
        "a time, never holding the [tokens, vocab] logits (train/losses.py; >= 4x less memory "
        "at a 128k vocabulary); off: from the full logits (also when z_loss "
        "is on, which needs them; bf16 steps on CPU as fast, fp32 ~1.1x slower)",
    )
    qk_clip: float | None = Field(
        None,
        gt=0,
        description="QK-clip threshold tau (Kimi K2's MuonClip, train/qk_clip.py): after each "
        "optimizer step, heads whose largest attention logit on the step's batch (recomputed "
        "with the updated weights) exceeds tau, less a learnt margin for batch-to-batch "
        "variation, have W_q/W_k scaled down to it; the max logit per layer is logged. "
        "None = off; Kimi K2 used 100",
    )

    @model_validator(mode="after")
    def _warmup(self) -> LoopConfig:
        if self.warmup_steps >= self.steps:
            raise ValueError(f"warmup_steps={self.warmup_steps} must be below steps={self.steps}")
        if self.lr_batch_scaling != "none" and self.lr_reference_batch_tokens is None:
            raise ValueError(
                f"lr_batch_scaling={self.lr_batch_scaling!r} needs lr_reference_batch_tokens, "
                "the batch (in tokens) the learning rate was tuned at"
            )
        return self


class MixtureStage(Strict):
    """One stage of a multi-stage data mixture (`[[pretrain.mixture]]`): for its share of the
    run, each training window comes from a token source (a `data.sources` mixture name, else
    the source's name) in proportion to `weights`. Its length is `steps`, `fraction` of
    pretrain.steps, or `tokens` (rounded to whole steps); the last stage may set none of them
    and take the rest of the run."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$", description="shown in logs and metrics")
    steps: int | None = Field(None, ge=1)
    fraction: float | None = Field(None, gt=0, le=1, description="share of pretrain.steps")
    tokens: int | None = Field(
        None, ge=1, description="token budget: tokens / (batch_size * grad_accum * seq_len) steps"
    )
    weights: dict[str, Annotated[float, Field(ge=0, allow_inf_nan=False)]] | None = Field(
        None,
        description="token source name -> share of the stage's windows (normalised); unset: "
        "every token source in proportion to its training tokens (the natural mix)",
    )

    @model_validator(mode="after")
    def _check(self) -> MixtureStage:
        given = [k for k in ("steps", "fraction", "tokens") if getattr(self, k) is not None]
        if len(given) > 1:
            raise ValueError(f"set one of steps, fraction, tokens, not {' and '.join(given)}")
        if self.weights is not None and not sum(self.weights.values()) > 0:
            raise ValueError(
                f"weights {self.weights} must include a positive weight (they are normalised)"
            )
        return self

    @property
    def takes_rest(self) -> bool:
        return self.steps is None and self.fraction is None and self.tokens is None


class PretrainConfig(LoopConfig):
    steps: int = Field(300, ge=1)
    # Off for pretraining: on the GPU the compiled loss over full bf16 logits is fused and fast
    # (the chunked loss took 1.88x its time at vocab 131k on an H200), and a CPU fp32 step is
    # ~1.1x slower chunked. Turn it on when the logits do not fit (large vocab, long rows).
    chunked_ce: bool = Field(False, description=LoopConfig.model_fields["chunked_ce"].description)
    mode: Literal["local", "diloco"] = Field(
        "local",
        description='"diloco": train across the islands of the [diloco] table (as `frontierlm '
        'diloco`); "local": one process, or data parallel under torchrun',
    )
    # Pretraining loss is smooth once warm: a step at 1.5x the median is a bad batch or an
    # instability, not noise. Post-training losses (DPO) swing more; there the guard is off.
    # Gradient norms are not judged by default: an MoE router settling moves them 5x and more
    # for dozens of steps (measured on the quickstart data) with nothing wrong.
    spike_loss_factor: float = Field(
        1.5, ge=0, description=LoopConfig.model_fields["spike_loss_factor"].description
    )
    z_loss: float = Field(
        0.0, ge=0, description="weight of mean(logsumexp(logits)^2), PaLM uses 1e-4; 0 = off"
    )
    document_mask: bool = Field(
        False, description="attend only within each document of a packed window (BOS-delimited)"
    )
    mixture: list[MixtureStage] = Field(
        default_factory=list,
        description="multi-stage data mixture, in order (train/mixture.py); empty: windows of "
        "the whole token stream in one seeded order",
    )
    source_losses: bool = Field(
        True,
        description="log each token source's share of the training loss and tokens every step "
        "(loss_share.NAME, token_share.NAME in metrics.jsonl; they add up to the loss), read "
        "by `frontierlm data utility`; needs token shards that record sources",
    )

    @model_validator(mode="after")
    def _mixture(self) -> PretrainConfig:
        names = [m.name for m in self.mixture]
        if dup := sorted({n for n in names if names.count(n) > 1}):
            raise ValueError(f"mixture stage names must be unique, repeated: {dup}")
        self.mixture_ends()  # raises when the stages do not cover the run
        return self

    def mixture_ends(self) -> list[int]:
        """The data step at which each mixture stage ends (exclusive); the last is `steps`.

        Lengths accumulate exactly (fractions and token budgets as rationals) and each boundary
        is rounded once, so fractions that add up to 1 end exactly at `steps`."""
        ends: list[int] = []
        position = Fraction(0)
        step_tokens = self.batch_size * self.grad_accum * self.seq_len
        for i, stage in enumerate(self.mixture):
            key = f"mixture[{i}] ({stage.name!r})"
            last = i == len(self.mixture) - 1
            if stage.takes_rest and not last:
                raise ValueError(
                    f"{key} sets none of steps, fraction, tokens: only the last stage may "
                    "(it takes the rest of the run)"
                )
            if stage.takes_rest:
                position = Fraction(self.steps)
            elif stage.steps is not None:
                position += stage.steps
            elif stage.fraction is not None:
                position += Fraction(stage.fraction) * self.steps
            else:
                position += Fraction(stage.tokens, step_tokens)
            end = math.floor(position + Fraction(1, 2))
            if end <= (ends[-1] if ends else 0):
                raise ValueError(
                    f"{key} gets no step (it would end at step {end}): give it more steps, "
                    "a larger fraction or more tokens"
                )
            ends.append(end)
        if ends and ends[-1] != self.steps:
            raise ValueError(
                f"the mixture stages cover {ends[-1]} steps but steps={self.steps}: make them add "
                "up, or leave the last stage's steps/fraction/tokens unset so it takes the rest"
            )
        return ends


class DilocoConfig(Strict):
    """Training across islands that sync rarely (frontierlm/distributed/): `frontierlm diloco
    RECIPE`, or `pretrain.mode = "diloco"`. pretrain.batch_size stays the global batch: each of
    the islands takes batch_size / islands sequences per inner step, and each of an island's
    processes batch_size / (islands x processes_per_island) of them."""

    islands: int = Field(4, ge=1, description="M: islands")
    processes_per_island: int = Field(
        1,
        ge=1,
        description="K: processes per island, data parallel inside it as a torchrun job "
        "(run.parallel: DDP or FSDP2); the outer exchange goes between islands only",
    )
    inner_steps: int = Field(50, ge=1, description="H: inner steps between outer syncs")
    mode: Literal["sync", "async"] = Field(
        "sync",
        description="sync: DiLoCo / Streaming DiLoCo, the islands meet at every sync; async: "
        "decoupled islands that never wait, with a staleness-weighted outer step",
    )
    outer_lr: float = Field(0.7, gt=0, description="outer Nesterov SGD learning rate")
    outer_momentum: float = Field(0.9, ge=0, lt=1)
    fragments: int = Field(
        1, ge=1, description="P: Streaming DiLoCo fragments synced at staggered steps; 1 = plain"
    )
    overlap: int = Field(
        0,
        ge=0,
        description="inner steps an exchange runs in the background before its result is "
        "applied (Streaming DiLoCo's tau); must be below inner_steps / fragments",
    )
    codec: Literal["fp32", "bf16", "int8", "int4"] = Field(
        "fp32", description="outer gradients on the wire; int8/int4 with one scale per block"
    )
    block_size: int = Field(128, ge=2, description="values per quantisation scale")
    staleness_power: float = Field(
        1.0,
        ge=0,
        description="async: a contribution s rounds later than round-robin weighs (1 + s)^-p",
    )
    dynamic_inner_steps: bool = Field(
        True, description="async: a slower island syncs after H / slowdown steps"
    )
    timeout_s: float = Field(60.0, gt=0, description="async: drop an island silent this long")
    rejoin_wait_s: float = Field(
        0.0, ge=0, description="async: how long the run waits for a dropped island to return"
    )
    bandwidth_mbit: list[float] = Field(
        default_factory=lambda: [0.0],
        description="simulated WAN bandwidth per island, Mbit/s (one value for all); 0 = none",
    )
    latency_ms: list[float] = Field(default_factory=lambda: [0.0], description="per exchange")
    slowdown: list[float] = Field(
        default_factory=lambda: [1.0],
        description="compute slowdown per island (3 = a step takes 3x as long)",
    )
    threads: int = Field(1, ge=0, description="torch CPU threads per island; 0 = torch default")

    @model_validator(mode="after")
    def _per_island(self) -> DilocoConfig:
        for key in ("bandwidth_mbit", "latency_ms", "slowdown"):
            values = getattr(self, key)
            if len(values) not in (1, self.islands):
                raise ValueError(
                    f"diloco.{key} has {len(values)} values for {self.islands} islands: give "
                    "one value for all, or one per island"
                )
        if any(s < 1 for s in self.slowdown):
            raise ValueError("diloco.slowdown values must be >= 1 (1 = full speed)")
        if self.fragments > 1 and self.mode == "async":
            raise ValueError("diloco.fragments > 1 (streaming) applies to mode = 'sync' only")
        if self.overlap and self.overlap >= self.inner_steps // self.fragments:
            raise ValueError(
                f"diloco.overlap={self.overlap} must be below inner_steps / fragments "
                f"= {self.inner_steps // self.fragments}"
            )
        return self


class ChatSource(Strict):
    """Conversations for SFT or preference pairs.

    format "qa": one user turn from `prompt_field`, one assistant turn from `response_field`.
    format "hh": Anthropic HH text with "\\n\\nHuman:" / "\\n\\nAssistant:" turns in `chosen`
    (and `rejected` for preference pairs).
    `take` selects a seeded hash range of the file's records, so splits never overlap.
    """

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    path: str
    format: Literal["qa", "hh"]
    prompt_field: str = "question"
    response_field: str = "answer"
    take: tuple[float, float] = (0.0, 1.0)
    max_examples: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _take(self) -> ChatSource:
        lo, hi = self.take
        if not 0.0 <= lo < hi <= 1.0:
            raise ValueError(f"take={list(self.take)} must satisfy 0 <= lo < hi <= 1")
        return self


class SFTConfig(LoopConfig):
    steps: int = Field(150, ge=1)
    # Fine-tuning moves a trained model a little: a third of pretraining's default peak.
    lr: float = Field(3e-4, gt=0)
    sources: list[ChatSource] = Field(default_factory=list, min_length=1)
    val_fraction: float = Field(0.05, gt=0, lt=0.5)
    packing: bool = Field(
        False,
        description="pack several chats into each seq_len row (first-fit), each attending only "
        "within itself (document masking); fewer padding tokens per step",
    )


class AlignConfig(LoopConfig):
    steps: int = Field(100, ge=1)
    lr: float = Field(5e-5, gt=0)
    loss_type: Literal[
        "sigmoid", "ipo", "robust", "hinge", "apo_zero", "apo_down", "bco_pair", "nca_pair",
        "sppo_hard", "kto", "orpo", "simpo",
    ] = Field(
        "sigmoid",
        description="TRL 1.16's names and formulas (posttrain/preference.py): sigmoid = DPO, ipo, "
        "robust, hinge, apo_zero, apo_down, bco_pair, nca_pair, sppo_hard against the SFT model; "
        "kto on unpaired chosen (desirable) and rejected (undesirable) replies; orpo and simpo "
        "without a reference model",
    )  # fmt: skip
    beta: float = Field(
        0.1,
        gt=0,
        description="TRL's beta: DPO family and KTO 0.1; ORPO's lambda 0.1; SimPO 2.0-2.5",
    )
    label_smoothing: float = Field(
        0.0, ge=0, lt=0.5, description="sigmoid: conservative DPO; robust: assumed label noise"
    )
    simpo_gamma: float = Field(0.5, ge=0, description="simpo: target reward margin")
    desirable_weight: float = Field(1.0, gt=0, description="kto: weight of desirable examples")
    undesirable_weight: float = Field(1.0, gt=0, description="kto: weight of undesirable ones")
    precompute_ref: bool = Field(
        True,
        description="reference log-probs of every pair computed once before training and cached "
        "in the stage directory, then the reference model is freed; off: a frozen copy runs "
        "beside the policy at every step",
    )
    sources: list[ChatSource] = Field(default_factory=list, min_length=1)
    val_fraction: float = Field(0.1, gt=0, lt=0.5)

    @model_validator(mode="after")
    def _pairs(self) -> AlignConfig:
        bad = [s.name for s in self.sources if s.format != "hh"]
        if bad:
            raise ValueError(f"preference sources need format 'hh' (chosen/rejected): {bad}")
        return self


class ArithmeticTaskConfig(Strict):
    """Procedural arithmetic (posttrain/arithmetic.py): 'What is 17 + 25?' -> '#### 42'."""

    digits: int = Field(1, ge=1, le=6, description="operands have up to this many digits")
    operators: str = Field("+", pattern=r"^[+*-]+$", description="drawn from '+-*'")
    terms: int = Field(2, ge=2, le=6)
    seed: int = Field(1, ge=0, description="problem stream of the RL prompts (SFT: use another)")


class RLTaskConfig(Strict):
    """Where the RL prompts and their reference answers come from."""

    kind: Literal["arithmetic", "gsm8k"] = "arithmetic"
    arithmetic: ArithmeticTaskConfig = Field(default_factory=ArithmeticTaskConfig)
    gsm8k_path: str = Field("data/gsm8k/train.jsonl.gz", description="question/answer JSONL")
    gsm8k_max_prompts: int | None = Field(None, ge=1)
    eval_prompts: int = Field(
        64, ge=1, description="held-out prompts for the greedy and sampled evaluation"
    )
    eval_samples: int = Field(
        4, ge=0, description="samples per held-out prompt for the sampled mean reward; 0 = none"
    )


class RewardModelConfig(LoopConfig):
    """A Bradley-Terry reward model (posttrain/reward_model.py), trained from the SFT model on
    preference pairs when `rl.rewards` names "reward_model" and `path` is unset."""

    path: str | None = Field(None, description="a trained reward model directory to load")
    steps: int = Field(50, ge=1)
    lr: float = Field(1e-4, gt=0)
    batch_size: int = Field(8, ge=1)
    sources: list[ChatSource] = Field(default_factory=list)


class RLConfig(LoopConfig):
    """RL with verifiable or model rewards (posttrain/rl.py). Each optimizer step trains on
    `batch_size * grad_accum` completions: `num_generations` samples of each of
    `batch_size * grad_accum / num_generations` prompts; a rollout batch serves
    `num_iterations` steps. Defaults follow TRL 1.16's GRPOConfig."""

    steps: int = Field(100, ge=1)
    lr: float = Field(1e-6, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    seq_len: int = Field(
        256, ge=8, description="unused by rl (prompt + max_new_tokens must fit max_seq_len)"
    )
    prefetch: int = Field(
        0, ge=0, le=0, description="must be 0: rollouts come from the model being trained"
    )
    init: str = Field(
        "sft", description="'sft' (the run's SFT model) or a FrontierLM model directory"
    )
    algorithm: Literal["grpo", "ppo"] = "grpo"
    loss_type: Literal["grpo", "dr_grpo", "dapo", "bnpo"] = Field(
        "dapo", description="how per-token losses are aggregated (TRL's names and formulas)"
    )
    num_generations: int = Field(8, ge=2, description="G: completions per prompt")
    num_iterations: int = Field(1, ge=1, description="optimizer steps per rollout batch")
    epsilon_low: float = Field(0.2, gt=0, lt=1)
    epsilon_high: float | None = Field(
        None, gt=0, description="upper clip; unset = epsilon_low (TRL); DAPO uses 0.28"
    )
    beta: float = Field(
        0.0, ge=0, description="KL weight: k3 per token in the loss (GRPO), in the reward (PPO)"
    )
    ref_sync_every: int = Field(
        0, ge=0, description="copy the policy into the reference every N steps; 0 = never"
    )
    scale_rewards: Literal["group", "batch", "none"] | None = Field(
        None, description="advantage std normalisation; unset: none for dr_grpo, else group"
    )
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    max_new_tokens: int = Field(64, ge=1, description="max completion length (stop included)")
    mask_truncated: bool = Field(False, description="no loss on completions that hit the limit")
    dynamic_sampling: bool = Field(
        False, description="DAPO: drop all-correct/all-wrong groups and sample more prompts"
    )
    max_refills: int = Field(3, ge=0, description="extra rollout rounds for dynamic sampling")
    overlong_buffer: int = Field(
        0, ge=0, description="DAPO soft overlong punishment over the last N tokens; 0 = off"
    )
    length_penalty: float = Field(
        0.0, ge=0, description="reward -= this * completion length / max_new_tokens"
    )
    rewards: dict[str, float] = Field(
        default_factory=lambda: {"exact_match": 1.0},
        min_length=1,
        description="reward function name -> weight (posttrain/rewards.py REWARD_FUNCTIONS, "
        "or reward_model)",
    )
    reward_model: RewardModelConfig | None = None
    gamma: float = Field(1.0, ge=0, le=1, description="PPO: discount")
    lam: float = Field(0.95, ge=0, le=1, description="PPO: GAE lambda")
    vf_coef: float = Field(0.1, ge=0, description="PPO: value loss weight")
    cliprange_value: float = Field(0.2, gt=0, description="PPO: value clip")
    task: RLTaskConfig = Field(default_factory=RLTaskConfig)

    @model_validator(mode="after")
    def _groups(self) -> RLConfig:
        rollout = self.batch_size * self.grad_accum
        if rollout % self.num_generations:
            raise ValueError(
                f"batch_size * grad_accum = {rollout} completions per step must divide by "
                f"num_generations={self.num_generations} (whole groups per step)"
            )
        if self.batch_size % self.num_generations:
            raise ValueError(
                f"batch_size={self.batch_size} must divide by num_generations="
                f"{self.num_generations}: a micro-batch holds whole groups"
            )
        if "reward_model" in self.rewards and self.reward_model is None:
            raise ValueError("rewards names reward_model: add an [rl.reward_model] table")
        if self.overlong_buffer >= self.max_new_tokens:
            raise ValueError(
                f"overlong_buffer={self.overlong_buffer} must be below max_new_tokens="
                f"{self.max_new_tokens}"
            )
        return self

    @property
    def advantage_scale(self) -> str:
        if self.scale_rewards is not None:
            return self.scale_rewards
        return "none" if self.loss_type == "dr_grpo" else "group"


class EvalConfig(Strict):
    bpb_batches: int = Field(32, ge=1, description="batches of validation tokens for bpb")
    prompts: list[str] = Field(default_factory=lambda: ["The meaning of life is"])
    chat_prompts: list[str] = Field(default_factory=lambda: ["What is 12 plus 30?"])
    max_new_tokens: int = Field(48, ge=1)
    tasks: list[str] = Field(
        default_factory=list,
        description="evaluation tasks: names of shipped specs (frontierlm/eval/tasks/*.toml: "
        "mmlu, mmlu_cloze, gsm8k, gsm8k_chat, gsm8k_pass, humaneval, wikitext2, arithmetic_word) "
        "or paths to your own .toml specs",
    )
    task_models: list[Literal["pretrain", "sft", "align"]] = Field(
        default_factory=lambda: ["pretrain", "sft", "align"],
        min_length=1,
        description="the run's models every task is evaluated on",
    )
    task_limit: int | None = Field(None, ge=1, description="at most this many items per task")
    task_limits: dict[str, Annotated[int, Field(ge=1)]] = Field(
        default_factory=dict, description="task name -> item limit, over task_limit"
    )
    task_batch_size: int = Field(16, ge=1, description="sequences per forward pass when scoring")

    @model_validator(mode="after")
    def _tasks(self) -> EvalConfig:
        from frontierlm.eval.tasks import EvalTaskError, load_spec

        names = []
        for i, task in enumerate(self.tasks):
            try:
                names.append(load_spec(task).name)
            except EvalTaskError as err:
                raise ValueError(f"eval.tasks[{i}]: {err}") from None
        if dup := sorted({n for n in names if names.count(n) > 1}):
            raise ValueError(f"eval.tasks: task names repeat: {dup}")
        if unknown := sorted(set(self.task_limits) - set(names)):
            raise ValueError(f"eval.task_limits: {unknown} are not in eval.tasks {names}")
        return self


class SynthConfig(Strict):
    """`frontierlm synth`: sample from a model, score, keep the best accepted sample per item.

    mode "verify": prompts -> `samples` replies each -> scored by `scorer` -> the best reply
    scoring >= `threshold` kept as a question/answer chat (sft's "qa" format); an item with none
    is sampled again, at most `max_regenerations` times. mode "rephrase": passages -> the model
    rephrases each -> replies inside the n-gram fidelity bounds kept as documents."""

    mode: Literal["verify", "rephrase"] = "verify"
    source: str = Field(min_length=1, description="JSONL (.gz/.xz) of prompts or passages")
    prompt_field: str = Field("question", description="verify: the field holding the prompt")
    reference_field: str = Field("answer", description="verify: the reference (#### N) field")
    text_field: str = Field("text", description="rephrase: the field holding the passage")
    take: tuple[float, float] = Field(
        (0.0, 1.0),
        description="a seeded hash range of the source's records (as sft sources take theirs)",
    )
    max_items: int | None = Field(None, ge=1, description="use at most this many source items")
    model: Literal["pretrain", "sft", "align"] = Field("sft", description="which model samples")
    scorer: Literal["exact_match", "exact_match_steps", "dpo_reward"] = Field(
        "exact_match",
        description="exact_match: 1 when the reply's final number equals the reference's (GSM8K "
        "verifier), else 0; exact_match_steps: that, and every calculation the reply writes "
        "(`7 + 5 = 12`, `<<48/2=24>>`) is right; dpo_reward: the align model's implicit "
        "reward against the SFT model, beta * (log p_align - log p_sft) of the reply",
    )
    threshold: float = Field(1.0, description="keep a reply only if its score is >= this")
    samples: int = Field(4, ge=1, description="replies sampled per item per round")
    max_regenerations: int = Field(
        2, ge=0, le=2, description="extra rounds for an item with no accepted reply (Kimi K2: 2)"
    )
    temperature: float = Field(0.8, gt=0)
    top_p: float = Field(0.95, gt=0, le=1)
    max_new_tokens: int = Field(200, ge=1)
    batch_items: int = Field(16, ge=1, description="source items sampled together")
    dedup_against_sft: bool = Field(
        True, description="drop replies whose chat already is in sft.sources (normalised text)"
    )
    rephrase_prompt: str = Field(
        "Rephrase the following passage in your own words, keeping every fact:\n\n{text}",
        description="rephrase: the user turn, {text} is the passage",
    )
    min_word_recall: float = Field(
        0.5, ge=0, le=1, description="rephrase: share of the passage's distinct words kept"
    )
    max_ngram_copy: float = Field(
        0.7, ge=0, le=1, description="rephrase: most of the reply's word n-grams found verbatim"
    )
    copy_ngram: int = Field(4, ge=1, description="rephrase: n of the copy check")

    @model_validator(mode="after")
    def _check(self) -> SynthConfig:
        lo, hi = self.take
        if not 0.0 <= lo < hi <= 1.0:
            raise ValueError(f"take={list(self.take)} must satisfy 0 <= lo < hi <= 1")
        return self


class SynthSFTConfig(SFTConfig):
    """`frontierlm synth_sft`: the SFT model fine-tuned on the synth stage's kept replies
    (rejection-sampling fine-tuning: one STaR iteration), then greedy exact match on held-out
    problems before (the SFT model) and after, item by item."""

    steps: int = Field(100, ge=1)
    sources: list[ChatSource] = Field(
        default_factory=list,
        description="chats trained on besides synth/synth.jsonl (RFT mixes in the SFT data)",
    )
    heldout_task: str = Field(
        description="an exact_match eval task (a shipped spec's name, e.g. arithmetic_word, or a "
        ".toml path) scored before and after; keep its items out of the synth prompts"
    )
    heldout_limit: int | None = Field(None, ge=1, description="at most this many held-out items")

    @model_validator(mode="after")
    def _heldout(self) -> SynthSFTConfig:
        from frontierlm.eval.tasks import EvalTaskError, load_spec

        try:
            spec = load_spec(self.heldout_task)
        except EvalTaskError as err:
            raise ValueError(f"heldout_task: {err}") from None
        if spec.kind != "exact_match":
            raise ValueError(
                f"heldout_task {self.heldout_task!r} is a {spec.kind} task; it must be "
                "exact_match (greedy answers checked against the reference)"
            )
        return self


class RecipeConfig(Strict):
    run: RunConfig = Field(default_factory=RunConfig)
    data: DataConfig
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig)
    tokenize: TokenizeConfig = Field(default_factory=TokenizeConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    pretrain: PretrainConfig = Field(default_factory=PretrainConfig)
    diloco: DilocoConfig = Field(default_factory=DilocoConfig)
    sft: SFTConfig
    align: AlignConfig
    rl: RLConfig | None = Field(None, description="the rl stage runs only with an [rl] table")
    eval: EvalConfig = Field(default_factory=EvalConfig)
    synth: SynthConfig | None = Field(
        None, description="synthetic data (`frontierlm synth`); the stage runs only when set"
    )
    synth_sft: SynthSFTConfig | None = Field(
        None, description="SFT on the synth output with a held-out before/after; needs [synth]"
    )

    @model_validator(mode="after")
    def _synth_sft_needs_verified_chats(self) -> RecipeConfig:
        if self.synth_sft is None:
            return self
        if self.synth is None:
            raise ValueError("synth_sft trains on the synth stage's output: add a [synth] table")
        if self.synth.mode != "verify":
            raise ValueError(
                f"synth_sft trains on question/answer chats, which synth.mode = 'verify' writes; "
                f"synth.mode is {self.synth.mode!r}"
            )
        if self.synth_sft.seq_len > self.model.max_seq_len:
            raise ValueError(
                f"synth_sft.seq_len={self.synth_sft.seq_len} exceeds "
                f"model.max_seq_len={self.model.max_seq_len}"
            )
        return self

    @model_validator(mode="after")
    def _seq_fits(self) -> RecipeConfig:
        if self.rl is not None and self.rl.max_new_tokens >= self.model.max_seq_len:
            raise ValueError(
                f"rl.max_new_tokens={self.rl.max_new_tokens} leaves no room for a prompt in "
                f"model.max_seq_len={self.model.max_seq_len}"
            )
        for stage in ("pretrain", "sft", "align"):
            seq = getattr(self, stage).seq_len
            if seq > self.model.max_seq_len:
                raise ValueError(
                    f"{stage}.seq_len={seq} exceeds model.max_seq_len={self.model.max_seq_len}"
                )
        return self

    @model_validator(mode="after")
    def _qk_clip_needs_no_norm(self) -> RecipeConfig:
        for stage in ("pretrain", "sft", "align"):
            if getattr(self, stage).qk_clip is not None and self.model.qk_norm:
                raise ValueError(
                    f"{stage}.qk_clip is set with model.qk_norm = true: the norm undoes any "
                    "rescaling of W_q/W_k (and already bounds the logits); unset one of them"
                )
        return self

    @model_validator(mode="after")
    def _mixture_sources(self) -> RecipeConfig:
        # Caught here, before any stage runs; the pretrain stage checks again against the
        # sources that survived into the token shards (a source can be filtered away whole).
        known = list(dict.fromkeys(s.token_source for s in self.data.sources))
        grouped = {s.name: s.token_source for s in self.data.sources if s.mixture}
        for i, stage in enumerate(self.pretrain.mixture):
            for name in stage.weights or {}:
                if name not in known:
                    hint = (
                        f" (input {name!r} counts under data.sources mixture {grouped[name]!r})"
                        if name in grouped
                        else ""
                    )
                    raise ValueError(
                        f"pretrain.mixture[{i}].weights.{name}: no token source is called "
                        f"{name!r}{hint}; the token sources (each data source's mixture, else "
                        f"its name) are {', '.join(known)}"
                    )
        return self

    def token_sources_json(self) -> dict[str, Any]:
        """What the tokenize stage reads from outside its own table: which token source each
        input counts under, its epochs, and the seed that picks fractional epochs."""
        return {
            "seed": self.run.seed,
            "sources": {
                s.name: {"mixture": s.token_source, "epochs": s.epochs} for s in self.data.sources
            },
        }

    def section_json(self, *names: str) -> str:
        """Canonical JSON of some top-level tables: what a stage's fingerprint hashes."""
        dump = self.model_dump(mode="json")
        # Mixture names and epochs belong to the tokenize stage (its "token_sources" section):
        # left out of "data", changing them leaves the curated documents current, and recipes
        # without them keep the fingerprints they had before the fields existed.
        for source in dump["data"]["sources"]:
            source.pop("mixture")
            source.pop("epochs")
        # Where checkpoints are copied changes no result: not part of any fingerprint.
        dump["run"].pop("offload")
        dump["token_sources"] = self.token_sources_json()
        if dump["pretrain"]["mode"] == "local":  # recipes from before the field keep their hash
            dump["pretrain"].pop("mode")
        if dump["diloco"]["processes_per_island"] == 1:  # likewise, runs of one-process islands
            dump["diloco"].pop("processes_per_island")
        return json.dumps({n: dump[n] for n in names}, sort_keys=True)


# ----------------------------------------------------------------------------- loading


def parse_override(text: str) -> tuple[list[str], Any]:
    """`model.n_layers=4` -> (["model", "n_layers"], 4). Values are parsed as TOML values,
    falling back to a bare string, so `--run.name=test` and `--model.rope_theta=5e5` both work."""
    key, sep, raw = text.removeprefix("--").partition("=")
    if not sep or not key:
        raise ConfigError(f"override {text!r} must look like --section.key=value")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key.split("."), value


def apply_overrides(tree: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for text in overrides:
        path, value = parse_override(text)
        node = tree
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {text!r}: {part!r} is a value, not a table")
            node = child
        node[path[-1]] = value
    return tree


def _format_errors(err: ValidationError, origin: str) -> str:
    lines = [f"invalid config in {origin}:"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling; see frontierlm/config.py for allowed keys)"
        elif e["type"] == "missing":
            msg = "required key is missing"
        elif "input" in e and not isinstance(e["input"], dict):
            msg += f" (got {e['input']!r})"
        lines.append(f"  {key}: {msg}")
    return "\n".join(lines)


def merge_tables(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """`override` on top of `base`: tables merge key by key, anything else (values, arrays,
    arrays of tables such as data.sources) is replaced whole. An empty table (`x = {}`) clears
    the base's, the one way a variant can drop entries such as eval.task_limits."""
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and value and isinstance(merged.get(key), dict):
            merged[key] = merge_tables(merged[key], value)
        else:
            merged[key] = value
    return merged


def read_recipe(path: Path, chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A recipe's TOML tree, with its `base = "other.toml"` (a path relative to the recipe)
    read first and overridden by the recipe's own keys, so a variant states only what differs."""
    if not path.is_file():
        raise ConfigError(f"recipe {path} does not exist (try recipes/quickstart.toml)")
    try:
        tree = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"recipe {path} is not valid TOML: {err}") from err
    base = tree.pop("base", None)
    if base is None:
        return tree
    if not isinstance(base, str):
        raise ConfigError(
            f'recipe {path}: base must be a path string, e.g. base = "quickstart.toml"'
        )
    base_path = (path.parent / base).resolve()
    if base_path in chain or base_path == path.resolve():
        cycle = " -> ".join(str(p) for p in (*chain, path.resolve(), base_path))
        raise ConfigError(f"recipe {path}: base recipes form a cycle: {cycle}")
    if not base_path.is_file():
        raise ConfigError(f"recipe {path}: base = {base!r} names no file ({base_path})")
    return merge_tables(read_recipe(base_path, (*chain, path.resolve())), tree)


def load_config(path: str | Path, overrides: list[str] | None = None) -> RecipeConfig:
    path = Path(path)
    tree = read_recipe(path)
    apply_overrides(tree, overrides or [])
    try:
        return RecipeConfig.model_validate(tree)
    except ValidationError as err:
        origin = str(path) + (f" with overrides {overrides}" if overrides else "")
        raise ConfigError(_format_errors(err, origin)) from None
