"""Finished artifacts appear whole or not at all, and replacing one never deletes what a link
points to."""

from __future__ import annotations

from pathlib import Path

from frontierlm.atomic import atomic_dir, commit_dir


def _stage_output(final: Path, text: str) -> None:
    tmp = atomic_dir(final)
    (tmp / "out.txt").write_text(text)
    commit_dir(tmp, final)


def test_commit_dir_replaces_a_directory(tmp_path: Path) -> None:
    final = tmp_path / "stage"
    _stage_output(final, "first")
    _stage_output(final, "second")
    assert (final / "out.txt").read_text() == "second"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stage"]


def test_commit_dir_replaces_a_link_and_keeps_its_target(tmp_path: Path) -> None:
    shared = tmp_path / "shared" / "tokenize"
    shared.mkdir(parents=True)
    (shared / "out.txt").write_text("shared")
    final = tmp_path / "run" / "tokenize"
    final.parent.mkdir()
    final.symlink_to(shared, target_is_directory=True)
    _stage_output(final, "own")
    assert not final.is_symlink() and (final / "out.txt").read_text() == "own"
    assert (shared / "out.txt").read_text() == "shared"  # the shared copy is untouched
    assert sorted(p.name for p in final.parent.iterdir()) == ["tokenize"]
