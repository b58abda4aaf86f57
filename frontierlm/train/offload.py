"""Checkpoint offload to S3-compatible object storage (AWS S3, MinIO, R2, GCS's S3 API, ...).

A finished checkpoint directory `checkpoints/step_NNNNNNN/` is uploaded by a background thread
(training goes on) to `s3://<bucket>/<prefix>/<run>/<stage>/step_NNNNNNN/<file>`, and only when
every file is in the store does the thread write `step_NNNNNNN/COMPLETE` (the file list with
sizes). The marker goes last, so a process killed mid-upload leaves files without a marker,
and readers take only checkpoints that have one: the store never offers a partial checkpoint
as complete. Local checkpoints are then pruned to the last `keep_checkpoints`, but never one
whose upload is still running or failed (a failed upload keeps its local copy and is reported).

On resume, when the local disk holds no checkpoint of the stage, the newest complete one is
downloaded (into a temporary directory renamed when whole, like every checkpoint) and training
continues from it. Credentials come the usual boto3 way (environment, ~/.aws, instance role);
the recipe holds only `run.offload.endpoint_url`, `bucket`, `prefix`.

boto3 is an optional extra: `pip install "frontierlm[s3]"`.
"""

from __future__ import annotations

import json
import shutil
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from frontierlm.atomic import atomic_dir, commit_dir
from frontierlm.config import OffloadConfig
from frontierlm.console import console
from frontierlm.train.checkpoint import STEP_PREFIX, list_checkpoints

MARKER = "COMPLETE"


def s3_client(cfg: OffloadConfig) -> Any:
    try:
        import boto3
        from botocore.config import Config
    except ImportError:
        raise RuntimeError(
            "run.offload.bucket is set but boto3 is not installed: pip install 'frontierlm[s3]'"
        ) from None
    return boto3.client(
        "s3",
        endpoint_url=cfg.endpoint_url,
        region_name=cfg.region,
        config=Config(retries={"max_attempts": cfg.retries, "mode": "standard"}),
    )


class CheckpointStore:
    """The checkpoints of one training stage in a bucket, under `<prefix>/<run>/<stage>/`."""

    def __init__(self, cfg: OffloadConfig, run_name: str, stage: str, client: Any = None) -> None:
        if cfg.bucket is None:
            raise ValueError("CheckpointStore needs run.offload.bucket")
        self.cfg, self.bucket = cfg, cfg.bucket
        self.client = client if client is not None else s3_client(cfg)
        self.root = "/".join(p for p in (cfg.prefix.strip("/"), run_name, stage) if p) + "/"

    def upload(self, checkpoint: Path) -> None:
        """Every file of `checkpoint`, then its marker (an interrupted call leaves no marker)."""
        files = sorted(p for p in checkpoint.rglob("*") if p.is_file())
        base = f"{self.root}{checkpoint.name}/"
        listing = []
        for path in files:
            relative = path.relative_to(checkpoint).as_posix()
            self.client.upload_file(str(path), self.bucket, base + relative)
            listing.append({"path": relative, "bytes": path.stat().st_size})
        body = json.dumps({"files": listing}, indent=1).encode()
        self.client.put_object(Bucket=self.bucket, Key=base + MARKER, Body=body)

    def _keys(self, prefix: str) -> list[dict[str, Any]]:
        paginator = self.client.get_paginator("list_objects_v2")
        found: list[dict[str, Any]] = []
        for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix):
            found += page.get("Contents", [])
        return found

    def complete(self) -> list[str]:
        """Names (`step_NNNNNNN`) of the checkpoints whose marker is in the store, oldest first."""
        names = []
        for obj in self._keys(self.root):
            parts = obj["Key"][len(self.root) :].split("/")
            if len(parts) == 2 and parts[1] == MARKER and parts[0].startswith(STEP_PREFIX):
                names.append(parts[0])
        return sorted(names)

    def download(self, name: str, ckpt_root: Path) -> Path:
        """Checkpoint `name` into `ckpt_root/name`, whole or not at all; the files must match
        the sizes the marker lists."""
        base = f"{self.root}{name}/"
        marker = self.client.get_object(Bucket=self.bucket, Key=base + MARKER)
        listing = json.loads(marker["Body"].read())["files"]
        final = ckpt_root / name
        tmp = atomic_dir(final)
        for entry in listing:
            target = tmp / entry["path"]
            target.parent.mkdir(parents=True, exist_ok=True)
            self.client.download_file(self.bucket, base + entry["path"], str(target))
            if target.stat().st_size != entry["bytes"]:
                raise RuntimeError(
                    f"s3://{self.bucket}/{base}{entry['path']}: {target.stat().st_size} bytes, "
                    f"the marker says {entry['bytes']}; the stored checkpoint is damaged"
                )
        commit_dir(tmp, final)
        return final


