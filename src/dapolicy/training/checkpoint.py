"""Checkpoints that survive a kill at any moment, and the RNG state that makes a resume exact.

Writes go to a temporary file in the same folder, are fsynced, then `os.replace`d over the target, so a
reader sees either the old or the new checkpoint, never half of one.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dapolicy.atomic import atomic_write_bytes, remove_stale_temp_files, write_json_atomic

__all__ = ["atomic_write_bytes", "atomic_write_json", "remove_stale_temp_files", "save_checkpoint",
           "load_checkpoint", "rng_state", "set_rng_state"]


def atomic_write_json(path: Path, obj: Any) -> None:
    write_json_atomic(path, obj, indent=2, sort_keys=True)


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Atomically `torch.save` a checkpoint dict (adds the current RNG states under "rng")."""
    state = dict(state, rng=rng_state())
    atomic_write_bytes(Path(path), lambda f: torch.save(state, f))


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """A checkpoint written by `save_checkpoint`; an unreadable one is a `CorruptFileError` naming the file and
    the two ways out (torch's own errors - unpickling, zip, EOF - do not say which file or what to do)."""
    from dapolicy.atomic import CorruptFileError

    path = Path(path)
    try:
        # weights_only=False: the checkpoint holds numpy RNG state and plain Python objects we wrote ourselves.
        state = torch.load(path, map_location=map_location, weights_only=False)
    except (FileNotFoundError, PermissionError, IsADirectoryError):
        raise
    except Exception as err:  # torch.load raises many types for a damaged file
        reason = " ".join(str(err).split()).split(". ")[0][:160] or type(err).__name__  # its first sentence
        raise CorruptFileError(f"{path} is corrupt or truncated ({reason}): delete it (a --resume then trains its "
                               f"stage again from the start), or pass --overwrite to start the run over") from err
    if not isinstance(state, dict):
        raise CorruptFileError(f"{path} is not a dap training checkpoint: delete it, or pass --overwrite")
    return state


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
