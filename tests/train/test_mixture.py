"""Multi-stage data mixtures: stage switching, realised shares, exact resume, clear errors.

The token shards here are synthetic: every token of source s lies in [100 s + 1, 100 s + 99] and
BOS is 0, so each window shows which source it came from."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from frontierlm.config import ModelConfig, PretrainConfig
from frontierlm.model import Transformer
from frontierlm.tokenizer.shards import TokenSplit
from frontierlm.train.loop import TrainTask, train
from frontierlm.train.mixture import MixtureWindows, SourceWindows
from frontierlm.train.pretrain import lm_loss
from frontierlm.train.sampler import Apportionment

BOS = 0
NAMES = ["web", "wiki", "math"]


def make_split(docs_per_source: tuple[int, ...] = (40, 30, 20), seed: int = 0) -> TokenSplit:
    """Documents of 5-60 tokens from each source, shuffled together in file order."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(len(docs_per_source)), docs_per_source)
    rng.shuffle(labels)
    docs = [
        np.concatenate([[BOS], rng.integers(100 * s + 1, 100 * s + 100, rng.integers(5, 60))])
        for s in labels
    ]
    starts = np.concatenate([[0], np.cumsum([len(d) for d in docs])[:-1]]).astype(np.int64)
    tokens = np.concatenate(docs).astype(np.uint16)
    return TokenSplit(tokens, starts, labels.astype(np.uint16), NAMES[: len(docs_per_source)])


