import random

import numpy as np
import pytest
import torch

from dapolicy.training.checkpoint import (
    atomic_write_bytes,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
    step_seed,
)


def test_atomic_write_keeps_old_file_on_failure(tmp_path) -> None:
    path = tmp_path / "ck.pt"
    save_checkpoint(path, {"step": 1})

    def broken(f):
        f.write(b"partial")
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError):
        atomic_write_bytes(path, broken)
    assert load_checkpoint(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["ck.pt"]  # no temp file left behind


def test_rng_state_round_trip(tmp_path) -> None:
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    save_checkpoint(tmp_path / "c.pt", {})
    expected = (random.random(), np.random.rand(), torch.rand(1))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    set_rng_state(load_checkpoint(tmp_path / "c.pt")["rng"])
    assert (random.random(), np.random.rand()) == expected[:2] and torch.equal(torch.rand(1), expected[2])
    assert set(rng_state()) >= {"python", "numpy", "torch"}


def test_step_seed_depends_on_all_parts() -> None:
    base = step_seed(0, "policy", 5)
    assert base == step_seed(0, "policy", 5) and 0 <= base < 2**63
    assert len({base, step_seed(1, "policy", 5), step_seed(0, "vae", 5), step_seed(0, "policy", 6),
                step_seed(0, "policy", 5, salt=1)}) == 5
