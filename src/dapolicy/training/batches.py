"""Which frames each stage trains on, and the batch drawn at every optimizer step.

All frames of the store are loaded once (and their VAE latents cached once); a stage only selects episode
ids (`EpisodeStore.select`) from that global array. Batch indices for step n are a pure function of
(seed, stage, n): an epoch-wise shuffle (every training frame once per epoch, Diffusion-Policy style) whose
permutation is seeded by the epoch number. A resumed run therefore draws exactly the batches the
uninterrupted run would have drawn.

The validation split is a property of the dataset, not of the run: the episodes whose (source, seed) hash
lowest are held out, so every seed and every method sees the same held-out episodes and their validation
losses are comparable.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Callable, Sequence

import numpy as np
import torch

from dapolicy.training.checkpoint import step_seed


def _episode_score(meta: dict[str, Any], index: int) -> float:
    key = f"{meta.get('source', '?')}:{meta['seed']}" if "seed" in meta else f"#{index}"
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little") / 2.0**64


def split_episodes(meta: Sequence[dict[str, Any]], episodes: np.ndarray,
                   val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) episode ids: the round(val_fraction * E) episodes (at least one, never all) whose
    (source, seed) hash lowest. Ranking by a hash of the episode's identity, not by a run seed, keeps the
    held-out set stable across seeds and methods."""
    if val_fraction <= 0 or len(episodes) < 2:
        return episodes, episodes[:0]
    n_val = min(len(episodes) - 1, max(1, round(val_fraction * len(episodes))))
    scores = np.array([_episode_score(meta[i], int(i)) for i in episodes])
    is_val = np.zeros(len(episodes), dtype=bool)
    is_val[np.argsort(scores, kind="stable")[:n_val]] = True
    return episodes[~is_val], episodes[is_val]


def frames_of(episode_ends: np.ndarray, episodes: np.ndarray) -> np.ndarray:
    """Global frame ids of the given episodes, in order."""
    starts = np.concatenate([[0], episode_ends[:-1]])
    if len(episodes) == 0:
        return np.zeros(0, dtype=np.int64)
    return np.concatenate([np.arange(starts[e], episode_ends[e]) for e in episodes]).astype(np.int64)


class EpochIndexer:
    """Indices for step n: positions n*B .. n*B+B-1 of an endless sequence of seeded epoch shuffles."""

    def __init__(self, ids: np.ndarray, batch_size: int, seed: int, stage: str) -> None:
        if len(ids) == 0:
            raise ValueError(f"stage {stage!r} has no training frames")
        self.ids, self.batch_size, self.seed, self.stage = ids, batch_size, seed, stage
        self._perm = lru_cache(maxsize=2)(self._make_perm)

    def _make_perm(self, epoch: int) -> np.ndarray:
        rng = np.random.default_rng(step_seed(self.seed, self.stage, epoch, salt=7))
        return rng.permutation(len(self.ids))

    def __call__(self, step: int) -> np.ndarray:
        n = len(self.ids)
        pos = np.arange(step * self.batch_size, (step + 1) * self.batch_size)
        epochs, offsets = pos // n, pos % n
        out = np.empty(self.batch_size, dtype=np.int64)
        for epoch in np.unique(epochs):
            sel = epochs == epoch
            out[sel] = self.ids[self._perm(int(epoch))[offsets[sel]]]
        return out


def to_torch(batch: dict[str, np.ndarray], device: torch.device) -> dict[str, torch.Tensor]:
    """numpy batch -> tensors on `device` (uint8 images stay uint8; the policy converts them)."""
    out = {}
    for k, v in batch.items():
        t = torch.from_numpy(np.ascontiguousarray(v))
        if t.dtype == torch.float64:
            t = t.float()
        out[k] = t.to(device, non_blocking=True)
    return out


@dataclass
class StageBatches:
    """Batches of one stage: `train(step)` for optimisation, `val()` a fixed list for validation."""

    make: Callable[[np.ndarray], dict[str, np.ndarray]]  # global ids -> numpy batch
    train_ids: np.ndarray
    val_ids: np.ndarray
    batch_size: int
    seed: int
    stage: str
    device: torch.device

    def __post_init__(self) -> None:
        self._indexer = EpochIndexer(self.train_ids, self.batch_size, self.seed, self.stage)

    def train_indices(self, step: int) -> np.ndarray:
        """Global frame ids of step `step`'s whole batch (a process of a data-parallel job loads a slice)."""
        return self._indexer(step)

    def load(self, ids: np.ndarray) -> dict[str, torch.Tensor]:
        """The batch of these global ids, as tensors on the device."""
        return to_torch(self.make(ids), self.device)

    def train(self, step: int) -> dict[str, torch.Tensor]:
        return self.load(self.train_indices(step))

    def val_indices(self, n_batches: int) -> list[np.ndarray]:
        """Global ids of the validation batches: the same at every evaluation (seeded, independent of the step)."""
        if len(self.val_ids) == 0:
            return []
        rng = np.random.default_rng(step_seed(self.seed, self.stage, 0, salt=11))
        size = min(self.batch_size, len(self.val_ids))
        return [rng.choice(self.val_ids, size=size, replace=False) for _ in range(n_batches)]

    def val(self, n_batches: int) -> list[dict[str, torch.Tensor]]:
        """The validation batches as tensors on the device."""
        return [self.load(ids) for ids in self.val_indices(n_batches)]
