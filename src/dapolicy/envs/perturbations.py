"""Out-of-distribution perturbations (DESIGN §3): random light, visual distractors, novel object.

Each perturbation is *drawn per episode from the reset seed*, so the same seed gives the same perturbed
episode for every method. This module owns the kinds, their parameters and the seeded draw; each env applies
the drawn parameters in its own way (a lighting model on the frame for PushT, MuJoCo lights for Meta-World).
Perturbations change pixels only, never physics.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

OODKind = Literal["none", "light", "distractor", "novel_object"]
OOD_KINDS: tuple[str, ...] = ("light", "distractor", "novel_object")


@dataclass
class OODConfig:
    """Parameters of one OOD suite. Ranges are (low, high) drawn uniformly per episode.

    kind: which perturbation ("none" = in distribution).
    brightness: multiplicative light intensity.
    light_color_jitter: max per-channel deviation of the light colour from white.
    n_distractors: (min, max) number of extra objects.
    distractor_size: relative size of a distractor (fraction of the image / workspace).
    hue_shift: novel object: random colour is any RGB at least this far (L2 in [0,1]^3) from the original.
    change_shape: novel object: also change the object's shape/texture where the simulator allows.
    """

    kind: OODKind = "none"
    brightness: tuple[float, float] = (0.45, 1.6)
    light_color_jitter: float = 0.35
    n_distractors: tuple[int, int] = (1, 3)
    distractor_size: tuple[float, float] = (0.08, 0.16)
    hue_shift: float = 0.35
    change_shape: bool = True

    def __post_init__(self) -> None:
        if self.kind not in ("none", *OOD_KINDS):
            raise ValueError(f"unknown OOD kind {self.kind!r}: expected one of none, {', '.join(OOD_KINDS)}")

    def rng(self, seed: int) -> np.random.Generator:
        """The episode's own generator: independent of the env's physics RNG, so physics stays identical."""
        return np.random.default_rng([int(seed), 0x00D, OOD_KINDS.index(self.kind) if self.kind != "none" else 9])

    def draw_light(self, rng: np.random.Generator) -> dict[str, Any]:
        """Light brightness, colour (RGB gains) and direction (unit 3-vector, pointing down-ish)."""
        color = 1.0 + rng.uniform(-self.light_color_jitter, self.light_color_jitter, size=3)
        direction = rng.normal(size=3)
        direction[2] = -abs(direction[2]) - 0.5
        return {
            "brightness": float(rng.uniform(*self.brightness)),
            "color": np.clip(color, 0.2, 2.0),
            "direction": direction / np.linalg.norm(direction),
        }

    def draw_distractors(self, rng: np.random.Generator) -> list[dict[str, Any]]:
        """Distractors: position in [0,1]^2 (env maps to its workspace), size, RGB colour, shape id."""
        n = int(rng.integers(self.n_distractors[0], self.n_distractors[1] + 1))
        return [{
            "position": rng.uniform(0.05, 0.95, size=2),
            "size": float(rng.uniform(*self.distractor_size)),
            "color": rng.uniform(0.0, 1.0, size=3),
            "shape": int(rng.integers(0, 3)),  # 0 box, 1 sphere/disc, 2 cylinder/triangle
        } for _ in range(n)]

    def draw_object_color(self, rng: np.random.Generator, original: np.ndarray) -> np.ndarray:
        """A random RGB colour in [0,1]^3 clearly different from `original`."""
        original = np.asarray(original, dtype=np.float64)[:3]
        for _ in range(100):
            c = rng.uniform(0.0, 1.0, size=3)
            if np.linalg.norm(c - original) >= self.hue_shift:
                return c
        return 1.0 - original
