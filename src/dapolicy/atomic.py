"""Crash-safe file writes: the one implementation every module uses.

A write goes to a temporary sibling `.<name>.*.tmp`, is fsynced, then `os.replace`d over the target (and
the folder fsynced), so a reader sees the old file or the new one, never half of one. A temp file left by
a kill is recognisable by its name and removed by `remove_stale_temp_files`.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Callable


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_umask()  # what open() would give; mkstemp's 0600 would hide files from other users


def atomic_write_bytes(path: str | os.PathLike, write: Callable[[BinaryIO], Any]) -> None:
    """Call `write(fileobj)` on a temp file beside `path`, then move it into place atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.fchmod(fd, _FILE_MODE)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def to_jsonable(value: Any) -> Any:
    """Plain JSON values from numpy scalars/arrays, paths, tuples and nested containers."""
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "tolist") and type(value).__module__ == "numpy":
        return value.tolist()
    return value


def write_json_atomic(path: str | os.PathLike, payload: Any, indent: int = 2, sort_keys: bool = False) -> None:
    """Atomic JSON write (numpy values converted)."""
    text = json.dumps(to_jsonable(payload), indent=indent, sort_keys=sort_keys) + "\n"
    atomic_write_bytes(path, lambda f: f.write(text.encode()))


class CorruptFileError(ValueError):
    """A file this package wrote is not readable any more (truncated, edited by hand, disk trouble)."""


def read_json(path: str | os.PathLike, fix: str = "") -> Any:
    """A JSON file's content; a corrupt file is an error naming the file (and `fix`, what to do about it),
    because a bare JSONDecodeError ("Expecting value: line 1 column 1") does not say which file is broken."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CorruptFileError(f"{path} is corrupt (not valid JSON: {err})" + (f"; {fix}" if fix else "")) from None


def fsync_dir(path: str | os.PathLike) -> None:
    """Persist a rename inside `path` (best effort: some filesystems refuse to open folders)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def remove_stale_temp_files(directory: str | os.PathLike) -> None:
    """Delete temp files of writes that a kill interrupted (only while no other writer is active)."""
    if Path(directory).is_dir():
        for p in Path(directory).glob(".*.tmp"):
            p.unlink(missing_ok=True)
