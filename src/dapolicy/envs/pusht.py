"""PushT (gym-pusht) behind the `Env` protocol, with a scripted expert and pixel-only OOD perturbations.

One top-down camera "top"; actions are absolute agent targets in pixels [0, 512]^2; proprio is the agent
position. Success is coverage > 0.95 and the score is Diffusion Policy's clipped coverage / 0.95.

OOD perturbations (DESIGN §3) are drawn per episode from `OODConfig.rng(seed)` at reset and applied to the
rendered frame only (the block's colour is a render attribute of its pymunk shapes), so physics, and hence
the same seed + actions, give identical states with or without them:
- light: brightness x RGB gains x a linear gradient across the board from the light's horizontal direction;
- distractor: boxes, discs and triangles painted on the board, beneath the block and the agent;
- novel_object: the T in a new colour, plus (change_shape) stripes fixed to the block's own frame.
Strength s (docs/ood.md) scales the draws in perturbations.py; here it also scales the light's gradient and the
stripes' contrast. s = 0 renders the in-distribution frame exactly; "blind" greys the frame.
"""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np

from dapolicy.envs.base import Observation, StepResult
from dapolicy.envs.experts.pusht_planner import (
    GOAL_POSE,
    SUCCESS_COVERAGE,
    T_BAR,
    T_STEM,
    PlannerConfig,
    PushTPlanner,
    PushTState,
    read_state,
    to_local,
    to_world,
)
from dapolicy.envs.perturbations import OODConfig, blind_observation
from dapolicy.spec import EnvSpec

WORKSPACE = 512.0  # gym-pusht's board, in pixels
AGENT_RADIUS = 15.0
BLOCK_COLOR = np.array([119, 136, 153]) / 255.0  # pygame "LightSlateGray", gym-pusht's T
FILL_GAIN = 1.2  # gym-pusht fills polygons with 1.2x the shape colour (outline in the colour itself)
LIGHT_GRADIENT = 0.5  # brightness change across the board from an off-centre light, at strength 1