class Offloader:
    """Uploads checkpoints in a background thread and prunes the local ones it has stored."""

    def __init__(self, store: CheckpointStore, ckpt_root: Path, keep: int) -> None:
        self.store, self.ckpt_root, self.keep = store, ckpt_root, keep
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="offload")
        self.pending: dict[str, Future] = {}
        self.failed: dict[str, str] = {}
        self.uploaded: set[str] = set()
        self.lock = threading.Lock()

    def submit(self, checkpoint: Path) -> Future:
        future = self.pool.submit(self._upload, checkpoint)
        with self.lock:
            self.pending[checkpoint.name] = future
        return future

    def _upload(self, checkpoint: Path) -> None:
        try:
            self.store.upload(checkpoint)
        except Exception as err:  # reported, and the local copy is kept
            with self.lock:
                self.failed[checkpoint.name] = f"{type(err).__name__}: {err}"
                self.pending.pop(checkpoint.name, None)
            console.print(
                f"[red]offload: {checkpoint.name} not stored in s3://{self.store.bucket}/"
                f"{self.store.root} ({err}); the local copy is kept"
            )
            return
        with self.lock:
            self.pending.pop(checkpoint.name, None)
            self.uploaded.add(checkpoint.name)
        self.prune()

    def prune(self) -> None:
        """Keep the newest `keep` local checkpoints, and any not yet safely in the store."""
        with self.lock:
            busy = set(self.pending) | set(self.failed)
        for stale in list_checkpoints(self.ckpt_root)[: -self.keep]:
            if stale.name in self.uploaded and stale.name not in busy:
                shutil.rmtree(stale, ignore_errors=True)

    def __enter__(self) -> Offloader:
        return self

    def __exit__(self, kind, error, trace) -> None:
        if kind is not None:  # the run failed: wait for the uploads, report nothing more
            self.close(report=False)

    def close(self, report: bool = True) -> None:
        """Wait for the uploads still running; raise if any failed (with `report`)."""
        self.pool.shutdown(wait=True)
        self.prune()
        if self.failed and report:
            detail = "; ".join(f"{k}: {v}" for k, v in sorted(self.failed.items()))
            raise RuntimeError(
                f"offload: {len(self.failed)} checkpoint(s) not stored in s3://{self.store.bucket}/"
                f"{self.store.root} ({detail}); their local copies are under {self.ckpt_root}"
            )


def pull_latest(store: CheckpointStore, ckpt_root: Path) -> Path | None:
    """When `ckpt_root` holds no checkpoint, the newest complete one from the store, downloaded
    there; None when neither has one."""
    if list_checkpoints(ckpt_root):
        return None
    names = store.complete()
    if not names:
        return None
    ckpt_root.mkdir(parents=True, exist_ok=True)
    path = store.download(names[-1], ckpt_root)
    console.print(f"[yellow]offload: pulled {names[-1]} from s3://{store.bucket}/{store.root}")
    return path
