"""The sweep's machinery: grid parsing, point configs, fit + plot + report on known points, and
(slow) a real micro sweep end to end."""

import dataclasses
import json

import numpy as np
import pytest

from frontierlm.config import load_config
from frontierlm.plan.flops import count_model
from frontierlm.plan.scaling import EPOCH, ScalingLaw
from frontierlm.plan.sweep import (
    fit_points,
    non_embedding_params,
    parse_amounts,
    parse_sizes,
    plot_sweep,
    point_config,
    sweep_section,
    width_lr,
)
from frontierlm.report import sweep_report_section


def test_parse_grid():
    assert parse_sizes("64x2, 128X3") == [(64, 2), (128, 3)]
    assert parse_amounts("0.2M,400k,1e6,3", "--tokens") == [2e5, 4e5, 1e6, 3.0]
    with pytest.raises(ValueError, match="D_MODELxN_LAYERS"):
        parse_sizes("64-2")
    with pytest.raises(ValueError, match="--tokens: 'lots'"):
        parse_amounts("lots", "--tokens")


def test_too_few_runs_stop_before_training(tmp_path):
    from frontierlm.plan.sweep import run_sweep

    cfg = load_config("recipes/micro.toml", [f"--run.out_dir={tmp_path}"])
    with pytest.raises(ValueError, match="at least 5 runs"):
        run_sweep(cfg, [(32, 1), (64, 2)], tokens=[8e3, 16e3])
    assert not (tmp_path / "micro").exists()


def test_point_config(tmp_path):
    cfg = load_config("recipes/quickstart.toml")  # d_model 192 / 3 heads: heads of 64
    point = point_config(cfg, 128, 2, 0.5e6, tmp_path)
    assert (point.model.d_model, point.model.n_layers, point.model.n_heads) == (128, 2, 2)
    assert point.pretrain.steps == round(0.5e6 / (16 * 256)) == point.pretrain.eval_every
    assert point.pretrain.warmup_steps == round(0.1 * 122) == 12  # a share of the steps
    assert point.pretrain.lr == cfg.pretrain.lr
    assert point.run.run_dir == tmp_path / "d128-l2-t500000"
    tuned = point_config(cfg, 128, 2, 1e6, tmp_path, lr=1e-2, warmup_fraction=0.05)
    assert (tuned.pretrain.lr, tuned.pretrain.warmup_steps) == (1e-2, round(0.05 * 244))
    assert tuned.run.name == "d128-l2-t1000000-lr0.01"
    # muP's width rule from the recipe's tuned width: 5e-3 at 192 -> 1.5e-2 at 64.
    assert width_lr(cfg, 64, 1.0) == pytest.approx(1.5e-2) and width_lr(cfg, 192, 1.0) == 5e-3
    assert width_lr(cfg, 64, 0.5) == pytest.approx(5e-3 * 3**0.5)
    with pytest.raises(ValueError, match="--warmup-fraction"):
        point_config(cfg, 128, 2, 1e6, tmp_path, warmup_fraction=1.0)
    assert point.tokenizer == cfg.tokenizer and point.data == cfg.data  # same upstream
    with pytest.raises(ValueError, match="multiple of the recipe's head width 64"):
        point_config(cfg, 96, 2, 1e5, tmp_path)


def test_non_embedding_params_are_the_body():
    cfg = load_config("recipes/quickstart.toml")  # untied, vocabulary 4096
    point = point_config(cfg, 64, 1, 1e5, "/tmp")
    count = count_model(point.model, 4096)
    body = non_embedding_params(count, point.model)
    # One block of d 64: q, k, v, o (4 x 64^2), SwiGLU gate/up/down (3 x 64 x ffn), two norms,
    # plus the final norm; the 2 x 4096 x 64 embedding and head are out.
    ffn = point.model.hidden
    assert body == 4 * 64 * 64 + 3 * 64 * ffn + 2 * 64 + 64
    assert count.active_params == body + 2 * 4096 * 64
    tied = point.model.model_copy(update={"tie_embeddings": True})
    assert non_embedding_params(count_model(tied, 4096), tied) == body


def synthetic_result(law: ScalingLaw) -> dict:
    points = []
    for d_model, n in ((64, 6e5), (128, 1.5e6), (192, 3.3e6)):
        for tokens in (2.5e5, 5e5, 1e6):
            points.append(
                {
                    "name": f"d{d_model}-t{tokens:.0f}",
                    "d_model": d_model,
                    "n_layers": 2,
                    "params": n,
                    "active_params": n,
                    "tokens": tokens,
                    "flops": 6 * n * tokens,
                    "val_loss": float(law.loss(n, tokens)),
                    "val_bpb": 1.0,
                    "wall_s": 1.0,
                }
            )
    return {
        "points": points,
        "grid": "tokens",
        "wall_s": 9.0,
        "cpus": 2,
        "load_before": [1.0, 1.0, 1.0],
    }


