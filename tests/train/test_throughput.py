"""The throughput machinery changes nothing that trains: activation checkpointing and regional
compilation give the same gradients, the prefetcher the same batches; the loop logs speed, MFU
and per-layer norms."""

from __future__ import annotations

import json
from concurrent.futures import wait

import pytest
import torch
from loop_tasks import make_task, new_model

from frontierlm.config import PretrainConfig, RunConfig
from frontierlm.train.loop import train
from frontierlm.train.losses import token_cross_entropy
from frontierlm.train.parallel import apply_activation_checkpointing, apply_compile
from frontierlm.train.prefetch import Prefetcher

CPU = torch.device("cpu")


def loss_and_grads(model: torch.nn.Module) -> tuple[float, dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    x = torch.randint(0, 97, (4, 16), generator=gen)
    y = torch.randint(0, 97, (4, 16), generator=gen)
    loss = token_cross_entropy(model(x), y).mean()
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("mode", ["block", "selective"])
def test_activation_checkpointing_recomputes_the_same_gradients(mode):
    ref_loss, ref_grads = loss_and_grads(new_model(qk_norm=True))
    model = new_model(qk_norm=True)
    apply_activation_checkpointing(model, mode)
    loss, grads = loss_and_grads(model)
    assert loss == ref_loss
    assert grads.keys() == ref_grads.keys()  # names unchanged: checkpoints stay compatible
    for name, grad in grads.items():
        assert torch.equal(grad, ref_grads[name]), name


@pytest.mark.parametrize("setting", ["blocks", "model"])
def test_compiled_with_selective_checkpointing_match_eager(setting):
    ref_loss, ref_grads = loss_and_grads(new_model())
    model = new_model()
    apply_activation_checkpointing(model, "selective")
    apply_compile(model, CPU, setting)
    try:
        loss, grads = loss_and_grads(model)
    finally:
        apply_compile(model, CPU, "none")  # the loss goes back to eager for the other tests
    assert abs(loss - ref_loss) < 1e-6
    assert grads.keys() == ref_grads.keys()
    worst = max(
        (grads[n] - g).abs().max().item() / g.abs().max().item() for n, g in ref_grads.items()
    )
    print(
        f"\ncompiled {setting} + selective checkpointing vs eager: max relative grad diff "
        f"{worst:.2e}"
    )
    assert worst < 1e-5


def test_prefetcher_gives_the_batches_asked_for_in_any_order():
    built: list[int] = []

    def make(i: int) -> dict[str, torch.Tensor]:
        built.append(i)
        if i == 7:
            raise ValueError("batch 7 is bad")
        return {"x": torch.full((2,), i)}

    with Prefetcher(make, depth=2, pin_memory=False) as batches:
        assert [int(batches(i)["x"][0]) for i in (0, 1, 2, 5, 6, 0)] == [0, 1, 2, 5, 6, 0]
        assert int(batches(6)["x"][0]) == 6
        wait(list(batches.pending.values()))
        assert {7, 8} <= set(built)  # built ahead, before anyone asked for them
        # Batch 7 failed in the thread; the error waits until the batch is asked for.
        with pytest.raises(ValueError, match="batch 7 is bad"):
            batches(7)


def test_no_prefetch_builds_in_the_loop():
    with Prefetcher(lambda i: {"x": torch.tensor([i])}, depth=0, pin_memory=False) as batches:
        assert int(batches(3)["x"]) == 3 and batches.pool is None


def test_loop_logs_speed_mfu_and_layer_norms(tmp_path):
    loop = PretrainConfig(
        steps=6, batch_size=4, seq_len=16, lr=3e-3, eval_every=3, checkpoint_every=0
    )
    model = new_model()
    flops = model.flops_per_token(16)
    train(model, loop, make_task(loop), tmp_path, CPU, RunConfig(peak_tflops=0.5), export=False)
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 7))
    for r in records:
        assert r["tokens_per_s"] == pytest.approx(4 * 16 / r["step_s"])
        assert r["mfu"] == pytest.approx(r["tokens_per_s"] * flops / 0.5e12)
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "model").exists()
    # Per-layer norms at every evaluation (steps 3 and 6): embed, both blocks, head.
    layered = [r["step"] for r in records if "update_norm.layer0" in r]
    assert layered == [3, 6]
    groups = ["embed", "layer0", "layer1", "head"]
    for name in groups:
        update = records[2][f"update_norm.{name}"]
        assert 0 < update < 0.1  # an AdamW step moves weights by about lr relative to them
        assert records[2][f"grad_norm.{name}"] > 0
    # The per-layer gradient norms add up (in squares) to the global one.
    total = sum(records[2][f"grad_norm.{name}"] ** 2 for name in groups) ** 0.5
    assert total == pytest.approx(records[2]["grad_norm"], rel=1e-5)
