"""genrec_fast.io: atomic files and folders, and recovery from a crash in the middle of a folder swap."""
import os

import pytest

from genrec_fast.io import atomic_dir, atomic_write_text, recover_dir


def _write(text):
    def write(d):
        (d / "a.txt").write_text(text)
        (d / "sub").mkdir()
        (d / "sub" / "b.txt").write_text(text * 2)
    return write


def test_atomic_dir_replaces_a_folder_and_leaves_nothing_beside_it(tmp_path):
    final = tmp_path / "model"
    atomic_dir(final, _write("one"))
    atomic_dir(final, _write("two"))
    assert (final / "a.txt").read_text() == "two" and (final / "sub" / "b.txt").read_text() == "twotwo"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_a_failed_write_keeps_the_previous_version(tmp_path):
    final = tmp_path / "model"
    atomic_dir(final, _write("one"))

    def boom(d):
        (d / "a.txt").write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_dir(final, boom)
    assert (final / "a.txt").read_text() == "one"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_recover_after_a_crash_between_the_two_renames(tmp_path):
    final = tmp_path / "model"
    atomic_dir(final, _write("one"))
    # what a crash leaves: the previous version moved aside, the new one still under its temp name
    os.replace(final, tmp_path / ".model.old-deadbeef")
    (tmp_path / ".model.tmp-x").mkdir()
    (tmp_path / ".model.tmp-x" / "a.txt").write_text("half")
    recover_dir(final)
    assert (final / "a.txt").read_text() == "one"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    # a leftover old version next to a present folder is removed, and the next swap works
    (tmp_path / ".model.old-0001").mkdir()
    atomic_dir(final, _write("two"))
    assert (final / "a.txt").read_text() == "two"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_atomic_write_text(tmp_path):
    p = tmp_path / "x" / "f.json"
    atomic_write_text(p, "{}")
    atomic_write_text(p, "[1]")
    assert p.read_text() == "[1]" and sorted(q.name for q in p.parent.iterdir()) == ["f.json"]


def test_published_files_and_folders_get_umask_permissions_not_private_temp_ones(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "f.txt", "x")
        atomic_dir(tmp_path / "d", _write("one"))
    finally:
        os.umask(old)
    assert (tmp_path / "f.txt").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "d").stat().st_mode & 0o777 == 0o755


def test_atomic_dir_refuses_the_current_folder_and_normalises_dots(tmp_path, monkeypatch):
    (tmp_path / "ds").mkdir()
    monkeypatch.chdir(tmp_path / "ds")
    for target in (".", "..", "sub/../."):
        with pytest.raises(ValueError, match="the current folder .* cannot be replaced as a whole"):
            atomic_dir(target, _write("x"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"] and not any((tmp_path / "ds").iterdir())
    out = atomic_dir("new/x/..", _write("one"))  # 'new/x/..' is 'new'
    assert str(out) == "new" and (tmp_path / "ds" / "new" / "a.txt").read_text() == "one"
    assert sorted(p.name for p in (tmp_path / "ds").iterdir()) == ["new"]