def test_fit_plot_and_report(tmp_path):
    truth = ScalingLaw(E=1.5, A=60.0, B=80.0, alpha=0.3, beta=0.35)
    result = synthetic_result(truth)
    law = fit_points(result["points"])
    assert abs(law.alpha - truth.alpha) < 0.02 and abs(law.beta - truth.beta) < 0.02
    # Exact points: the fit explains them all, and no single run moves the exponents.
    assert law.extra["r2"] == pytest.approx(1.0, abs=1e-6)
    assert law.extra["max_abs_residual"] < 1e-4
    assert law.extra["n_range"] == [6e5, 3.3e6] and law.extra["d_range"] == [2.5e5, 1e6]
    result["law"] = law.to_json()
    plot_sweep(result, tmp_path / "sweep" / "sweep.png")
    assert (tmp_path / "sweep" / "sweep.png").stat().st_size > 10_000
    text = "\n".join(sweep_section(result))
    assert f"| this sweep | {law.E:.3f} |" in text and "![sweep.png](sweep/sweep.png)" in text
    assert "d64-t250000" in text and "non-positive" not in text
    assert "R² 1.0000 of the losses" in text
    # The run's report picks the sweep up once sweep.json exists.
    assert sweep_report_section(tmp_path) == []
    (tmp_path / "sweep" / "sweep.json").write_text(json.dumps(result))
    assert sweep_report_section(tmp_path)[0] == "## Scaling-law sweep"


def test_unconstrained_fit_is_reported_not_hidden(tmp_path):
    result = synthetic_result(EPOCH)
    flat = ScalingLaw(E=1.0, A=1.0, B=1.0, alpha=-0.01, beta=0.02)
    result["law"] = flat.to_json()
    plot_sweep(result, tmp_path / "sweep.png")  # no optimum to mark, still a plot
    assert "non-positive exponent" in "\n".join(sweep_section(result))
    runaway = ScalingLaw(E=0.0, A=3e103, B=25.0, alpha=18.1, beta=0.115)
    result["law"] = runaway.to_json()
    plot_sweep(result, tmp_path / "sweep.png")
    assert "The N term is not identified" in "\n".join(sweep_section(result))


@pytest.mark.slow
def test_micro_sweep_end_to_end(tmp_path):
    """Six real pretraining runs on the micro recipe's data, one shared upstream."""
    from frontierlm.cli import main

    out = tmp_path / "runs"
    args = ["sweep", "recipes/micro.toml", "--sizes", "32x1,64x2", "--tokens", "8k,16k,24k"]
    assert (
        main([*args, f"--run.out_dir={out}", "--pretrain.eval_batches=2", "--run.threads=1"]) == 0
    )
    result = json.loads((out / "micro" / "sweep" / "sweep.json").read_text())
    assert len(result["points"]) == 6
    sizes = {p["d_model"]: p["active_params"] for p in result["points"]}
    assert sizes[64] > sizes[32]
    for p in result["points"]:
        assert p["tokens"] == pytest.approx(float(p["name"].split("-t")[1]), rel=0.05)
        assert np.isfinite(p["val_loss"])
        link = out / "micro" / "sweep" / "points" / p["name"] / "tokenize"
        assert link.is_symlink() and link.resolve() == (out / "micro" / "tokenize").resolve()
    assert (out / "micro" / "sweep" / "sweep.png").is_file()
    # Run again: every point is current and skipped; the law is refitted to the same numbers.
    assert (
        main([*args, f"--run.out_dir={out}", "--pretrain.eval_batches=2", "--run.threads=1"]) == 0
    )
    again = json.loads((out / "micro" / "sweep" / "sweep.json").read_text())
    assert [p["val_loss"] for p in again["points"]] == [p["val_loss"] for p in result["points"]]
    # Retrained over two worker processes: the same runs, the same losses, in the same order.
    flags = [f"--run.out_dir={out}", "--pretrain.eval_batches=2", "--run.threads=1"]
    assert main([*args, *flags, "--jobs", "2", "--force"]) == 0
    parallel = json.loads((out / "micro" / "sweep" / "sweep.json").read_text())
    assert [p["name"] for p in parallel["points"]] == [p["name"] for p in result["points"]]
    assert [p["val_loss"] for p in parallel["points"]] == pytest.approx(
        [p["val_loss"] for p in result["points"]], abs=1e-6
    )


