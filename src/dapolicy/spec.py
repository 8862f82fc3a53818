"""Shared descriptions of data that every layer uses (policies, data store, envs, serving).

Kept in a neutral module so that `policies/` and `data/` never import `envs/` (which pulls in simulators).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class EnvSpec:
    """Static description of a task, stored with datasets and models so they can be checked for a match."""

    name: str
    cameras: tuple[str, ...]
    image_size: int
    action_dim: int
    proprio_dim: int
    max_steps: int
    action_low: tuple[float, ...] = ()
    action_high: tuple[float, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["cameras"] = list(self.cameras)
        d["action_low"] = list(self.action_low)
        d["action_high"] = list(self.action_high)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "EnvSpec":
        d = dict(d)
        d["cameras"] = tuple(d["cameras"])
        d["action_low"] = tuple(d.get("action_low", ()))
        d["action_high"] = tuple(d.get("action_high", ()))
        return cls(**d)
