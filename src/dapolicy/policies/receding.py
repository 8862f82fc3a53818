"""Receding-horizon bookkeeping shared by every chunked policy and the evaluator.

The last T_o frames (at an episode's start the first frame is repeated, as the training sampler pads) and
the queue of the T_a actions still to execute from the last predicted chunk of H.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Mapping

import numpy as np

from dapolicy.spec import EnvSpec


def env_frame(env_obs: Mapping[str, Any], spec: EnvSpec) -> dict[str, np.ndarray]:
    """One env observation -> {"images": uint8 [C, S, S, 3] (spec camera order), "proprio": [P]}, checked."""
    missing = [k for k in ("images", "proprio") if k not in env_obs]
    if missing:
        raise ValueError(f"observation is missing key(s) {missing}")
    s = spec.image_size
    images = []
    for cam in spec.cameras:
        if cam not in env_obs["images"]:
            raise ValueError(f"observation is missing camera {cam!r} (expected cameras {list(spec.cameras)})")
        img = np.asarray(env_obs["images"][cam])
        if img.shape != (s, s, 3):
            raise ValueError(f"camera {cam!r} image has shape {img.shape}, expected ({s}, {s}, 3)")
        images.append(img.astype(np.uint8, copy=False))
    proprio = np.asarray(env_obs["proprio"], dtype=np.float32)
    if proprio.shape != (spec.proprio_dim,):
        raise ValueError(f"'proprio' has shape {proprio.shape}, expected ({spec.proprio_dim},)")
    return {"images": np.stack(images), "proprio": proprio}


class RecedingHorizon:
    """Observation history of T_o frames and a queue of T_a actions."""

    def __init__(self, n_obs_steps: int, n_action_steps: int) -> None:
        self.n_obs_steps = n_obs_steps
        self.n_action_steps = n_action_steps
        self.reset()

    def reset(self) -> None:
        self._history: deque[dict[str, np.ndarray]] = deque(maxlen=self.n_obs_steps)
        self._queue: deque[np.ndarray] = deque()

    def observe(self, frame: dict[str, np.ndarray]) -> None:
        if not self._history:
            self._history.extend([frame] * self.n_obs_steps)
        else:
            self._history.append(frame)

    @property
    def needs_chunk(self) -> bool:
        return not self._queue

    def batch(self) -> dict[str, np.ndarray]:
        """The policy input: images [1, T_o, C, S, S, 3], proprio [1, T_o, P]."""
        return {k: np.stack([f[k] for f in self._history])[None] for k in ("images", "proprio")}

    def enqueue(self, chunk: np.ndarray) -> None:
        """Queue the first T_a actions of a predicted chunk [H, A]."""
        self._queue.extend(np.asarray(a, np.float32) for a in chunk[: self.n_action_steps])

    def pop(self) -> np.ndarray:
        return self._queue.popleft()