def test_lr_search_picks_each_sizes_best_and_fits_only_the_grid(tmp_path, monkeypatch):
    """The sweep's bookkeeping with training replaced by a known loss surface: a law in the
    non-embedding N plus a penalty for missing each width's own best learning rate (5e-3 for
    d 64, 1e-2 for d 128), so one lr for both would tilt the fit."""
    import frontierlm.stages
    import frontierlm.tokenizer.train
    from frontierlm.plan.sweep import run_sweep

    truth = ScalingLaw(E=2.0, A=40.0, B=300.0, alpha=0.3, beta=0.35)
    best_lr = {64: 5e-3, 128: 1e-2}
    trained = []

    def fake_run_stage(cfg, name, force=False):
        if name != "pretrain":
            return {}
        trained.append(cfg.run.name)
        pre = cfg.pretrain
        tokens = pre.steps * pre.batch_size * pre.seq_len
        count = count_model(cfg.model, 4096)
        n = non_embedding_params(count, cfg.model)
        miss = np.log(pre.lr / best_lr[cfg.model.d_model]) ** 2
        loss = float(truth.loss(n, tokens)) + 0.2 * miss
        metrics = {
            "params": float(count.params),
            "active_params": float(count.active_params),
            "tokens_seen": float(tokens),
            "train_flops": 6.0 * count.active_params * tokens,
            "flops_per_token": 6.0 * count.active_params,
            "val_loss": loss,
            "val_bpb": loss / 3,
        }
        return {"metrics": metrics, "wall_s": 1.0}

    class Vocab:
        def get_vocab_size(self):
            return 4096

    monkeypatch.setattr(frontierlm.stages, "run_stage", fake_run_stage)
    monkeypatch.setattr(frontierlm.tokenizer.train, "load_tokenizer", lambda path: Vocab())
    cfg = load_config("recipes/quickstart.toml", [f"--run.out_dir={tmp_path}"])
    sizes, tokens = [(64, 1), (128, 2), (128, 4)], [4e5, 1e5, 2e5]
    with pytest.raises(ValueError, match="not both"):
        run_sweep(cfg, sizes, tokens, lrs=[5e-3, 1e-2], lr_width_exponent=1.0)
    result = run_sweep(
        cfg, sizes, tokens, lrs=[5e-3, 1e-2], warmup_fraction=0.2, n_count="non-embedding"
    )
    # 3 sizes x 2 lrs on the smallest budget (1e5 tokens, sorted first), then 2 budgets each.
    assert len(trained) == 12 and len(result["lr_search"]) == 6 and len(result["points"]) == 9
    chosen = {(p["d_model"], p["n_layers"]): p["lr"] for p in result["lr_search"] if p["chosen"]}
    assert chosen == {(64, 1): 5e-3, (128, 2): 1e-2, (128, 4): 1e-2}
    for p in result["points"]:
        assert p["lr"] == best_lr[p["d_model"]] and p["n"] == p["non_embedding_params"]
        assert p["warmup_steps"] == round(0.2 * p["steps"])
    # At each size's best lr the losses are the law's: the fit recovers it.
    law = result["law"]
    assert abs(law["alpha"] - 0.3) < 0.02 and abs(law["beta"] - 0.35) < 0.02
    assert law["extra"]["n_count"] == "non-embedding" and law["extra"]["r2"] > 0.999
    assert (tmp_path / "quickstart" / "sweep" / "sweep.png").is_file()
    text = (tmp_path / "quickstart" / "sweep" / "report.md").read_text()
    assert "| 64x1 | **" in text and "N counts non-embedding parameters" in text
    # The width rule instead: every budget of a size at the recipe's lr x 192 / d_model.
    trained.clear()
    ruled = run_sweep(cfg, sizes, tokens, lr_width_exponent=1.0)
    assert len(trained) == 9 and ruled["lr_search"] == []
    assert {(p["d_model"], p["lr"]) for p in ruled["points"]} == {(64, 1.5e-2), (128, 7.5e-3)}


def test_weakly_identified_exponents_are_flagged():
    """A finite fit can still be loose: no loss floor (E near 0) or exponents that one run moves
    by more than 2x get a warning in the report (and in `plan --law`); a firm fit gets none."""
    from frontierlm.plan.sweep import fit_warning

    ranges = {"n_range": [1e5, 3e6], "d_range": [5e5, 2e6]}
    firm = ScalingLaw(E=2.0, A=40.0, B=300.0, alpha=0.3, beta=0.35)
    firm = dataclasses.replace(
        firm, extra=ranges | {"loo_alpha": [0.28, 0.33], "loo_beta": [0.3, 0.4]}
    )
    assert fit_warning(firm) == ""
    floorless = dataclasses.replace(firm, E=1e-6)
    assert "no loss floor" in fit_warning(floorless)
    loose = dataclasses.replace(
        firm, extra=ranges | {"loo_alpha": [0.03, 4.8], "loo_beta": [0.3, 0.4]}
    )
    warning = fit_warning(loose)
    assert "moves α from 0.03 to 4.8" in warning and "β" not in warning.split("Treat")[0]
