"""Atomic folder writes: never replace a folder that appeared meanwhile; plain permissions."""

from __future__ import annotations

import os
import stat

import pytest

from keras_vqpix.io import atomic_directory


def test_atomic_directory_gets_plain_mkdir_permissions(tmp_path):
    with atomic_directory(tmp_path / "out") as tmp:
        (tmp / "file").write_text("x")
    umask = os.umask(0o022)
    os.umask(umask)
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o777 & ~umask
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_atomic_directory_never_replaces_a_folder_written_meanwhile(tmp_path):
    target = tmp_path / "1"
    with pytest.raises(FileExistsError, match="meanwhile"), atomic_directory(target) as tmp:
        (tmp / "mine").write_text("x")
        target.mkdir()
        (target / "theirs").write_text("y")
    assert [p.name for p in target.iterdir()] == ["theirs"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["1"]


def test_atomic_directory_overwrite_replaces(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old").write_text("x")
    with atomic_directory(target, overwrite=True) as tmp:
        (tmp / "new").write_text("y")
    assert [p.name for p in target.iterdir()] == ["new"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_check_output_folder_takes_a_new_or_empty_folder_and_refuses_the_rest(tmp_path):
    import pytest

    from keras_vqpix.io import check_output_folder

    assert check_output_folder(tmp_path / "new") == tmp_path / "new"
    (tmp_path / "empty").mkdir()
    assert check_output_folder(tmp_path / "empty") == tmp_path / "empty"
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="is a file; choose a folder"):
        check_output_folder(tmp_path / "file", overwrite=True)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "mine.txt").write_text("x")
    with pytest.raises(FileExistsError, match="not empty; choose a new folder$"):
        check_output_folder(tmp_path / "full")
    with pytest.raises(FileExistsError, match="choose a new folder or pass --overwrite$"):
        check_output_folder(tmp_path / "full", overwrite=False)
    assert check_output_folder(tmp_path / "full", overwrite=True) == tmp_path / "full"
