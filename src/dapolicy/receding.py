"""Receding-horizon bookkeeping shared by every chunked policy, the evaluator, the server and the robot client.

Torch-free (numpy only), so the robot-side client (`dapolicy.client`) uses the same checks and history.

The last T_o frames (at an episode's start the first frame is repeated, as the training sampler pads) and
the queue of the T_a actions still to execute from the last predicted chunk of H.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Mapping, Sequence

import numpy as np

from dapolicy.spec import EnvSpec


def check_frame(env_obs: Mapping[str, Any], cameras: Sequence[str], image_size: int,
                proprio_dim: int) -> dict[str, np.ndarray]:
    """One env observation -> {"images": uint8 [C, S, S, 3] (in `cameras` order), "proprio": float32 [P]}.

    Errors name the missing key or camera, or the wrong shape or dtype.
    """
    missing = [k for k in ("images", "proprio") if k not in env_obs]
    if missing:
        raise ValueError(f"observation is missing key(s) {missing}")
    images = []
    for cam in cameras:
        if cam not in env_obs["images"]:
            raise ValueError(f"observation is missing camera {cam!r} (expected cameras {list(cameras)})")
        img = np.asarray(env_obs["images"][cam])
        if img.shape != (image_size, image_size, 3) or img.dtype != np.uint8:
            raise ValueError(f"camera {cam!r} image is {img.dtype} {img.shape}, expected uint8 "
                             f"({image_size}, {image_size}, 3)")
        images.append(img)
    proprio = np.asarray(env_obs["proprio"], dtype=np.float32)
    if proprio.shape != (proprio_dim,):
        raise ValueError(f"'proprio' has shape {proprio.shape}, expected ({proprio_dim},)")
    return {"images": np.stack(images), "proprio": proprio}


def env_frame(env_obs: Mapping[str, Any], spec: EnvSpec) -> dict[str, np.ndarray]:
    """`check_frame` with the cameras and sizes of a task spec."""
    return check_frame(env_obs, spec.cameras, spec.image_size, spec.proprio_dim)


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
