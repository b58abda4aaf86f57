"""Checkpoint offload against a real S3-API server (moto's server mode) on loopback: background
upload, local pruning, resume from the store, and an upload killed mid-file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import boto3
import pytest
import torch
from loop_tasks import Crash, make_task, new_model
from moto.server import ThreadedMotoServer

from frontierlm.config import OffloadConfig, PretrainConfig, RunConfig
from frontierlm.train.checkpoint import list_checkpoints
from frontierlm.train.loop import train
from frontierlm.train.offload import MARKER, CheckpointStore, Offloader, pull_latest

ROOT = Path(__file__).resolve().parents[2]
BUCKET = "ckpts"


@pytest.fixture(scope="module")
def s3_endpoint():
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def offload(s3_endpoint, monkeypatch, request) -> OffloadConfig:
    for key, value in {
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(key, value)
    cfg = OffloadConfig(bucket=BUCKET, endpoint_url=s3_endpoint, prefix=request.node.name)
    client = boto3.client("s3", endpoint_url=s3_endpoint)
    if BUCKET not in [b["Name"] for b in client.list_buckets()["Buckets"]]:
        client.create_bucket(Bucket=BUCKET)
    return cfg


def _loop(steps: int) -> PretrainConfig:
    return PretrainConfig(
        steps=steps,
        batch_size=4,
        seq_len=16,
        lr=3e-3,
        eval_every=100,
        checkpoint_every=2,
        keep_checkpoints=1,
        prefetch=0,
    )


def test_offload_prunes_locally_and_resume_pulls_the_newest(offload, tmp_path):
    run = RunConfig(name="r", offload=offload)
    # The reference: 8 steps in one go, no offload.
    reference = train(
        new_model(), _loop(8), make_task(_loop(8)), tmp_path / "ref", torch.device("cpu")
    )

    work = tmp_path / "run"
    with pytest.raises(Crash):  # killed while building step 7's batch
        train(
            new_model(), _loop(8), make_task(_loop(8), crash_at=6), work, torch.device("cpu"), run
        )
    store = CheckpointStore(offload, "r", "pretrain")
    assert store.complete() == ["step_0000002", "step_0000004", "step_0000006"]
    # Local copies pruned to keep_checkpoints once stored.
    assert [p.name for p in list_checkpoints(work / "checkpoints")] == ["step_0000006"]
    marker = json.loads(
        store.client.get_object(Bucket=BUCKET, Key=f"{store.root}step_0000006/{MARKER}")[
            "Body"
        ].read()
    )
    stored = {f["path"] for f in marker["files"]}
    assert {"model.safetensors", "config.json", "train_state.pt"} <= stored

    # The local disk is lost: the run continues from the store's step 6 and ends where the
    # uninterrupted run ends.
    for ckpt in list_checkpoints(work / "checkpoints"):
        for f in ckpt.iterdir():
            f.unlink()
        ckpt.rmdir()
    resumed = train(new_model(), _loop(8), make_task(_loop(8)), work, torch.device("cpu"), run)
    assert resumed["val_loss"] == pytest.approx(reference["val_loss"], abs=1e-6)
    assert store.complete()[-1] == "step_0000008"


def _fake_checkpoint(root: Path, step: int, size: int) -> Path:
    ckpt = root / f"step_{step:07d}"
    ckpt.mkdir(parents=True)
    (ckpt / "config.json").write_text("{}")
    (ckpt / "model.safetensors").write_bytes(os.urandom(size))
    return ckpt


def test_failed_upload_leaves_no_marker_and_keeps_the_local_copy(offload, tmp_path):
    store = CheckpointStore(offload, "r", "pretrain")
    root = tmp_path / "checkpoints"
    real = store.client.upload_file

    def fail_on_step_4_weights(path, bucket, key, **kwargs):
        if key.endswith("step_0000004/model.safetensors"):  # config.json went up before it
            raise ConnectionError("connection reset by peer")
        return real(path, bucket, key, **kwargs)

    store.client.upload_file = fail_on_step_4_weights
    offloader = Offloader(store, root, keep=1)
    offloader.submit(_fake_checkpoint(root, 2, 1000))
    offloader.submit(_fake_checkpoint(root, 4, 1000))
    with pytest.raises(RuntimeError, match=r"step_0000004.*connection reset"):
        offloader.close()
    # The first file of step 4 is in the store, but no marker: step 4 is not offered.
    keys = [o["Key"] for o in store._keys(store.root)]
    assert f"{store.root}step_0000004/config.json" in keys
    assert store.complete() == ["step_0000002"]
    # Kept locally (not stored); step 2 (stored, older than the last one) was pruned.
    assert [p.name for p in list_checkpoints(root)] == ["step_0000004"]


def test_upload_killed_mid_file_is_never_complete(offload, tmp_path):
    """A process killed (os._exit, no cleanup) while the multipart upload of a checkpoint's
    weights is half sent: the store holds parts but no marker; a resume takes the previous one."""
    store = CheckpointStore(offload, "r", "pretrain")
    root = tmp_path / "checkpoints"
    store.upload(_fake_checkpoint(root, 2, 1000))
    big = _fake_checkpoint(root, 4, 12 * 2**20)
    script = textwrap.dedent(
        f"""
        import os
        from pathlib import Path
        from boto3.s3.transfer import TransferConfig
        from frontierlm.config import OffloadConfig
        from frontierlm.train.offload import CheckpointStore
        cfg = OffloadConfig.model_validate_json({offload.model_dump_json()!r})
        store = CheckpointStore(cfg, "r", "pretrain")
        real = store.client.upload_file
        sent = [0]
        def killed_midway(bytes_sent):
            sent[0] += bytes_sent
            if sent[0] >= 6 * 2**20:
                os._exit(9)  # the kill: no exception handler, no cleanup
        def upload_file(path, bucket, key):
            chunks = TransferConfig(multipart_threshold=5 * 2**20, multipart_chunksize=5 * 2**20,
                                    max_concurrency=1)
            real(path, bucket, key, Callback=killed_midway, Config=chunks)
        store.client.upload_file = upload_file
        store.upload(Path({str(big)!r}))
        """
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    assert done.returncode == 9, done.stderr
    assert store.complete() == ["step_0000002"]
    # The weights never arrived whole (a multipart upload left open, or nothing).
    keys = [o["Key"] for o in store._keys(f"{store.root}step_0000004/")]
    assert f"{store.root}step_0000004/{MARKER}" not in keys
    assert f"{store.root}step_0000004/model.safetensors" not in keys
    # A fresh disk resumes from step 2, whole.
    fresh = tmp_path / "fresh"
    pulled = pull_latest(store, fresh)
    assert pulled == fresh / "step_0000002"
    assert (pulled / "model.safetensors").read_bytes() == (
        root / "step_0000002" / "model.safetensors"
    ).read_bytes()