class PushTEnv:
    """gym-pusht PushT-v0 with image observations, a sampling-planner expert and OOD perturbations."""

    def __init__(self, image_size: int = 64, ood: OODConfig | None = None, max_steps: int = 300,
                 planner_config: PlannerConfig | None = None) -> None:
        os.environ.setdefault("SDL_VIDEODRIVER", "dummy")
        import gym_pusht  # noqa: F401  (registers gym_pusht/PushT-v0)
        import gymnasium as gym

        self.spec = EnvSpec(name="pusht", cameras=("top",), image_size=int(image_size), action_dim=2,
                            proprio_dim=2, max_steps=int(max_steps), action_low=(0.0, 0.0),
                            action_high=(WORKSPACE, WORKSPACE))
        self.ood = ood or OODConfig()
        self._gym = gym.make("gym_pusht/PushT-v0", obs_type="pixels_agent_pos", render_mode="rgb_array",
                             observation_width=self.spec.image_size, observation_height=self.spec.image_size,
                             max_episode_steps=self.spec.max_steps, disable_env_checker=True)
        self._sim = self._gym.unwrapped
        self.planner = PushTPlanner(planner_config)
        self._ood_params: dict[str, Any] = {}
        self._steps = 0
        self._seed: int | None = None
        self.last_info: dict[str, Any] = {}

    # -- Env protocol -------------------------------------------------------------------------------------
    def reset(self, seed: int) -> Observation:
        """New episode from `seed` (start state, expert sampler and OOD draw all follow the seed)."""
        self._seed, self._steps = int(seed), 0
        raw, info = self._gym.reset(seed=self._seed)
        self._ood_params = self._draw_ood(self._seed)
        if "block_color" in self._ood_params:
            self._paint_block(self._ood_params["block_color"])
            raw = self._sim.get_obs()  # re-render: the reset frame was drawn before the recolouring
        self.planner.reset(self._seed)
        self.last_info = dict(info)
        return self._observation(raw)

    def step(self, action: np.ndarray) -> tuple[Observation, StepResult]:
        """Move the agent's target to `action` (pixels, clipped to the board) for one 0.1 s control step."""
        if self._seed is None:
            raise RuntimeError("PushTEnv.step called before reset(seed)")
        action = np.asarray(action, dtype=np.float32)
        if action.shape != (self.spec.action_dim,):
            raise ValueError(f"PushT action must have shape ({self.spec.action_dim},) "
                             f"(absolute x, y target in pixels), got shape {action.shape}")
        if not np.all(np.isfinite(action)):
            raise ValueError(f"PushT action must be finite, got {action}")
        action = np.clip(action, self.spec.action_low, self.spec.action_high)
        raw, _, _, _, info = self._gym.step(action)
        self._steps += 1
        coverage = float(info["coverage"])
        success = coverage > SUCCESS_COVERAGE
        result = StepResult(success=success, score=min(coverage / SUCCESS_COVERAGE, 1.0),
                            done=success or self._steps >= self.spec.max_steps, info=dict(info))
        self.last_info = result.info
        return self._observation(raw), result

    def expert_action(self) -> np.ndarray:
        """The sampling planner's next target for the current (privileged) state, float32 [2]."""
        if self._seed is None:
            raise RuntimeError("PushTEnv.expert_action called before reset(seed)")
        return self.planner.act(self.state)

    def close(self) -> None:
        self._gym.close()

    # -- privileged state ---------------------------------------------------------------------------------
    @property
    def state(self) -> PushTState:
        """Agent position/velocity and block position/angle/velocity/angular velocity (for experts)."""
        return read_state(self._sim)

    @property
    def goal_pose(self) -> np.ndarray:
        """Goal (x, y, angle) of the block's origin; fixed in gym-pusht."""
        return GOAL_POSE.copy()

    @property
    def ood_params(self) -> dict[str, Any]:
        """The perturbation drawn for the current episode (empty when in distribution)."""
        return self._ood_params

    # -- observation and perturbations ----------------------------------------------------------------------
    def _observation(self, raw: dict[str, np.ndarray]) -> Observation:
        image = np.ascontiguousarray(raw["pixels"], dtype=np.uint8)
        if self.ood.perturbs:
            image = self._perturb(image)
        obs = {"images": {"top": image}, "proprio": np.asarray(raw["agent_pos"], dtype=np.float32)}
        return blind_observation(obs) if self.ood.blind else obs

    def _draw_ood(self, seed: int) -> dict[str, Any]:
        """Draw this episode's perturbation from the OOD config's own generator (never the physics RNG)."""
        kind = self.ood.kind
        if not self.ood.perturbs:  # none, blind, or strength 0
            return {}
        rng = self.ood.rng(seed)
        if kind == "light":
            return {"light": self.ood.draw_light(rng)}
        if kind == "distractor":
            items = self.ood.draw_distractors(rng)
            for item in items:
                item["angle"] = float(rng.uniform(0.0, 2 * math.pi))
            return {"distractors": items}
        params: dict[str, Any] = {"block_color": self.ood.draw_object_color(rng, BLOCK_COLOR)}
        if self.ood.change_shape:
            period = float(rng.uniform(14.0, 26.0))  # px on the board
            angle = float(rng.uniform(0.0, math.pi))
            darkening = 1.0 - float(rng.uniform(0.35, 0.6))  # at strength 1; scaled by the strength
            params["stripes"] = {"period": period, "angle": angle,
                                 "shade": max(0.05, 1.0 - float(self.ood.strength) * darkening)}
        return params

    def _paint_block(self, color: np.ndarray) -> None:
        """Recolour the T's pymunk shapes (a render attribute only) so its fill shows `color`."""
        import pygame

        rgb = np.clip(np.asarray(color) * 255.0 / FILL_GAIN, 0, 255).round().astype(int)
        for shape in self._sim.block.shapes:
            shape.color = pygame.Color(int(rgb[0]), int(rgb[1]), int(rgb[2]))

    def _perturb(self, image: np.ndarray) -> np.ndarray:
        p = self._ood_params
        if "stripes" in p:
            image = self._apply_stripes(image, p["stripes"])
        if "distractors" in p:
            image = self._apply_distractors(image, p["distractors"])
        if "light" in p:
            light = p["light"]
            image = apply_light(image, light["brightness"], light["color"], light["direction"],
                                gradient=LIGHT_GRADIENT * float(light.get("turn", 1.0)))
        return image

    def _object_mask(self, with_agent: bool) -> tuple[np.ndarray, np.ndarray]:
        """Boolean masks [S, S] of the block's and the agent's pixels, rasterised from the true poses."""
        import cv2

        size = self.spec.image_size
        scale = size / WORKSPACE
        state = self.state
        shift = 4  # sub-pixel vertex precision
        block = np.zeros((size, size), np.uint8)
        for part in (T_BAR, T_STEM):
            pts = to_world(part, state.block_pose) * scale - 0.5
            cv2.fillPoly(block, [np.round(pts * (1 << shift)).astype(np.int32)], 1, cv2.LINE_8, shift)
        agent = np.zeros((size, size), np.uint8)
        if with_agent:
            center = tuple(int(v) for v in np.round((state.agent_pos * scale - 0.5) * (1 << shift)))
            cv2.circle(agent, center, int(round(AGENT_RADIUS * scale * (1 << shift))), 1, -1, cv2.LINE_8, shift)
        return block.astype(bool), agent.astype(bool)

    def _apply_stripes(self, image: np.ndarray, stripes: dict[str, float]) -> np.ndarray:
        """Darken alternate bands of the T, fixed in the block's frame so the texture moves with it."""
        block, agent = self._object_mask(with_agent=True)
        mask = block & ~agent  # the agent is drawn on top of the block
        rows, cols = np.nonzero(mask)
        if rows.size == 0:
            return image
        scale = WORKSPACE / self.spec.image_size
        board = np.stack([(cols + 0.5) * scale, (rows + 0.5) * scale], axis=1)
        local = to_local(board, self.state.block_pose)
        axis = np.array([math.cos(stripes["angle"]), math.sin(stripes["angle"])])
        dark = np.floor(local @ axis / stripes["period"]).astype(int) % 2 == 1
        out = image.copy()
        out[rows[dark], cols[dark]] = (out[rows[dark], cols[dark]] * stripes["shade"]).astype(np.uint8)
        return out

    def _apply_distractors(self, image: np.ndarray, items: list[dict[str, Any]]) -> np.ndarray:
        """Paint the distractors on the board beneath the block and agent (they are flat, not physical)."""
        size = self.spec.image_size
        layer = image.copy()
        painted = np.zeros((size, size), np.uint8)
        for item in items:
            draw_shape(layer, painted, item, size)
        block, agent = self._object_mask(with_agent=True)
        show = painted.astype(bool) & ~block & ~agent
        out = image.copy()
        out[show] = layer[show]
        return out


