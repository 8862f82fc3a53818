"""Windowed sampler: turns concatenated episodes into (observation history, action chunk, next observation).

For frame t of an episode covering frames [s, e) of the concatenated arrays (one window per frame):
    observation frames  clip(t-T_o+1 .. t, s, e-1)    (before the start, the first frame is repeated)
    actions             t .. t+H-1 clipped to e-1     (past the end the last action is repeated and flagged
                                                      in `action_is_pad`, so losses can mask it)
    next observation    min(t+k, e-1)                 (k = next_obs_offset; the frame seen at the next re-plan)
All index arithmetic is vectorised: a batch costs a few numpy fancy-indexing calls, no Python loop per sample.

`python -m dapolicy.data.sampler` prints the gather throughput on synthetic 64-px two-camera data.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Sequence

import numpy as np


@dataclass(frozen=True)
class WindowIndices:
    """Frame indices of a batch of windows, into the concatenated per-frame arrays.

    obs: int64 [B, T_o]; action: int64 [B, H]; action_is_pad: bool [B, H]; next_obs: int64 [B].
    """

    obs: np.ndarray
    action: np.ndarray
    action_is_pad: np.ndarray
    next_obs: np.ndarray


class WindowSampler:
    """One window per frame of every episode; `gather` builds a batch from per-frame arrays."""

    def __init__(self, episode_ends: Sequence[int] | np.ndarray, n_obs: int = 2, horizon: int = 16,
                 next_obs_offset: int = 8) -> None:
        ends = np.asarray(episode_ends, dtype=np.int64).reshape(-1)
        if n_obs < 1 or horizon < 1 or next_obs_offset < 0:
            raise ValueError(f"need n_obs >= 1, horizon >= 1, next_obs_offset >= 0; got {n_obs}, {horizon}, "
                             f"{next_obs_offset}")
        starts = np.concatenate([[0], ends[:-1]]).astype(np.int64)
        if len(ends) and (ends <= starts).any():
            raise ValueError("episode_ends must be strictly increasing and positive (no empty episodes)")
        self.episode_ends = ends
        self.episode_starts = starts
        self.n_obs, self.horizon, self.next_obs_offset = int(n_obs), int(horizon), int(next_obs_offset)
        lengths = ends - starts
        episode_of = np.repeat(np.arange(len(ends), dtype=np.int64), lengths)
        # per-frame first and last frame of its episode: two lookups per batch instead of a search
        self._first = starts[episode_of]
        self._last = ends[episode_of] - 1
        self._obs_offsets = np.arange(1 - self.n_obs, 1, dtype=np.int64)
        self._action_offsets = np.arange(self.horizon, dtype=np.int64)

    def __len__(self) -> int:
        return int(self.episode_ends[-1]) if len(self.episode_ends) else 0

    @property
    def num_episodes(self) -> int:
        return int(len(self.episode_ends))

    def indices(self, window_ids: Sequence[int] | np.ndarray) -> WindowIndices:
        """Frame indices (with edge padding) of the given windows; a window id is its frame t."""
        t = np.asarray(window_ids, dtype=np.int64).reshape(-1)
        if len(t) and (t.min() < 0 or t.max() >= len(self)):
            raise IndexError(f"window ids must be in [0, {len(self)}), got range [{t.min()}, {t.max()}]")
        first, last = self._first[t], self._last[t]
        obs = np.maximum(t[:, None] + self._obs_offsets, first[:, None])
        raw = t[:, None] + self._action_offsets
        pad = raw > last[:, None]
        action = np.minimum(raw, last[:, None])
        next_obs = np.minimum(t + self.next_obs_offset, last)
        return WindowIndices(obs=obs, action=action, action_is_pad=pad, next_obs=next_obs)

    def gather(self, arrays: Mapping[str, Any], window_ids: Sequence[int] | np.ndarray) -> dict[str, Any]:
        """Build a batch: "action" -> [B,H,A] plus "action_is_pad" [B,H]; any other key X -> X [B,T_o,...]
        (observation frames) and "next_"+X [B,...] (frame t+k). Works on numpy arrays and torch tensors."""
        idx = self.indices(window_ids)
        batch: dict[str, Any] = {}
        for key, arr in arrays.items():
            if len(arr) != len(self):
                raise ValueError(f"array {key!r} has {len(arr)} frames, the sampler indexes {len(self)}")
            if key == "action":
                batch["action"] = _take(arr, idx.action)
                batch["action_is_pad"] = _as_like(arr, idx.action_is_pad)
            else:
                batch[key] = _take(arr, idx.obs)
                batch["next_" + key] = _take(arr, idx.next_obs)
        return batch

    def episode_windows(self, episodes: Sequence[int] | np.ndarray) -> np.ndarray:
        """Window ids of the given episodes (positions in `episode_ends`), e.g. for a train/val split by episode."""
        episodes = np.asarray(episodes, dtype=np.int64).reshape(-1)
        if not len(episodes):
            return np.zeros(0, np.int64)
        return np.concatenate([np.arange(self.episode_starts[e], self.episode_ends[e]) for e in episodes])

    def batches(self, batch_size: int, rng: np.random.Generator | int | None = None, shuffle: bool = True,
                drop_last: bool = False, window_ids: np.ndarray | None = None) -> Iterator[np.ndarray]:
        """One epoch of window-id batches (feed each to `gather`)."""
        ids = np.arange(len(self), dtype=np.int64) if window_ids is None else np.asarray(window_ids, np.int64)
        if shuffle:
            ids = np.random.default_rng(rng).permutation(ids)
        stop = len(ids) - (len(ids) % batch_size if drop_last else 0)
        for i in range(0, stop, batch_size):
            yield ids[i:i + batch_size]


def _take(arr: Any, idx: np.ndarray) -> Any:
    if isinstance(arr, np.ndarray):
        return arr[idx]
    import torch  # only when the caller already works with tensors

    return arr[torch.from_numpy(idx).to(arr.device)]


def _as_like(arr: Any, mask: np.ndarray) -> Any:
    if isinstance(arr, np.ndarray):
        return mask
    import torch

    return torch.from_numpy(mask).to(arr.device)


def benchmark_sampler(n_episodes: int = 40, episode_length: int = 100, image_size: int = 64, cameras: int = 2,
                      batch_size: int = 64, n_obs: int = 2, horizon: int = 16, next_obs_offset: int = 8,
                      seconds: float = 2.0, seed: int = 0) -> float:
    """Windows/s of `gather` on random uint8 images [N, C, S, S, 3] + proprio + actions (random batches)."""
    rng = np.random.default_rng(seed)
    n = n_episodes * episode_length
    arrays = {
        "images": rng.integers(0, 256, size=(n, cameras, image_size, image_size, 3), dtype=np.uint8),
        "proprio": rng.standard_normal((n, 9)).astype(np.float32),
        "action": rng.standard_normal((n, 4)).astype(np.float32),
    }
    sampler = WindowSampler(np.arange(1, n_episodes + 1) * episode_length, n_obs, horizon, next_obs_offset)
    sampler.gather(arrays, rng.integers(0, n, batch_size))  # warm-up
    windows, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        sampler.gather(arrays, rng.integers(0, n, batch_size))
        windows += batch_size
    return windows / (time.perf_counter() - start)


if __name__ == "__main__":
    rate = benchmark_sampler()
    print(f"WindowSampler.gather: {rate:,.0f} windows/s (batch 64, T_o=2, H=16, k=8, images uint8 [N,2,64,64,3])")
