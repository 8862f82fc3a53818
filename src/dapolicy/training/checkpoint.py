"""Checkpoints that survive a kill at any moment, and the RNG state that makes a resume exact.

Writes go to a temporary file in the same folder, are fsynced, then `os.replace`d over the target, so a
reader sees either the old or the new checkpoint, never half of one.
"""

from __future__ import annotations

import json
import os
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_umask()  # what open() would give; mkstemp's 0600 would hide runs from other users


def atomic_write_bytes(path: Path, write: Any) -> None:
    """Call `write(fileobj)` on a temp file beside `path`, then atomically move it into place.
    Temp files are named `.<name>.*.tmp`; one left by a kill is removed by `remove_stale_temp_files`."""
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
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def remove_stale_temp_files(directory: Path) -> None:
    """Delete temp files of writes that a kill interrupted (call only while holding the run's lock)."""
    if Path(directory).is_dir():
        for p in Path(directory).glob(".*.tmp"):
            p.unlink(missing_ok=True)


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, lambda f: f.write((json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()))


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Atomically `torch.save` a checkpoint dict (adds the current RNG states under "rng")."""
    state = dict(state, rng=rng_state())
    atomic_write_bytes(Path(path), lambda f: torch.save(state, f))


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    # weights_only=False: the checkpoint holds numpy RNG state and plain Python objects we wrote ourselves.
    return torch.load(Path(path), map_location=map_location, weights_only=False)


def rng_state() -> dict[str, Any]:
    """Python, numpy and torch (CPU and every CUDA device) generator states."""
    state: dict[str, Any] = {"python": random.getstate(), "numpy": np.random.get_state(),
                             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def step_seed(seed: int, stage: str, step: int, salt: int = 0) -> int:
    """A 63-bit seed that depends only on (run seed, stage, step): draws made from it are the same whether
    or not the run was interrupted before this step."""
    stage_key = sum(ord(c) * 131 ** i for i, c in enumerate(stage)) % (2**31)
    seq = np.random.SeedSequence([int(seed) % (2**32), stage_key, int(step), int(salt)])
    return int(seq.generate_state(1, np.uint64)[0] >> np.uint64(1))


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch global generators (CUDA included)."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
