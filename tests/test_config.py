from pathlib import Path

import pytest

from frontierlm.config import ConfigError, load_config, parse_override

QUICKSTART = Path(__file__).resolve().parents[1] / "recipes" / "quickstart.toml"


def test_quickstart_loads_with_typed_values():
    cfg = load_config(QUICKSTART)
    assert cfg.run.name == "quickstart"
    assert cfg.model.kv_heads == 3 and cfg.model.head_dim == 64
    assert [s.resolved_format for s in cfg.data.sources][:4] == ["warc", "warc", "warc", "jsonl"]
    assert cfg.sft.sources[1].take == (0.0, 0.4)


def test_dotted_overrides_are_parsed_as_toml_values():
    cfg = load_config(
        QUICKSTART,
        [
            "--model.n_layers=2",
            "--run.name=abc",
            "--pretrain.lr=5e-4",
            "--model.tie_embeddings=false",
        ],
    )
    assert cfg.model.n_layers == 2 and cfg.run.name == "abc"
    assert cfg.pretrain.lr == 5e-4 and cfg.model.tie_embeddings is False
    assert parse_override("--eval.prompts=['a', 'b']") == (["eval", "prompts"], ["a", "b"])


@pytest.mark.parametrize(
    "override,expected",
    [
        ("--model.n_layer=4", "model.n_layer: unknown key"),
        ("--model.n_layers=four", "model.n_layers: Input should be a valid integer"),
        ("--model.n_heads=5", "n_heads=5 must divide d_model=192"),
        ("--model.n_kv_heads=2", "n_kv_heads=2 must divide n_heads=3"),
        ("--model.attn_head_dim=7", "attn_head_dim = 7 must be even for RoPE"),
        ("--model.mlp_activation=relu", "model.mlp_activation: Input should be 'silu'"),
        ("--pretrain.seq_len=512", "pretrain.seq_len=512 exceeds model.max_seq_len=256"),
        ("--pretrain.warmup_steps=1000", "warmup_steps=1000 must be below steps"),
        ("--sft.sources=[]", "sft.sources: List should have at least 1 item"),
        ("--bogus.key=1", "bogus: unknown key"),
        ("--run.name=a/b", "run.name: String should match pattern"),
        (
            "--pretrain.mixture=[{name='a', weights={wiki=1.0}}]",
            "pretrain.mixture[0].weights.wiki: no token source is called 'wiki'; the token "
            "sources (each data source's mixture, else its name) are python-docs, commoncrawl, "
            "commoncrawl-2, cc-extracted, wikipedia, shakespeare, gsm8k",
        ),
        ("--pretrain.mixture=[{name='a', steps=10}]", "cover 10 steps but steps=500"),
        ("--pretrain.mixture=[{name='a', weights={gsm8k=0}}]", "must include a positive weight"),
        (
            "--data.sources=[{name='a', path='d', epochs=0}]",
            "epochs: Input should be greater than 0",
        ),
        ("--data.sources=[{name='a', path='d', mixture='a b'}]", "mixture: String should match"),
    ],
)
def test_bad_values_fail_naming_the_key(override, expected):
    with pytest.raises(ConfigError) as info:
        load_config(QUICKSTART, [override])
    assert expected in str(info.value)
    assert str(QUICKSTART) in str(info.value)


def test_bad_recipe_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml")
    broken = tmp_path / "broken.toml"
    broken.write_text("[model\nd_model = 3")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(broken)
    with pytest.raises(ConfigError, match=r"must look like --section\.key=value"):
        load_config(QUICKSTART, ["--model.n_layers"])


def test_recipe_inherits_from_its_base_and_overrides_tables_key_by_key(tmp_path):
    (tmp_path / "base.toml").write_text(
        f'base = "{QUICKSTART}"\n[model]\nd_model = 96\nn_heads = 3\nn_layers = 3\n'
    )
    (tmp_path / "variant.toml").write_text(
        'base = "base.toml"\n[run]\nname = "variant"\n[model]\nn_layers = 5\n'
    )
    cfg = load_config(tmp_path / "variant.toml", ["--model.qk_norm=true"])
    assert cfg.run.name == "variant"
    assert (cfg.model.d_model, cfg.model.n_heads, cfg.model.n_layers) == (96, 3, 5)
    assert cfg.model.qk_norm and cfg.model.max_seq_len == 256  # from the quickstart, two up
    assert len(cfg.data.sources) == len(load_config(QUICKSTART).data.sources)
    # An empty table clears the base's (a non-empty one would merge into it).
    (tmp_path / "cleared.toml").write_text(
        'base = "base.toml"\n[eval]\ntasks = ["mmlu"]\ntask_limits = {}\n'
    )
    assert load_config(tmp_path / "cleared.toml").eval.task_limits == {}
    (tmp_path / "loop.toml").write_text('base = "loop.toml"\n')
    with pytest.raises(ConfigError, match="cycle"):
        load_config(tmp_path / "loop.toml")
    (tmp_path / "orphan.toml").write_text('base = "missing.toml"\n')
    with pytest.raises(ConfigError, match="names no file"):
        load_config(tmp_path / "orphan.toml")


