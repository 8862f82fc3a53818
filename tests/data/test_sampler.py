"""Windowed sampler: edge padding, next-observation clipping, gather layout, agreement with a naive loop."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dapolicy.data.sampler import WindowSampler, benchmark_sampler

# two episodes: frames 0..2 and 3..7
ENDS = [3, 8]


def test_hand_computed_windows() -> None:
    s = WindowSampler(ENDS, n_obs=2, horizon=4, next_obs_offset=2)
    assert len(s) == 8 and s.num_episodes == 2
    idx = s.indices([0, 2, 3, 6, 7])
    np.testing.assert_array_equal(idx.obs, [[0, 0], [1, 2], [3, 3], [5, 6], [6, 7]])
    np.testing.assert_array_equal(idx.action, [[0, 1, 2, 2], [2, 2, 2, 2], [3, 4, 5, 6], [6, 7, 7, 7],
                                               [7, 7, 7, 7]])
    np.testing.assert_array_equal(idx.action_is_pad, [[0, 0, 0, 1], [0, 1, 1, 1], [0, 0, 0, 0], [0, 0, 1, 1],
                                                      [0, 1, 1, 1]])
    np.testing.assert_array_equal(idx.next_obs, [2, 2, 5, 7, 7])


def test_history_longer_than_episode_repeats_first_frame() -> None:
    s = WindowSampler([2, 5], n_obs=4, horizon=1, next_obs_offset=0)
    idx = s.indices([1, 3])
    np.testing.assert_array_equal(idx.obs, [[0, 0, 0, 1], [2, 2, 2, 3]])
    np.testing.assert_array_equal(idx.next_obs, [1, 3])  # k = 0: the current frame
    assert not idx.action_is_pad.any()


def test_gather_layout_and_values() -> None:
    n, c = 8, 2
    frame_id = np.arange(n)
    images = np.broadcast_to(frame_id[:, None, None, None, None], (n, c, 4, 4, 3)).astype(np.uint8).copy()
    arrays = {
        "images": images,
        "proprio": np.stack([frame_id, -frame_id], 1).astype(np.float32),
        "action": np.stack([frame_id * 10, frame_id], 1).astype(np.float32),
        "latents": np.random.default_rng(0).standard_normal((n, c, 4, 2, 2)).astype(np.float32),
    }
    s = WindowSampler(ENDS, n_obs=2, horizon=4, next_obs_offset=2)
    b = s.gather(arrays, [0, 6])
    assert set(b) == {"images", "next_images", "proprio", "next_proprio", "action", "action_is_pad", "latents",
                      "next_latents"}
    assert b["images"].shape == (2, 2, c, 4, 4, 3) and b["images"].dtype == np.uint8
    assert b["next_images"].shape == (2, c, 4, 4, 3)
    assert b["proprio"].shape == (2, 2, 2) and b["next_proprio"].shape == (2, 2)
    assert b["action"].shape == (2, 4, 2) and b["action_is_pad"].dtype == bool
    assert b["latents"].shape == (2, 2, c, 4, 2, 2) and b["next_latents"].shape == (2, c, 4, 2, 2)
    np.testing.assert_array_equal(b["images"][:, :, 0, 0, 0, 0], [[0, 0], [5, 6]])
    np.testing.assert_array_equal(b["next_images"][:, 1, 0, 0, 0], [2, 7])
    np.testing.assert_array_equal(b["action"][1, :, 0], [60, 70, 70, 70])
    np.testing.assert_array_equal(b["action_is_pad"][1], [False, False, True, True])
    np.testing.assert_array_equal(b["next_latents"][0], arrays["latents"][2])


def test_gather_torch_tensors() -> None:
    s = WindowSampler(ENDS, n_obs=2, horizon=3, next_obs_offset=1)
    arrays = {"proprio": torch.arange(16, dtype=torch.float32).reshape(8, 2),
              "action": torch.arange(8, dtype=torch.float32)[:, None]}
    b = s.gather(arrays, np.array([2]))
    assert isinstance(b["proprio"], torch.Tensor) and isinstance(b["action_is_pad"], torch.Tensor)
    assert b["action"][0, :, 0].tolist() == [2.0, 2.0, 2.0]
    assert b["action_is_pad"][0].tolist() == [False, True, True]
    assert b["next_proprio"][0].tolist() == [4.0, 5.0]


def _naive(ends: np.ndarray, t: int, n_obs: int, horizon: int, k: int):
    e_idx = int(np.searchsorted(ends, t, side="right"))
    s, e = (int(ends[e_idx - 1]) if e_idx else 0), int(ends[e_idx])
    obs = [min(max(i, s), e - 1) for i in range(t - n_obs + 1, t + 1)]
    act = [min(i, e - 1) for i in range(t, t + horizon)]
    pad = [i > e - 1 for i in range(t, t + horizon)]
    return obs, act, pad, min(t + k, e - 1)


def test_matches_naive_loop_on_random_episodes() -> None:
    rng = np.random.default_rng(1)
    ends = np.cumsum(rng.integers(1, 12, size=20))
    for n_obs, horizon, k in [(1, 1, 0), (2, 16, 8), (3, 5, 20)]:
        s = WindowSampler(ends, n_obs, horizon, k)
        ids = np.arange(len(s))
        idx = s.indices(ids)
        for t in ids:
            obs, act, pad, nxt = _naive(ends, int(t), n_obs, horizon, k)
            assert idx.obs[t].tolist() == obs and idx.action[t].tolist() == act
            assert idx.action_is_pad[t].tolist() == pad and idx.next_obs[t] == nxt


def test_episode_windows_and_batches() -> None:
    s = WindowSampler(ENDS)
    np.testing.assert_array_equal(s.episode_windows([1]), [3, 4, 5, 6, 7])
    np.testing.assert_array_equal(s.episode_windows([1, 0]), [3, 4, 5, 6, 7, 0, 1, 2])
    batches = list(s.batches(3, rng=0))
    assert [len(b) for b in batches] == [3, 3, 2]
    assert sorted(np.concatenate(batches).tolist()) == list(range(8))
    assert [len(b) for b in s.batches(3, rng=0, drop_last=True)] == [3, 3]
    np.testing.assert_array_equal(np.concatenate(list(s.batches(3, rng=5))),
                                  np.concatenate(list(s.batches(3, rng=5))))  # seeded


def test_errors() -> None:
    s = WindowSampler(ENDS)
    with pytest.raises(IndexError):
        s.indices([8])
    with pytest.raises(IndexError):
        s.indices([-1])
    with pytest.raises(ValueError, match="has 7 frames"):
        s.gather({"proprio": np.zeros((7, 2))}, [0])
    with pytest.raises(ValueError, match="strictly increasing"):
        WindowSampler([3, 3, 5])
    with pytest.raises(ValueError):
        WindowSampler(ENDS, n_obs=0)
    assert len(WindowSampler([])) == 0


def test_benchmark_runs() -> None:
    assert benchmark_sampler(n_episodes=2, episode_length=20, seconds=0.05) > 0
