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
            "pretrain.mixture[0].weights.wiki: no data source is called 'wiki'; the sources are "
            "python-docs, commoncrawl, commoncrawl-2, cc-extracted, wikipedia, shakespeare, gsm8k",
        ),
        ("--pretrain.mixture=[{name='a', steps=10}]", "cover 10 steps but steps=500"),
        ("--pretrain.mixture=[{name='a', weights={gsm8k=0}}]", "must include a positive weight"),
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
