"""Out-of-distribution perturbations (DESIGN §3): random light, visual distractors, novel object; and the blind
control.

Each perturbation is *drawn per episode from the reset seed*, so the same seed gives the same perturbed
episode for every method. This module owns the kinds, their strength, their parameters and the seeded draw;
each env applies the drawn parameters in its own way (a lighting model on the frame for PushT, MuJoCo lights
for Meta-World). Perturbations change pixels only, never physics.

Strength (docs/ood.md): every perturbation takes a strength s >= 0, written "kind:s" ("light:0.8"); 0 is no
change, 1 the ranges below, larger is stronger. The random numbers of an episode do not depend on s (they
are scaled after the draw), so one seed shows the *same* perturbation growing with s, which is what a
robustness curve needs. "kind" alone means `DEFAULT_STRENGTH[kind]`.

"blind" is not a perturbation but a control: every camera image becomes one grey frame before the policy
sees it (`BlindEnv`), the env itself untouched, so a task can be checked for needing vision at all.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

OODKind = Literal["none", "light", "distractor", "novel_object", "blind"]
OOD_KINDS: tuple[str, ...] = ("light", "distractor", "novel_object")  # the perturbations (the `--ood all` suites)
CONTROL_KINDS: tuple[str, ...] = ("blind",)  # controls: accepted everywhere, never part of `--ood all`
ALL_KINDS: tuple[str, ...] = ("none", *OOD_KINDS, *CONTROL_KINDS)

# The strength "light" / "distractor" / "novel_object" mean without ":s". 1.0 = the ranges of OODConfig's fields,
# the suites of the first release. Kept as one named constant so that it can be set from trained policies'
# robustness curves (`dap robustness`): pick, per kind, a strength where a good policy clearly drops.
DEFAULT_STRENGTH: dict[str, float] = {"light": 1.0, "distractor": 1.0, "novel_object": 1.0}

BLIND_GREY = 128  # the constant every pixel of a blind frame takes (mid grey: no image statistics to exploit)
_MAX_TURN = math.pi  # the light's direction turns by strength x the drawn angle, at most half a circle


def _format_strength(strength: float) -> str:
    return f"{strength:g}"


@dataclass
class OODConfig:
    """Parameters of one OOD suite. Ranges are (low, high) drawn uniformly per episode at strength 1.

    kind: which perturbation ("none" = in distribution; "blind" = grey images, see `BlindEnv`).
    strength: how strong (>= 0; None = `DEFAULT_STRENGTH[kind]`); always 0.0 for "none" and "blind".
    brightness: multiplicative light intensity b; at strength s the light is b**s (0 -> 1, unchanged).
    light_color_jitter: max per-channel deviation of the light colour from white, times s.
    n_distractors: (min, max) number n of extra objects; at strength s there are ceil(s * n).
    distractor_size: relative size of a distractor (fraction of the image / workspace), times sqrt(s), so the
        covered area grows like s**2 (count x size**2).
    hue_shift: novel object: the strength-1 colour is any RGB at least this far (L2 in [0,1]^3) from the
        original; at strength s it lies s times as far along the same direction (clipped to [0,1]^3).
    change_shape: novel object: also change the object's shape/texture where the simulator allows; at strength
        s < 1 each part is re-textured with probability s (PushT: the stripes' contrast scales with s).
    """

    kind: OODKind = "none"
    strength: float | None = None
    brightness: tuple[float, float] = (0.45, 1.6)
    light_color_jitter: float = 0.35
    n_distractors: tuple[int, int] = (1, 3)
    distractor_size: tuple[float, float] = (0.08, 0.16)
    hue_shift: float = 0.35
    change_shape: bool = True

    def __post_init__(self) -> None:
        if self.kind not in ALL_KINDS:
            raise ValueError(f"unknown OOD kind {self.kind!r}: expected one of {', '.join(ALL_KINDS)}")
        if self.kind not in OOD_KINDS:
            if self.strength not in (None, 0, 0.0):
                raise ValueError(f"OOD kind {self.kind!r} takes no strength (got {self.strength!r}); only "
                                 f"{', '.join(OOD_KINDS)} do")
            self.strength = 0.0
            return
        if self.strength is None:
            self.strength = DEFAULT_STRENGTH[self.kind]
        if isinstance(self.strength, bool) or not isinstance(self.strength, (int, float, np.number)):
            raise ValueError(f"OOD strength must be a number, got {self.strength!r}")
        self.strength = float(self.strength)
        if not math.isfinite(self.strength) or self.strength < 0:
            raise ValueError(f"OOD strength must be a finite number >= 0, got {self.strength!r} for {self.kind!r}")

    # --------------------------------------------------------------------------------------- spelling
    @classmethod
    def parse(cls, text: str, **fields: Any) -> "OODConfig":
        """"kind" or "kind:strength" (e.g. "light:0.8"; "novel-object" = "novel_object") -> an OODConfig.

        The one place an OOD spelling is read: the CLI, `evaluate`, `dap robustness` and `dap render-ood`
        all come here, so they accept and reject the same things with the same messages.
        """
        if not isinstance(text, str):
            raise ValueError(f"OOD spec must be a string like 'light' or 'light:0.8', got {text!r}")
        raw = text.strip()
        kind_text, sep, strength_text = raw.partition(":")
        kind = kind_text.strip().lower().replace("-", "_")
        if kind not in ALL_KINDS:
            raise ValueError(f"unknown OOD kind {kind_text.strip()!r} in {text!r}: expected one of "
                             f"{', '.join(ALL_KINDS)}, optionally with ':strength' (e.g. 'light:0.8')")
        strength: float | None = None
        if sep:
            try:
                strength = float(strength_text)
            except ValueError:
                raise ValueError(f"OOD strength {strength_text.strip()!r} in {text!r} is not a number "
                                 f"(write e.g. '{kind}:0.8')") from None
        return cls(kind=kind, strength=strength, **fields)  # type: ignore[arg-type]

    @property
    def spec(self) -> str:
        """Canonical "kind" / "kind:strength" (strength only where it is not the default); parses back."""
        if self.kind in OOD_KINDS and self.strength != DEFAULT_STRENGTH[self.kind]:
            return f"{self.kind}:{_format_strength(self.strength)}"
        return self.kind

    @property
    def label(self) -> str:
        """Result name: "light" at the default strength, "light@0.8" otherwise (safe in a file name)."""
        return self.spec.replace(":", "@")

    @property
    def perturbs(self) -> bool:
        """Whether an env must change its rendering (strength 0 renders exactly the in-distribution frames)."""
        return self.kind in OOD_KINDS and self.strength > 0

    @property
    def blind(self) -> bool:
        return self.kind == "blind"

    def for_env(self) -> "OODConfig":
        """The config to build the env with: blind leaves the env untouched (the wrapper greys the images)."""
        return OODConfig() if self.blind else self

    def wrap(self, env: Any) -> Any:
        """`env` as the policy should see it: wrapped in `BlindEnv` for the blind control, else unchanged."""
        return BlindEnv(env) if self.blind else env

    # --------------------------------------------------------------------------------------- draws
    def rng(self, seed: int) -> np.random.Generator:
        """The episode's own generator: independent of the env's physics RNG (physics stays identical) and of
        the strength (a seed shows the same perturbation at every strength)."""
        stream = OOD_KINDS.index(self.kind) if self.kind in OOD_KINDS else 9
        return np.random.default_rng([int(seed), 0x00D, stream])

    def draw_light(self, rng: np.random.Generator) -> dict[str, Any]:
        """Light brightness, colour (RGB gains), direction (unit 3-vector, pointing down-ish) and `turn`.

        turn: the fraction of the way from the scene's own light direction to `direction` (= strength, the env
        caps the angle at half a circle; PushT scales its brightness gradient with it).
        """
        s = float(self.strength)
        base_brightness = float(rng.uniform(*self.brightness))
        jitter = rng.uniform(-self.light_color_jitter, self.light_color_jitter, size=3)
        direction = rng.normal(size=3)
        direction[2] = -abs(direction[2]) - 0.5
        return {
            "brightness": base_brightness ** s,
            "color": np.clip(1.0 + s * jitter, 0.05, 3.0),
            "direction": direction / np.linalg.norm(direction),
            "turn": s,
        }

    def draw_distractors(self, rng: np.random.Generator) -> list[dict[str, Any]]:
        """Distractors: position in [0,1]^2 (env maps to its workspace), size, RGB colour, shape id.

        Items are drawn one after the other, so a stronger draw keeps the weaker one's items (grown) and adds.
        """
        s = float(self.strength)
        n_base = int(rng.integers(self.n_distractors[0], self.n_distractors[1] + 1))
        n = int(math.ceil(s * n_base - 1e-9))
        grow = math.sqrt(s)
        items = []
        for _ in range(n):
            items.append({
                "position": rng.uniform(0.05, 0.95, size=2),
                "size": float(rng.uniform(*self.distractor_size)) * grow,
                "color": rng.uniform(0.0, 1.0, size=3),
                "shape": int(rng.integers(0, 3)),  # 0 box, 1 sphere/disc, 2 cylinder/triangle
            })
        return items

    def draw_object_color(self, rng: np.random.Generator, original: np.ndarray) -> np.ndarray:
        """A random RGB colour in [0,1]^3 clearly different from `original`, `strength` times as far from it
        as the strength-1 draw (each channel's change grows with strength, so the distance does too)."""
        original = np.asarray(original, dtype=np.float64)[:3]
        target = 1.0 - original
        for _ in range(100):
            c = rng.uniform(0.0, 1.0, size=3)
            if np.linalg.norm(c - original) >= self.hue_shift:
                target = c
                break
        return np.clip(original + float(self.strength) * (target - original), 0.0, 1.0)

    def draw_retexture(self, rng: np.random.Generator) -> bool:
        """Whether one object part gets a new texture: always at strength >= 1, with probability s below."""
        return bool(self.change_shape and rng.uniform() < float(self.strength))


# ------------------------------------------------------------------------------------------- blind control
def blind_observation(obs: dict[str, Any]) -> dict[str, Any]:
    """`obs` with every camera image replaced by a constant grey frame of the same shape (proprio kept)."""
    images = {cam: np.full_like(np.asarray(img), BLIND_GREY) for cam, img in obs["images"].items()}
    return {**obs, "images": images}


class BlindEnv:
    """An env whose observations carry grey images: the policy is blind, the simulator runs as usual.

    A policy that still succeeds does not need vision for the task, so its image-perturbation results say
    little; that is what this control is for.
    """

    def __init__(self, env: Any) -> None:
        self.env = env
        self.spec = env.spec

    def reset(self, seed: int) -> dict[str, Any]:
        return blind_observation(self.env.reset(seed))

    def step(self, action: np.ndarray) -> tuple[dict[str, Any], Any]:
        obs, result = self.env.step(action)
        return blind_observation(obs), result

    def expert_action(self) -> np.ndarray:
        return self.env.expert_action()

    def close(self) -> None:
        self.env.close()

    def __getattr__(self, name: str) -> Any:  # state, steps, ... of the wrapped env
        if name == "env":  # not set yet (e.g. while unpickling): no endless recursion
            raise AttributeError(name)
        return getattr(self.env, name)