@pytest.mark.parametrize(
    "path,fmt",
    [
        ("a/b.warc.gz", "warc"),
        ("crawl.warc.wet.gz", "wet"),
        ("x.wet", "wet"),
        ("x.JSONL.zst", "jsonl"),
        ("x.json", "jsonl"),
        ("x.parquet", "parquet"),
        ("x.parquet.gz", None),  # Parquet compresses inside the file
        ("notes.txt.gz", "txt"),
        ("notes.md", None),
    ],
)
def test_format_from_suffix(path, fmt):
    from frontierlm.config import DataSource, format_of

    assert format_of(path) == fmt
    assert DataSource(name="s", path=path).resolved_format == (fmt or "txt")


def test_data_source_and_shard_validation():
    from pydantic import ValidationError

    from frontierlm.config import DataConfig, DataSource

    assert DataSource(name="s", path="d", format="parquet").resolved_format == "parquet"
    with pytest.raises(ValidationError, match="format"):
        DataSource(name="s", path="d", format="csv")
    with pytest.raises(ValidationError, match="path"):
        DataSource(name="s", path="")
    cfg = DataConfig(sources=[DataSource(name="s", path="d")])
    assert (cfg.shard_bytes, cfg.shard_format) == (0, "jsonl")
    with pytest.raises(ValidationError, match="shard_format"):
        DataConfig(sources=[DataSource(name="s", path="d")], shard_format="csv")
    with pytest.raises(ValidationError, match="shard_bytes"):
        DataConfig(sources=[DataSource(name="s", path="d")], shard_bytes=-1)


MIXTURE = QUICKSTART.with_name("quickstart-mixture.toml")


def test_mixture_names_are_the_token_sources_weights_may_name():
    cfg = load_config(MIXTURE)
    assert [s.token_source for s in cfg.data.sources] == ["web"] * 4 + [
        "wikipedia",
        "shakespeare",
        "gsm8k",
    ]
    assert {s.name: s.epochs for s in cfg.data.sources if s.epochs != 1.0} == {
        "wikipedia": 2.0,
        "gsm8k": 0.5,
    }
    with pytest.raises(ConfigError) as info:
        load_config(MIXTURE, ["--pretrain.mixture=[{name='a', weights={commoncrawl=1.0}}]"])
    assert (
        "pretrain.mixture[0].weights.commoncrawl: no token source is called 'commoncrawl' "
        "(input 'commoncrawl' counts under data.sources mixture 'web'); the token sources "
        "(each data source's mixture, else its name) are web, wikipedia, shakespeare, gsm8k"
    ) in str(info.value)


def test_mixture_and_epochs_rerun_tokenize_but_not_data():
    from frontierlm.stages import STAGES

    def hashed(cfg, stage: str) -> str:  # the config part of the stage's fingerprint
        return cfg.section_json(*STAGES[stage].sections)

    plain, grouped = load_config(QUICKSTART), load_config(MIXTURE)
    # The sources differ from the base's in mixture and epochs only.
    assert hashed(plain, "data") == hashed(grouped, "data")
    assert hashed(plain, "tokenize") != hashed(grouped, "tokenize")
    reseeded = load_config(QUICKSTART, ["--run.seed=7"])
    assert hashed(plain, "tokenize") != hashed(reseeded, "tokenize")


def test_tokenizer_vocab_range_and_pre_tokenizer():
    from frontierlm.config import TokenizerConfig

    assert TokenizerConfig().pre_tokenizer == "cl100k"
    assert TokenizerConfig(vocab_size=1 << 18, pre_tokenizer="o200k").vocab_size == 262144
    for bad in ({"vocab_size": (1 << 18) + 1}, {"pre_tokenizer": "llama"}, {"vocab_size": 256}):
        with pytest.raises(ValueError):
            TokenizerConfig(**bad)
    assert TokenizerConfig(reserved_special_tokens=256).reserved_special_tokens == 256
