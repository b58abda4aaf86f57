"""`frontierlm plan` end to end through the CLI."""

import json

import pytest

from frontierlm.cli import main
from frontierlm.plan.scaling import EPOCH


def plan(tmp_path, *args):
    out = tmp_path / "plan.json"
    assert main(["plan", *args, "--json", str(out)]) == 0
    return json.loads(out.read_text())


def test_chinchilla_from_flops(tmp_path):
    p = plan(tmp_path, "--flops", "5.76e23")
    assert p["params"] == pytest.approx(70e9, rel=0.10)
    assert p["tokens"] == pytest.approx(1.4e12, rel=0.10)
    # The matched config is a real model of that size, and its exact FLOPs are near 6ND.
    assert p["model"]["count"]["params"] == pytest.approx(p["params"], rel=0.05)
    assert p["model"]["exact_train_flops"] == pytest.approx(5.76e23, rel=0.10)
    assert "[model]" in p["recipe_snippet"] and "d_model =" in p["recipe_snippet"]


def test_llama3_405b_compute(tmp_path):
    p = plan(tmp_path, "--params", "405e9", "--tokens", "15.6e12", "--seq-len", "8192")
    assert p["compute_flops"] == pytest.approx(3.8e25, rel=0.05)
    assert set(p["optima"]) == {"tokens_per_param", "hoffmann", "epoch"}


def test_compute_from_gpu_hours_and_dollars(tmp_path):
    hours = plan(tmp_path, "--gpu-hours", "1e6", "--gpu", "H100", "--mfu", "0.4")
    assert hours["compute_flops"] == pytest.approx(1e6 * 3600 * 989.4e12 * 0.4)
    money = plan(tmp_path, "--dollars", "2e6", "--price", "2", "--gpu", "H100", "--mfu", "0.4")
    assert money["compute_flops"] == pytest.approx(hours["compute_flops"])
    assert money["bill"]["dollars"] == pytest.approx(2e6)
    assert money["bill"]["gpu_hours"] == pytest.approx(1e6)


def test_one_quantity_and_budget_with_one_more(tmp_path):
    p = plan(tmp_path, "--params", "1e9")  # 20 tokens per parameter
    assert p["tokens"] == pytest.approx(20e9)
    p = plan(tmp_path, "--flops", "6e21", "--params", "1e10")  # the third: D = C / 6N
    assert p["tokens"] == pytest.approx(1e11)
    p = plan(tmp_path, "--tokens", "1e12", "--optimum", "epoch")
    n_opt, d_opt = EPOCH.optimal(p["compute_flops"])
    assert d_opt == pytest.approx(1e12, rel=1e-6) and p["params"] == pytest.approx(n_opt)


def test_law_from_a_sweep_drives_the_plan(tmp_path):
    law = {"E": 2.0, "A": 100.0, "B": 1000.0, "alpha": 0.3, "beta": 0.4, "name": "fit"}
    path = tmp_path / "sweep.json"
    path.write_text(json.dumps({"law": law, "points": []}))
    p = plan(tmp_path, "--flops", "1e21", "--law", str(path))
    assert "fitted law" in p["notes"][0]
    assert p["params"] == pytest.approx(p["optima"]["law"]["params"])
    assert p["predicted_loss"]["law"] > 2.0


def test_fitted_law_says_what_it_counts_and_how_far_it_reaches(tmp_path):
    extra = {
        "n_count": "non-embedding",
        "r2": 0.987,
        "rms_log_residual": 0.012,
        "runs": 9,
        "n_range": [5e4, 2e6],
        "d_range": [2.5e5, 2e6],
    }
    law = {"E": 2.0, "A": 100.0, "B": 1000.0, "alpha": 0.3, "beta": 0.4, "extra": extra}
    path = tmp_path / "sweep.json"
    path.write_text(json.dumps({"law": law, "points": []}))
    notes = " | ".join(plan(tmp_path, "--flops", "1e21", "--law", str(path))["notes"])
    assert "without the embedding and output head" in notes
    assert "R^2 0.9870" in notes and "over its 9 runs" in notes
    # Optimum at 1e21 under this law: N = G (C/6)^(4/7) with G = (0.3*100/(0.4*1000))^(1/0.7).
    n_opt = (0.3 * 100 / (0.4 * 1000)) ** (1 / 0.7) * (1e21 / 6) ** (0.4 / 0.7)
    assert f"N {n_opt / 2e6:.2g}x past its largest run" in notes and "not a forecast" in notes
    inside = plan(tmp_path, "--params", "1e6", "--tokens", "1e6", "--law", str(path))["notes"]
    assert any("lies inside that range" in note for note in inside)


def test_recipe_gives_active_params(tmp_path):
    p = plan(tmp_path, "--recipe", "recipes/moe-small.toml", "--flops", "1e16")
    count = p["model"]["count"]
    assert p["params"] == count["active_params"] < count["params"]
    assert p["model"]["from_recipe"] == "recipes/moe-small.toml"


@pytest.mark.parametrize(
    "args,message",
    [
        (["--flops", "1e20", "--gpu-hours", "5"], "one compute budget"),
        ([], "any two fix the third"),
        (["--dollars", "1e6"], "--price"),
        (["--flops", "-1"], "--flops must be positive"),
        (["--flops", "1e20", "--gpu", "V100"], "unknown GPU"),
        (["--flops", "1e20", "--optimum", "law"], "--law"),
    ],
)
def test_bad_arguments_are_named(args, message, capsys):
    assert main(["plan", *args]) == 1
    captured = capsys.readouterr()
    assert message in (captured.out + captured.err).replace("\n", " ")


def test_law_without_optimum_is_named(tmp_path, capsys):
    law = {"E": 2.0, "A": 1.0, "B": 1.0, "alpha": -0.01, "beta": 0.02}
    path = tmp_path / "sweep.json"
    path.write_text(json.dumps({"law": law}))
    p = plan(tmp_path, "--flops", "1e21", "--law", str(path), "--optimum", "epoch")
    assert "law" not in p["optima"] and "gives no optimum" in " ".join(p["notes"])
    assert main(["plan", "--flops", "1e21", "--law", str(path)]) == 1
    assert "no compute-optimal split" in capsys.readouterr().err.replace("\n", " ")


def test_law_whose_n_term_ran_off_gives_no_plan(tmp_path, capsys):
    # The 2026-11-29 CPU sweep: 128x2 and 192x4 tie, alpha runs to 27.7.
    law = {"E": 1.87, "A": 4.6e129, "B": 33.9, "alpha": 27.69, "beta": 0.187}
    path = tmp_path / "sweep.json"
    path.write_text(json.dumps({"law": law}))
    p = plan(tmp_path, "--flops", "1e21", "--law", str(path), "--optimum", "epoch")
    assert "law" not in p["optima"] and "do not identify" in " ".join(p["notes"])
    assert main(["plan", "--flops", "1e21", "--law", str(path)]) == 1
    assert "barely depend on N" in " ".join(capsys.readouterr().err.split())
