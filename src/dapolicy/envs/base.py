"""The environment interface every simulated task implements, and the registry `make_env`.

An observation is a plain dict so it crosses process and file boundaries untouched:
    {"images": {camera_name: uint8 [H, W, 3]}, "proprio": float32 [P]}
Cameras are always listed in `Env.cameras` order; the policy stacks them in that order.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np

from dapolicy.spec import EnvSpec

if TYPE_CHECKING:
    from dapolicy.envs.perturbations import OODConfig

Observation = dict[str, Any]


@dataclass
class StepResult:
    """What one env step returns besides the observation.

    success: the task's success criterion holds at this step.
    score: task progress in [0, 1] (PushT: clipped coverage / 0.95 as in Diffusion Policy; else success).
    done: the episode cannot continue (time limit or terminal state).
    info: the simulator's raw info dict, for debugging.
    """

    success: bool
    score: float
    done: bool
    info: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class Env(Protocol):
    """A seeded, image-observation task. Implementations: `pusht`, `metaworld/<task>`."""

    spec: EnvSpec

    def reset(self, seed: int) -> Observation:
        """Start a new episode; the same seed gives the same start state (and the same OOD draw)."""

    def step(self, action: np.ndarray) -> tuple[Observation, StepResult]:
        """Apply one action (shape [action_dim], in the env's native units)."""

    def expert_action(self) -> np.ndarray:
        """The scripted expert's action for the current state (uses privileged simulator state)."""

    def close(self) -> None: ...


def make_env(name: str, image_size: int = 64, cameras: tuple[str, ...] | None = None,
             ood: "OODConfig | None" = None, **kwargs: Any) -> Env:
    """Build a task by name: "pusht" or "metaworld/<task-v3>" (e.g. "metaworld/button-press-v3").

    ood: an out-of-distribution perturbation drawn per episode from the reset seed (None = in distribution).
    """
    if name == "pusht":
        unknown = sorted(set(cameras or ()) - {"top"})
        if unknown:  # PushT renders one view; asking for another must not silently give it
            raise ValueError(f"unknown camera(s) {unknown} for pusht; available: top")
        from dapolicy.envs.pusht import PushTEnv

        return PushTEnv(image_size=image_size, ood=ood, **kwargs)
    if name.startswith("metaworld/"):
        from dapolicy.envs.metaworld import MetaWorldEnv

        return MetaWorldEnv(task=name.split("/", 1)[1], image_size=image_size, cameras=cameras, ood=ood,
                            **kwargs)
    raise ValueError(f"unknown env {name!r}: expected 'pusht' or 'metaworld/<task-v3>' (e.g. metaworld/push-v3)")
