"""Crash-safe writes: a failed write keeps the old file and leaves no temp file behind."""

import json
import os

import numpy as np
import pytest

from dapolicy.atomic import atomic_write_bytes, remove_stale_temp_files, write_json_atomic


def test_json_round_trip_with_numpy_values_and_normal_permissions(tmp_path):
    path = tmp_path / "sub" / "x.json"
    write_json_atomic(path, {"a": np.float32(1.5), "b": np.arange(3), "c": (1, 2)})
    assert json.loads(path.read_text()) == {"a": 1.5, "b": [0, 1, 2], "c": [1, 2]}
    mask = os.umask(0)
    os.umask(mask)
    assert (path.stat().st_mode & 0o777) == 0o666 & ~mask


def test_failed_write_keeps_the_old_file_and_no_temp(tmp_path):
    path = tmp_path / "x.bin"
    atomic_write_bytes(path, lambda f: f.write(b"old"))

    def crash(f):
        f.write(b"partial")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        atomic_write_bytes(path, crash)
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["x.bin"]


def test_stale_temp_files_are_removed(tmp_path):
    (tmp_path / ".x.bin.abc.tmp").write_bytes(b"leftover")
    (tmp_path / "keep.txt").write_text("k")
    remove_stale_temp_files(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]