def sources_of(batch: dict[str, torch.Tensor]) -> list[int]:
    """The source of each row (its non-BOS tokens all belong to one)."""
    out = []
    for row in torch.cat([batch["input_ids"], batch["targets"][:, -1:]], dim=1):
        kinds = {int(t) // 100 for t in row if t != BOS}
        assert len(kinds) == 1, "a window mixes sources"
        out.append(kinds.pop())
    return out


def loop_cfg(mixture: list[dict], **fields) -> PretrainConfig:
    base = {"steps": 10, "batch_size": 4, "grad_accum": 2, "seq_len": 8, "eval_every": 5}
    return PretrainConfig(**{**base, **fields, "mixture": mixture})


def test_apportionment_counts_add_up_grow_by_one_and_stay_close():
    rng = random.Random(0)
    for parties in (1, 2, 3, 7, 8):
        weights = [rng.uniform(0.01, 5.0) for _ in range(parties)]
        share = np.array(weights) / sum(weights)
        deal = Apportionment(weights)
        bound = (parties - 1).bit_length() / 2 + 1e-9  # depth / 2
        previous = [0] * parties
        for position in range(1500):
            party, before = deal.owner(position)
            assert before == previous[party]  # the rank is the party's count so far
            counts = deal.counts(position + 1)
            assert sum(counts) == position + 1
            assert counts == [c + (i == party) for i, c in enumerate(previous)]
            assert np.abs(np.array(counts) - share * (position + 1)).max() <= bound
            previous = counts
    with pytest.raises(ValueError, match="positive weights"):
        Apportionment([1.0, 0.0])


def test_source_windows_cover_each_source_once_per_epoch():
    split = make_split()
    for index, name in enumerate(NAMES):
        source = SourceWindows(split, index, seq_len=8, seed=1)
        stream = np.concatenate(
            [np.asarray(split.tokens[a:b], dtype=np.int64) for a, b in split.source_spans(index)]
        )
        assert source.name == name and source.n_tokens == len(stream)
        assert source.n_windows == (len(stream) - 1) // 8
        seen = []
        for k in range(source.n_windows):
            window = source.window(k)
            start = source.order.example(k) * 8
            np.testing.assert_array_equal(window, stream[start : start + 9])
            seen.append(start)
        assert sorted(seen) == list(range(0, source.n_windows * 8, 8))
    assert sum(split.source_tokens().values()) == len(split.tokens)


def test_two_stages_switch_at_the_boundary_and_report_the_stage():
    split = make_split()
    cfg = loop_cfg(
        [
            {"name": "broad", "steps": 6, "weights": {"web": 1.0, "wiki": 1.0, "math": 0.0}},
            {"name": "anneal", "weights": {"math": 1.0}},
        ]
    )
    windows = MixtureWindows(split, cfg, seed=5)
    assert windows.ends == [6, 10]
    grad_accum = cfg.grad_accum
    first = [s for i in range(6 * grad_accum) for s in sources_of(windows(i))]
    assert set(first) == {0, 1}
    # Data steps past the end (spike skips) stay in the last stage.
    later = range(6 * grad_accum, 14 * grad_accum)
    assert {s for i in later for s in sources_of(windows(i))} == {2}
    assert windows(6 * grad_accum - 1)["mixture_stage"].tolist() == [0] * 4
    assert windows(6 * grad_accum)["mixture_stage"].tolist() == [1] * 4


def test_realised_shares_match_the_weights():
    split = make_split()
    weights = {"web": 3.0, "wiki": 1.0, "math": 0.5}
    cfg = loop_cfg([{"name": "all", "weights": weights}], steps=100, batch_size=8, grad_accum=1)
    windows = MixtureWindows(split, cfg, seed=2)
    per_batch = np.array(
        [np.bincount(sources_of(windows(i)), minlength=3) for i in range(cfg.steps)]
    )
    share = np.array(list(weights.values())) / sum(weights.values())
    realised = per_batch.sum(0) / per_batch.sum()
    assert np.abs(realised - share).max() < 2 / per_batch.sum()
    # Every batch is close to its quota too, the 10% source included.
    assert np.abs(per_batch - share * cfg.batch_size).max() < 2
    assert (per_batch[:, 2] > 0).mean() > 0.75


def test_unset_weights_take_the_natural_mix():
    split = make_split()
    windows = MixtureWindows(split, loop_cfg([{"name": "natural"}], steps=60), seed=0)
    counts = np.zeros(3)
    for i in range(60 * 2):
        counts += np.bincount(sources_of(windows(i)), minlength=3)
    n_windows = np.array([s.n_windows for s in windows.sources])
    assert np.abs(counts / counts.sum() - n_windows / n_windows.sum()).max() < 0.01


def test_a_batch_is_a_pure_function_of_its_index():
    split = make_split()
    cfg = loop_cfg(
        [
            {"name": "a", "fraction": 0.5, "weights": {"web": 1.0, "math": 1.0}},
            {"name": "b", "weights": {"wiki": 2.0, "math": 1.0}},
        ]
    )
    straight = MixtureWindows(split, cfg, seed=9)
    batches = [straight(i) for i in range(cfg.steps * cfg.grad_accum)]
    resumed = MixtureWindows(split, cfg, seed=9)  # a fresh loader after a restart
    for i in [13, 7, 19, 0, 13, 10]:
        for key, value in resumed(i).items():
            assert torch.equal(value, batches[i][key]), (i, key)
    other_seed = MixtureWindows(split, cfg, seed=10)
    assert not torch.equal(other_seed(3)["input_ids"], batches[3]["input_ids"])


def test_a_later_stage_continues_a_sources_epoch():
    split = make_split()
    cfg = loop_cfg(
        [
            {"name": "a", "steps": 4, "weights": {"web": 1.0, "math": 1.0}},
            {"name": "b", "weights": {"math": 1.0}},
        ],
        steps=20,
    )
    windows = MixtureWindows(split, cfg, seed=3)
    math = windows.sources[2]
    rows: list[tuple[int, ...]] = []
    for i in range(cfg.steps * cfg.grad_accum):
        batch = windows(i)
        mine = [
            tuple(row.tolist())
            for row, s in zip(batch["input_ids"], sources_of(batch), strict=True)
            if s == 2
        ]
        if len(rows) + len(mine) > math.n_windows:  # whole batches: rows are shuffled in one
            break
        rows += mine
    assert len(rows) > math.n_windows - cfg.batch_size
    # No window of the source comes back before all of its windows have been seen.
    assert len(set(rows)) == len(rows)


def test_document_mask_ids_follow_bos():
    split = make_split()
    cfg = loop_cfg([{"name": "all", "weights": {"web": 1.0, "wiki": 1.0}}])
    batch = MixtureWindows(split, cfg, seed=0, bos_id=BOS)(3)
    expected = (batch["input_ids"] == BOS).cumsum(dim=1)
    assert torch.equal(batch["doc_ids"], expected)
    assert "doc_ids" not in MixtureWindows(split, cfg, seed=0)(3)


def test_the_loop_records_the_stage_and_resumes_across_the_boundary(tmp_path):
    split = make_split((80, 60, 40))
    cfg = loop_cfg(
        [
            {"name": "broad", "fraction": 0.5, "weights": {"web": 1.0, "wiki": 1.0}},
            {"name": "anneal", "weights": {"math": 1.0}},
        ],
        steps=6,
        grad_accum=1,
        lr=1e-2,
        eval_every=3,
        checkpoint_every=4,
    )

    def task(crash_at: int | None = None) -> TrainTask:
        windows = MixtureWindows(split, cfg, seed=1)
        val = windows(0)

        def batch(index: int) -> dict[str, torch.Tensor]:
            if index == crash_at:
                raise KeyboardInterrupt
            return windows(index)

        return TrainTask("mix", batch, lm_loss, lambda m: {"loss": lm_loss(m, val)[0].item()})

    def model():
        torch.manual_seed(0)
        return Transformer(ModelConfig(d_model=16, n_layers=1, n_heads=2, max_seq_len=8), 300)

    cpu = torch.device("cpu")
    straight = train(model(), cfg, task(), tmp_path / "a", cpu)
    records = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [r["mixture_stage"] for r in records] == [0, 0, 0, 1, 1, 1]
    # Killed during step 5 (in the second stage), resumed from the step-4 checkpoint.
    with pytest.raises(KeyboardInterrupt):
        train(model(), cfg, task(crash_at=4), tmp_path / "b", cpu)
    resumed = train(model(), cfg, task(), tmp_path / "b", cpu)
    assert resumed["train_loss"] == pytest.approx(straight["train_loss"], abs=1e-6)


def test_unknown_source_fails_listing_the_available_ones():
    split = make_split()
    cfg = loop_cfg([{"name": "a", "steps": 4}, {"name": "b", "weights": {"wikipedia": 1.0}}])
    with pytest.raises(ValueError) as info:
        MixtureWindows(split, cfg, seed=0)
    message = str(info.value)
    assert "pretrain.mixture[1].weights.wikipedia" in message
    assert all(name in message for name in NAMES)


def test_a_source_shorter_than_a_window_fails_naming_it():
    split = make_split((40, 30, 1))
    cfg = loop_cfg([{"name": "a", "weights": {"web": 1.0, "math": 1.0}}], seq_len=64)
    with pytest.raises(ValueError, match=r"mixture\[0\]\.weights\.math.*not one window"):
        MixtureWindows(split, cfg, seed=0)
    # Weight 0, or the natural mix, leaves it out instead.
    cfg = loop_cfg([{"name": "a", "weights": {"web": 1.0, "math": 0.0}}], seq_len=64)
    MixtureWindows(split, cfg, seed=0)
    natural = MixtureWindows(split, loop_cfg([{"name": "n"}], seq_len=64), seed=0)
    assert natural.stages[0].sources == [0, 1]


def test_shards_without_sources_fail_with_what_to_do():
    split = make_split()
    old = TokenSplit(split.tokens, split.doc_starts)
    with pytest.raises(ValueError, match="rerun the tokenize stage"):
        MixtureWindows(old, loop_cfg([{"name": "a"}]), seed=0)


@pytest.mark.parametrize(
    "mixture,expected",
    [
        ([{"name": "a", "steps": 4}], "cover 4 steps but steps=10"),
        ([{"name": "a", "steps": 12}], "cover 12 steps but steps=10"),
        ([{"name": "a"}, {"name": "b", "steps": 4}], "only the last stage may"),
        ([{"name": "a", "steps": 10}, {"name": "b"}], "mixture[1] ('b') gets no step"),
        ([{"name": "a", "steps": 2, "fraction": 0.5}], "set one of steps, fraction, tokens"),
        ([{"name": "a", "weights": {"web": 0.0}}], "must include a positive weight"),
        ([{"name": "a", "weights": {"web": -1.0}}], "greater than or equal to 0"),
        ([{"name": "a", "steps": 5}, {"name": "a"}], "names must be unique"),
        ([{"name": "a", "fraction": 1.5}], "less than or equal to 1"),
    ],
)
def test_bad_mixture_configs_fail_clearly(mixture, expected):
    with pytest.raises(ValueError, match="mixture") as info:
        loop_cfg(mixture)
    assert expected in str(info.value)


def test_stage_lengths_from_fractions_and_tokens():
    thirds = [{"name": n, "fraction": 1 / 3} for n in "abc"]
    assert loop_cfg(thirds, steps=100).mixture_ends() == [33, 67, 100]
    # 4 x 2 x 8 = 64 tokens a step: 320 tokens are 5 steps.
    tokens = [{"name": "a", "tokens": 320}, {"name": "b"}]
    assert loop_cfg(tokens).mixture_ends() == [5, 10]


@pytest.mark.parametrize("mixture", [False, True])
def test_diloco_islands_together_read_data_parallels_batches(mixture: bool) -> None:
    """4 DiLoCo islands: at every micro-step their rows are data parallel's global batch (a
    mixture's, stage by stage, in the island order); plain windows: batches i, i + M, ..."""
    from frontierlm.distributed.island import island_batches
    from frontierlm.train.pretrain import ShuffledWindows

    split = make_split()
    stages = [{"name": "a", "steps": 4, "weights": {"web": 1.0}}, {"name": "b"}] if mixture else []
    loop = loop_cfg(stages, batch_size=8)
    islands = [island_batches(loop, 4, i, split, seed=3, bos_id=BOS) for i in range(4)]
    if mixture:
        whole = MixtureWindows(split, loop, 3, BOS)
        for index in (0, 7, 8, 19):  # micro-steps: stage a, its last, stage b's first, the end
            parts = [island(index) for island in islands]
            for key, value in whole(index).items():
                assert torch.equal(torch.cat([p[key] for p in parts]), value), key
        assert set(sources_of(islands[2](5))) == {0}  # stage a: web only, on every island
        assert len(set(sources_of(islands[2](9)))) > 1 or len(set(sources_of(islands[3](9)))) > 1
    else:
        plain = ShuffledWindows(split.tokens, loop.seq_len, 2, 3, BOS)
        for index in (0, 5):
            for i, island in enumerate(islands):
                assert torch.equal(island(index)["input_ids"], plain(4 * index + i)["input_ids"])