def draw_shape(layer: np.ndarray, painted: np.ndarray, item: dict[str, Any], size: int) -> None:
    """Draw one distractor (0 box, 1 disc, 2 triangle) on `layer` and mark its pixels in `painted`."""
    import cv2

    center = np.asarray(item["position"]) * size
    extent = max(1.5, float(item["size"]) * size)  # side / diameter in pixels
    color = tuple(int(c) for c in np.clip(np.asarray(item["color"]) * 255, 0, 255).round())
    angle = float(item.get("angle", 0.0))
    shift = 4
    if item["shape"] == 1:
        c = tuple(int(v) for v in np.round((center - 0.5) * (1 << shift)))
        r = int(round(extent / 2 * (1 << shift)))
        for target, value in ((layer, color), (painted, 1)):
            cv2.circle(target, c, r, value, -1, cv2.LINE_8, shift)
        return
    if item["shape"] == 0:
        corners = np.array([(-1, -1), (1, -1), (1, 1), (-1, 1)], dtype=np.float64) * extent / 2
    else:
        corners = np.array([(math.cos(a), math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)])
        corners *= extent / math.sqrt(3) * 1.2
    c, s = math.cos(angle), math.sin(angle)
    pts = corners @ np.array([[c, s], [-s, c]]) + center - 0.5
    poly = [np.round(pts * (1 << shift)).astype(np.int32)]
    cv2.fillPoly(layer, poly, color, cv2.LINE_8, shift)
    cv2.fillPoly(painted, poly, 1, cv2.LINE_8, shift)


def apply_light(image: np.ndarray, brightness: float, color: np.ndarray, direction: np.ndarray,
                gradient: float = LIGHT_GRADIENT) -> np.ndarray:
    """Relight a top-down frame: brightness x per-channel gains x a linear falloff across the board.

    The light travels along `direction` (unit 3-vector, z down); its horizontal part makes the side it comes
    from brighter by up to `gradient`, the far side darker, as a low, off-centre lamp would.
    """
    size_y, size_x = image.shape[:2]
    v, u = np.meshgrid(np.linspace(-1.0, 1.0, size_y), np.linspace(-1.0, 1.0, size_x), indexing="ij")
    ramp = 1.0 - gradient * (direction[0] * u + direction[1] * v)
    gain = brightness * np.clip(ramp, 0.1, None)[..., None] * np.asarray(color, dtype=np.float64)[None, None]
    return np.clip(image.astype(np.float64) * gain, 0, 255).round().astype(np.uint8)
