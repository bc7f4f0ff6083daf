"""core.atomic: a file is replaced whole or not at all, and nothing is left behind either way."""

from __future__ import annotations

import pytest

from core.atomic import atomic_open, atomic_path, write_text


def test_a_clean_write_replaces_the_file(tmp_path):
    target = tmp_path / "sub" / "metrics.json"
    write_text(target, "old")
    write_text(target, "new ünïcode")
    assert target.read_text(encoding="utf-8") == "new ünïcode"
    assert sorted(p.name for p in target.parent.iterdir()) == ["metrics.json"]


@pytest.mark.parametrize("mode", ["w", "wb"])
def test_a_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path, mode):
    target = tmp_path / "best.pt"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_open(target, mode) as fh:
            fh.write("half" if mode == "w" else b"half")
            raise RuntimeError("disk full")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["best.pt"]


def test_the_temp_file_is_hidden_from_a_glob_for_the_target_suffix(tmp_path):
    with atomic_path(tmp_path / "chunk.npz") as tmp:
        tmp.write_bytes(b"x")
        assert list(tmp_path.glob("*.npz")) == []  # a journal reader never picks up a chunk being written
    assert [p.name for p in tmp_path.glob("*.npz")] == ["chunk.npz"]


def test_only_whole_file_modes_are_accepted(tmp_path):
    with pytest.raises(ValueError, match="mode"):
        with atomic_open(tmp_path / "x", "a"):
            pass
