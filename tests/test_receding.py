"""Receding-horizon bookkeeping: first frame repeated to fill the history, T_a actions per chunk."""

import numpy as np
import pytest

from dapolicy.receding import RecedingHorizon, env_frame
from dapolicy.spec import EnvSpec

SPEC = EnvSpec(name="t", cameras=("a", "b"), image_size=4, action_dim=2, proprio_dim=1, max_steps=5)


def _obs(v):
    return {"images": {"a": np.full((4, 4, 3), v, np.uint8), "b": np.full((4, 4, 3), v, np.uint8)},
            "proprio": np.array([v], np.float32)}


def test_history_padding_and_queue():
    loop = RecedingHorizon(n_obs_steps=3, n_action_steps=2)
    loop.observe(env_frame(_obs(1), SPEC))
    assert loop.batch()["proprio"][0, :, 0].tolist() == [1, 1, 1]
    assert loop.batch()["images"].shape == (1, 3, 2, 4, 4, 3)
    assert loop.needs_chunk
    loop.enqueue(np.arange(8).reshape(4, 2))
    assert loop.pop().tolist() == [0, 1] and not loop.needs_chunk
    assert loop.pop().tolist() == [2, 3] and loop.needs_chunk
    loop.observe(env_frame(_obs(2), SPEC))
    assert loop.batch()["proprio"][0, :, 0].tolist() == [1, 1, 2]
    loop.reset()
    assert loop.needs_chunk


def test_env_frame_names_what_is_wrong():
    bad = _obs(0)
    del bad["images"]["b"]
    with pytest.raises(ValueError, match="missing camera 'b'"):
        env_frame(bad, SPEC)
    with pytest.raises(ValueError, match=r"'proprio' has shape \(2,\), expected \(1,\)"):
        env_frame(dict(_obs(0), proprio=np.zeros(2)), SPEC)
