"""Atomic writes: a file under its final name is always whole, old or new, and nothing is left behind."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from hpa_nb.core.files import TEMPORARY_GLOB, atomic_path, temporary_path, write_text


def leftovers(folder: Path) -> list[Path]:
    return sorted(folder.glob(TEMPORARY_GLOB))


def test_success_renames_the_temporary_over_the_target(tmp_path):
    target = tmp_path / "metrics.json"
    target.write_text("old")
    with atomic_path(target) as temporary:
        assert temporary.parent == target.parent and temporary.name.startswith(".")
        temporary.write_text("new")
        assert target.read_text() == "old"  # nothing shows under the final name before the block ends
    assert target.read_text() == "new"
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("error", [ValueError, KeyboardInterrupt])
def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path, error):
    target = tmp_path / "submission.csv"
    target.write_text("old")
    with pytest.raises(error):
        with atomic_path(target) as temporary:
            temporary.write_text("half a fi")
            raise error
    assert target.read_text() == "old"
    assert leftovers(tmp_path) == []


def test_a_failed_first_write_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_path(tmp_path / "model.keras") as temporary:
            temporary.write_bytes(b"half a model")
            raise RuntimeError
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", ["model.keras", "epoch-001.keras", "roc.png", "shard-00000.tfrec", "README"])
def test_the_temporary_keeps_the_suffix(tmp_path, name):
    temporary = temporary_path(tmp_path / name)
    assert temporary.suffix == Path(name).suffix and temporary.name.endswith(name)
    assert temporary.match(TEMPORARY_GLOB)


def test_two_writers_of_one_file_get_different_temporaries(tmp_path):
    target = tmp_path / "history.csv"
    with atomic_path(target) as first, atomic_path(target) as second:
        assert first != second
        first.write_text("first")
        second.write_text("second")
    assert target.read_text() == "first"  # the outer block ends last, so its rename wins
    assert leftovers(tmp_path) == []


def test_the_file_gets_ordinary_permissions(tmp_path):
    # Not mkstemp's owner-only 0600: shards and run folders are shared data.
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    written = write_text(tmp_path / "atomic.txt", "x")
    assert stat.S_IMODE(written.stat().st_mode) == stat.S_IMODE(plain.stat().st_mode)


def test_write_text_creates_the_folder_and_writes_utf8(tmp_path):
    target = tmp_path / "new" / "folder" / "notes.txt"
    assert write_text(target, "12×12 px ✓\n") == target
    assert target.read_bytes() == "12×12 px ✓\n".encode("utf-8")
    assert leftovers(target.parent) == []


def test_write_text_accepts_a_string_path(tmp_path):
    target = write_text(os.fspath(tmp_path / "a.json"), "{}")
    assert isinstance(target, Path) and target.read_text() == "{}"
