"""Atomic writes honour the umask like a plain `open` / `mkdir` (not mkstemp's owner-only 0600)."""
from __future__ import annotations

import os
import stat

import pytest

from fora.formats.atomic import atomic_write_json, atomic_write_text, staging_dir


@pytest.fixture
def umask():
    def set_mask(mask: int) -> None:
        os.umask(mask)
    before = os.umask(0o022)
    yield set_mask
    os.umask(before)


@pytest.mark.parametrize("mask, file_mode, dir_mode", [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700),
                                                       (0o002, 0o664, 0o775)])
def test_files_and_directories_get_the_mode_of_the_umask(tmp_path, umask, mask, file_mode, dir_mode):
    umask(mask)
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    assert stat.S_IMODE(plain.stat().st_mode) == file_mode       # the oracle: what open() gives
    atomic_write_text(tmp_path / "a.txt", "hello")
    assert stat.S_IMODE((tmp_path / "a.txt").stat().st_mode) == file_mode
    with staging_dir(tmp_path / "ckpt") as tmp:
        atomic_write_json(tmp / "state.json", {"step": 1})
    assert stat.S_IMODE((tmp_path / "ckpt").stat().st_mode) == dir_mode
    assert stat.S_IMODE((tmp_path / "ckpt" / "state.json").stat().st_mode) == file_mode
