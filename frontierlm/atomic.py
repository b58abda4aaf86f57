"""Atomic writes: a crash or kill leaves either the old complete artifact or the new one."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO


def temp_path(final: Path) -> Path:
    """Where `atomic_dir` builds `final` (every process of a job computes the same name)."""
    return final.with_name(f".tmp-{final.name}")


def atomic_dir(final: Path) -> Path:
    """A fresh temp directory beside `final`; `commit_dir` renames it into place."""
    tmp = temp_path(final)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def commit_dir(tmp: Path, final: Path) -> None:
    """Move `tmp` to `final`, replacing any previous `final` (parked aside, then deleted)."""
    if final.exists():
        old = final.with_name(f".old-{final.name}")
        if old.is_symlink():
            old.unlink()
        elif old.exists():
            shutil.rmtree(old)
        os.replace(final, old)
        os.replace(tmp, final)
        if old.is_symlink():  # `final` was a link (a shared upstream stage): drop the link only
            old.unlink()
        else:
            shutil.rmtree(old)
    else:
        os.replace(tmp, final)


@contextmanager
def atomic_file(final: Path) -> Iterator[BinaryIO]:
    """A binary file that appears at `final` complete or not at all: written beside it under a
    temp name, renamed on success, removed when the writing fails."""
    tmp = temp_path(final)
    try:
        with open(tmp, "wb") as f:
            yield f
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, final)


def write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
