"""JSONL metrics on disk: one object per line, safe to resume. Under torchrun every process
reads the log and only rank 0 (`writer=True`) writes it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class MetricsLog:
    def __init__(self, path: Path, writer: bool = True) -> None:
        self.path = path
        self.writer = writer

    def truncate_after(self, step: int) -> None:
        """On resume, forget records from steps the checkpoint does not contain."""
        if not self.writer or not self.path.exists():
            return
        kept = [line for line in self.read() if line.get("step", -1) <= step]
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        tmp.replace(self.path)

    def write(self, record: dict[str, Any]) -> None:
        if not self.writer:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def read(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        lines = [line for line in self.path.read_text().splitlines() if line.strip()]
        records = []
        for i, line in enumerate(lines):
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                if i == len(lines) - 1:  # a write torn by a kill: that step reruns on resume
                    break
                raise ValueError(f"{self.path}:{i + 1}: not a JSON record") from None
        return records
