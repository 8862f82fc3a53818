"""Meta-World v3 tasks with camera images, the shipped scripted experts and OOD perturbations (DESIGN §3).

One `mujoco.Renderer` draws every camera from the env's own model/data with shadows, reflections and
multisampling off: stock settings render at ~10 steps/s on a CPU, these at ~100. The `corner*` cameras come out
upside down and are flipped. OOD perturbations only touch what the renderer reads (lights, colours,
materials, extra scene geoms), never the physics, so a seed gives the same trajectory with and without them.

Run `python -m dapolicy.envs.metaworld --task button-press-v3 --episodes 50` to measure the expert.
"""

from __future__ import annotations

import os

os.environ.setdefault("MUJOCO_GL", "egl")

import argparse  # noqa: E402
import atexit  # noqa: E402
import functools  # noqa: E402
import re  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
import weakref  # noqa: E402
from collections.abc import Sequence  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from typing import Any  # noqa: E402

import mujoco  # noqa: E402
import numpy as np  # noqa: E402

with warnings.catch_warnings():  # gymnasium/metaworld import-time deprecation chatter
    warnings.simplefilter("ignore")
    import metaworld  # noqa: E402
    import metaworld.policies  # noqa: E402
    from metaworld.env_dict import ALL_V3_ENVIRONMENTS  # noqa: E402

from dapolicy.envs.base import Observation, StepResult  # noqa: E402
from dapolicy.envs.perturbations import OODConfig, blind_observation  # noqa: E402
from dapolicy.spec import EnvSpec

DEFAULT_CAMERAS: tuple[str, ...] = ("corner4", "gripperPOV")
ACTION_DIM = 4
PROPRIO_DIM = 4  # end-effector xyz + gripper opening = raw state[:4]
STATE_DIM = 39

# Table-top region (world x, y in metres) the unit-square distractor positions map to: the table surface is
# z = 0, the robot sits at y ~ 0 and the task objects live in x in [-0.4, 0.4], y in [0.4, 0.95].
_DISTRACTOR_X = (-0.45, 0.45)
_DISTRACTOR_Y = (0.40, 0.95)
_DISTRACTOR_SPAN = 0.9  # metres that distractor "size" 1.0 stands for
_KEEP_AWAY = 0.06  # minimum gap (m) between a distractor and the manipulated object / goal, so it never hides them
_TABLE_X = (-0.65, 0.65)  # table top (world x, y) that a pushed-away distractor must stay on
_TABLE_Y = (0.25, 0.95)
_VISIBLE_GROUPS = (0, 1, 2)  # geom groups a default mjvOption draws
_DEFAULT_GEOM_RGBA = np.array([0.5, 0.5, 0.5, 1.0], dtype=np.float32)  # MuJoCo's "unset" geom colour
_OBJECT_MATCH_M = 0.12  # an object position farther than this from every movable part matches none of them


def task_names() -> tuple[str, ...]:
    """Every Meta-World v3 task name, sorted."""
    return tuple(sorted(ALL_V3_ENVIRONMENTS))


def _check_task(task: str) -> None:
    if task not in ALL_V3_ENVIRONMENTS:
        raise ValueError(f"unknown Meta-World task {task!r}; valid tasks: {', '.join(task_names())}")


@functools.lru_cache(maxsize=None)
def _mt1_task(task: str) -> Any:
    """One MT1 task for `task` (building MT1 costs ~1 s: it resets 50 times, so do it once per process).

    Only its fixed settings are used (full observability); object/goal positions are redrawn per seed.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return metaworld.MT1(task, seed=0).train_tasks[0]


def _normalise(name: str) -> str:
    """Canonical key shared by task names and policy class names ("peg-insert-side-v3" ~ "PegInsertionSide")."""
    key = re.sub(r"[^a-z0-9]", "", name.lower())
    key = re.sub(r"v\d+$", "", key)
    return key.replace("insertion", "insert")


@functools.lru_cache(maxsize=None)
def _policy_classes() -> dict[str, type]:
    """All shipped `Sawyer<Task>V3Policy` classes by normalised task key."""
    classes: dict[str, type] = {}
    for attr in dir(metaworld.policies):
        match = re.fullmatch(r"Sawyer(\w+)V3Policy", attr)
        if match:
            classes[_normalise(match.group(1))] = getattr(metaworld.policies, attr)
    return classes


def expert_policy_class(task: str) -> type:
    """The scripted expert shipped for `task`; prefers Meta-World's own map, falls back to name matching."""
    _check_task(task)
    shipped = getattr(metaworld.policies, "ENV_POLICY_MAP", {})
    if task in shipped:
        return shipped[task]
    key = _normalise(task)
    if key not in _policy_classes():
        raise ValueError(f"no scripted expert ships for Meta-World task {task!r}")
    return _policy_classes()[key]


def _rotation_toward(a: np.ndarray, b: np.ndarray, fraction: float) -> np.ndarray:
    """Rotation turning unit vector a toward b by `fraction` of the angle between them (capped at pi)."""
    full = _rotation_between(a, b)
    if fraction == 1.0:
        return full
    angle = float(np.arccos(np.clip((np.trace(full) - 1.0) / 2.0, -1.0, 1.0)))
    if angle < 1e-12 or fraction <= 0.0:
        return np.eye(3)
    # the axis of `full` (its skew part), or any axis orthogonal to a for a half turn
    skew = np.array([full[2, 1] - full[1, 2], full[0, 2] - full[2, 0], full[1, 0] - full[0, 1]])
    if np.linalg.norm(skew) > 1e-9:
        axis = skew / np.linalg.norm(skew)
    else:
        axis = np.cross(a, [1.0, 0.0, 0.0] if abs(a[0]) < 0.9 else [0.0, 1.0, 0.0])
        axis /= np.linalg.norm(axis)
    theta = min(angle * fraction, np.pi)
    k = np.array([[0.0, -axis[2], axis[1]], [axis[2], 0.0, -axis[0]], [-axis[1], axis[0], 0.0]])
    return np.eye(3) + np.sin(theta) * k + (1.0 - np.cos(theta)) * k @ k


def _rotation_between(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Rotation matrix turning unit vector a onto unit vector b (Rodrigues)."""
    a = a / np.linalg.norm(a)
    b = b / np.linalg.norm(b)
    v, c = np.cross(a, b), float(np.dot(a, b))
    if c < -1.0 + 1e-9:  # opposite: turn half a circle about any axis orthogonal to a
        axis = np.cross(a, [1.0, 0.0, 0.0] if abs(a[0]) < 0.9 else [0.0, 1.0, 0.0])
        axis /= np.linalg.norm(axis)
        return 2.0 * np.outer(axis, axis) - np.eye(3)
    vx = np.array([[0.0, -v[2], v[1]], [v[2], 0.0, -v[0]], [-v[1], v[0], 0.0]])
    return np.eye(3) + vx + vx @ vx / (1.0 + c)


@dataclass
class _Distractor:
    """A visual-only geom added to the render scene (it does not exist in the physics model)."""

    geom_type: int
    size: np.ndarray  # MuJoCo geom size (3,)
    pos: np.ndarray  # world position (3,)
    rgba: np.ndarray  # (4,) float32


@dataclass
class _VisualDefaults:
    """The model's render-only fields as loaded, restored before every episode."""

    light_diffuse: np.ndarray
    light_ambient: np.ndarray
    light_specular: np.ndarray
    light_dir: np.ndarray
    light_pos: np.ndarray
    head_diffuse: np.ndarray
    head_ambient: np.ndarray
    head_specular: np.ndarray
    geom_rgba: np.ndarray
    geom_matid: np.ndarray

    @classmethod
    def capture(cls, model: mujoco.MjModel) -> "_VisualDefaults":
        head = model.vis.headlight
        return cls(model.light_diffuse.copy(), model.light_ambient.copy(), model.light_specular.copy(),
                   model.light_dir.copy(), model.light_pos.copy(), head.diffuse.copy(), head.ambient.copy(),
                   head.specular.copy(), model.geom_rgba.copy(), model.geom_matid.copy())

    def restore(self, model: mujoco.MjModel) -> None:
        model.light_diffuse[:] = self.light_diffuse
        model.light_ambient[:] = self.light_ambient
        model.light_specular[:] = self.light_specular
        model.light_dir[:] = self.light_dir
        model.light_pos[:] = self.light_pos
        model.vis.headlight.diffuse[:] = self.head_diffuse
        model.vis.headlight.ambient[:] = self.head_ambient
        model.vis.headlight.specular[:] = self.head_specular
        model.geom_rgba[:] = self.geom_rgba
        model.geom_matid[:] = self.geom_matid


def _make_fast_renderer(model: mujoco.MjModel, size: int) -> mujoco.Renderer:
    """A renderer without shadows, reflections or multisampling (~10x faster on llvmpipe; skybox kept)."""
    model.vis.quality.shadowsize = 0
    model.vis.quality.offsamples = 0  # read when the GL context is made, so before the Renderer exists
    model.vis.global_.offwidth = max(int(model.vis.global_.offwidth), size)
    model.vis.global_.offheight = max(int(model.vis.global_.offheight), size)
    renderer = mujoco.Renderer(model, height=size, width=size)
    renderer.scene.flags[mujoco.mjtRndFlag.mjRND_SHADOW] = 0
    renderer.scene.flags[mujoco.mjtRndFlag.mjRND_REFLECTION] = 0
    return renderer


def _close_at_exit(ref: "weakref.ReferenceType[MetaWorldEnv]") -> None:
    env = ref()
    if env is not None:
        env.close()


class MetaWorldEnv:
    """A Meta-World v3 task as a seeded, image-observation `Env` (see envs/base.py).

    Each `reset(seed)` draws new object/goal positions from `seed` alone (same seed, same start state) and, if
    `ood` is set, a perturbation from `ood.rng(seed)`. Episodes end only at `max_steps`; success does not end
    them (the collector/evaluator decides).
    """

    def __init__(self, task: str, image_size: int = 64, cameras: tuple[str, ...] | None = None,
                 ood: OODConfig | None = None, max_steps: int = 150) -> None:
        _check_task(task)
        if int(image_size) <= 0 or int(max_steps) <= 0:
            raise ValueError(f"image_size and max_steps must be positive, got {image_size} and {max_steps}")
        self.task = task
        self.ood = ood if ood is not None else OODConfig()
        self._env = self._make_sim(task, int(max_steps))
        self.model: mujoco.MjModel = self._env.model
        self.data: mujoco.MjData = self._env.data
        cameras = tuple(cameras) if cameras else DEFAULT_CAMERAS
        self._check_cameras(cameras)
        self.spec = EnvSpec(name=f"metaworld/{task}", cameras=cameras, image_size=int(image_size),
                            action_dim=ACTION_DIM, proprio_dim=PROPRIO_DIM, max_steps=int(max_steps),
                            action_low=(-1.0,) * ACTION_DIM, action_high=(1.0,) * ACTION_DIM)
        self._renderer: mujoco.Renderer | None = _make_fast_renderer(self.model, int(image_size))
        # Close the GL context before interpreter teardown even if the caller forgets close().
        self._finalizer = weakref.finalize(self, self._renderer.close)
        # weakref's own exit hook may run after MuJoCo's eglTerminate (registered earlier or later, depending
        # on import order); an atexit hook registered now runs before it (LIFO), so no EGL error at exit.
        atexit.register(_close_at_exit, weakref.ref(self))
        self._defaults = _VisualDefaults.capture(self.model)
        self._object_bodies: np.ndarray | None = None  # found at the first reset (needs the task's state)
        self._object_geoms = np.zeros(0, dtype=np.int64)
        self._expert = expert_policy_class(task)()
        self._state = np.zeros(STATE_DIM)
        self._steps = 0
        self._distractors: list[_Distractor] = []
        self._has_episode = False

    # ----------------------------------------------------------------------------------------------- setup
    @staticmethod
    def _make_sim(task: str, max_steps: int) -> Any:
        """The raw Meta-World env with random (seeded) object/goal positions at every reset."""
        env = ALL_V3_ENVIRONMENTS[task]()
        env.set_task(_mt1_task(task))
        env._freeze_rand_vec = False  # new object/goal each reset ...
        env.seeded_rand_vec = True  # ... drawn from env.np_random (seeded per episode), not global np.random
        env.max_path_length = max(int(env.max_path_length), max_steps)
        return env

    def _check_cameras(self, cameras: tuple[str, ...]) -> None:
        names = [self.model.camera(i).name for i in range(self.model.ncam)]
        unknown = [c for c in cameras if c not in names]
        if unknown:
            raise ValueError(f"unknown camera(s) {unknown} for {self.task}; available: {', '.join(names)}")

    def _task_body_ids(self) -> list[int]:
        """Bodies that are neither the world, the robot (the tree holding the hand) nor the mocap body."""
        m = self.model
        robot_root = int(m.body_rootid[m.body("hand").id])
        mocap = m.body("mocap").id
        return [b for b in range(1, m.nbody) if int(m.body_rootid[b]) != robot_root and b != mocap]

    def _moving_ancestor(self, body: int) -> int | None:
        """`body` or its nearest ancestor with a joint (the part that moves with it), None if it is fixed."""
        m = self.model
        while body > 0:
            if m.body_jntnum[body] > 0:
                return body
            body = int(m.body_parentid[body])
        return None

    def _subtree(self, root: int) -> list[int]:
        m = self.model
        return [b for b in range(m.nbody) if b == root or self._has_ancestor(b, root)]

    def _has_ancestor(self, body: int, ancestor: int) -> bool:
        while body > 0:
            body = int(self.model.body_parentid[body])
            if body == ancestor:
                return True
        return False

    def _find_objects(self) -> tuple[np.ndarray, np.ndarray]:
        """The manipulated object(s): (bodies, visible geoms), found from the task's own state, not a name list.

        Meta-World reports the position of its object(s) in state[4:7] (and a second one in state[11:14]); the
        movable part (a body with a free/slide/hinge joint, or below one) with an element (body frame, centre of
        mass, site or geom) nearest that point is the object, with every body it carries. Coffee-push thus
        gets the mug (its body precedes the robot in the model), button-press the button, not the box.
        """
        m, d = self.model, self.data
        movable = [(b, mover) for b in self._task_body_ids() if (mover := self._moving_ancestor(b)) is not None]
        points: list[tuple[np.ndarray, int]] = []
        for b, mover in movable:
            points += [(d.xpos[b], mover), (d.xipos[b], mover)]
            points += [(d.site_xpos[i], mover) for i in np.flatnonzero(m.site_bodyid == b)]
            points += [(d.geom_xpos[i], mover) for i in np.flatnonzero(m.geom_bodyid == b)]
        targets = [self._state[4:7]]
        if np.any(self._state[11:18]):  # a second object (hammer: the nail, stick-push: the thermos)
            targets.append(self._state[11:14])
        bodies: set[int] = set()
        for target in targets:
            if not points:
                break
            dist = [float(np.linalg.norm(p - target)) for p, _ in points]
            best = int(np.argmin(dist))
            if dist[best] <= _OBJECT_MATCH_M:
                bodies.update(self._subtree(points[best][1]))
        if not bodies:  # no movable part near the reported position: fall back on every task body
            first_task_body = m.body("mocap").id + 1
            bodies = set(range(first_task_body, m.nbody))
        body_ids = np.asarray(sorted(bodies), dtype=np.int64)
        keep = [g for g in range(m.ngeom) if int(m.geom_bodyid[g]) in bodies and m.geom_group[g] in _VISIBLE_GROUPS
                and self._defaults.geom_rgba[g, 3] > 0]
        return body_ids, np.asarray(keep, dtype=np.int64)

    @property
    def object_geoms(self) -> np.ndarray:
        """Visible geom ids of the manipulated object(s), the ones novel_object recolours (after a reset)."""
        if self._object_bodies is None:
            raise RuntimeError("call reset(seed) first: the object is found from the task's state")
        return self._object_geoms.copy()

    # ------------------------------------------------------------------------------------------- Env API
    @property
    def state(self) -> np.ndarray:
        """The raw 39-D Meta-World observation (privileged: object and goal positions), for experts."""
        return self._state.copy()

    @property
    def steps(self) -> int:
        """Steps taken in the current episode."""
        return self._steps

    def reset(self, seed: int) -> Observation:
        """New episode: object/goal positions and the OOD draw both follow from `seed` only."""
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {seed!r}")
        self._env.seed(int(seed))
        state, _ = self._env.reset()
        self._state = np.asarray(state, dtype=np.float64)
        self._steps = 0
        self._has_episode = True
        if self._object_bodies is None:
            self._object_bodies, self._object_geoms = self._find_objects()
        self._apply_ood(int(seed))
        return self._observe()

    def step(self, action: np.ndarray) -> tuple[Observation, StepResult]:
        """Apply a [-1, 1]^4 action (end-effector delta xyz + gripper), clipped; done only at max_steps."""
        action = np.asarray(action, dtype=np.float64)
        if action.shape != (ACTION_DIM,):
            raise ValueError(f"action must have shape ({ACTION_DIM},), got {action.shape}")
        if not self._has_episode:
            raise RuntimeError("call reset(seed) before step()")
        if self._steps >= self.spec.max_steps:
            raise RuntimeError(f"episode is over ({self.spec.max_steps} steps); call reset(seed)")
        action = np.clip(np.nan_to_num(action), -1.0, 1.0)
        state, _reward, _terminated, _truncated, info = self._env.step(action)
        self._state = np.asarray(state, dtype=np.float64)
        self._steps += 1
        success = bool(info.get("success", 0.0))
        done = self._steps >= self.spec.max_steps
        return self._observe(), StepResult(success=success, score=float(success), done=done, info=dict(info))

    def expert_action(self) -> np.ndarray:
        """The shipped scripted policy's action for the current raw state, clipped to [-1, 1]."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "Constant(s) may be too high": clipped below anyway
            action = self._expert.get_action(self._state)
        return np.clip(np.asarray(action, dtype=np.float32), -1.0, 1.0)

    def render(self, camera: str) -> np.ndarray:
        """uint8 [S, S, 3] image of `camera` (right way up, with this episode's perturbation)."""
        if self._renderer is None:
            raise RuntimeError("env is closed")
        self._renderer.update_scene(self.data, camera=camera)
        self._add_distractors(self._renderer.scene)
        image = self._renderer.render()
        if camera.startswith("corner"):  # these cameras' frames come out upside down
            image = image[::-1]
        return np.ascontiguousarray(image)

    def close(self) -> None:
        """Free the GL context now (idempotent), avoiding EGL errors from late destructors at exit."""
        if self._renderer is not None:
            self._finalizer()
            self._renderer = None
            self._env.close()

    def __enter__(self) -> "MetaWorldEnv":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _observe(self) -> Observation:
        images = {cam: self.render(cam) for cam in self.spec.cameras}
        obs = {"images": images, "proprio": self._state[:PROPRIO_DIM].astype(np.float32)}
        return blind_observation(obs) if self.ood.blind else obs

    # ----------------------------------------------------------------------------------- OOD (visual only)
    def _apply_ood(self, seed: int) -> None:
        """Reset every render-only field, then apply this episode's perturbation drawn from its own RNG."""
        self._defaults.restore(self.model)
        self._distractors = []
        kind = self.ood.kind if self.ood.perturbs else "none"  # strength 0: the in-distribution frames, exactly
        rng = self.ood.rng(seed)
        if kind == "light":
            self._apply_light(self.ood.draw_light(rng))
        elif kind == "distractor":
            self._distractors = [self._make_distractor(d) for d in self.ood.draw_distractors(rng)]
        elif kind == "novel_object":
            self._apply_novel_object(rng)
        # The renderer reads light poses from data.light_xdir/xpos, recomputed only by the next forward pass:
        # refresh them now (mj_camlight writes nothing but camera and light poses, so physics is untouched).
        mujoco.mj_camlight(self.model, self.data)

    def _apply_light(self, light: dict[str, Any]) -> None:
        """Scale and tint every light (headlight included) and turn the scene lights toward `direction` (by the
        fraction `turn` of the angle, at most half a circle)."""
        d = self._defaults
        gain = float(light["brightness"]) * np.asarray(light["color"], dtype=np.float64)
        m = self.model
        m.light_diffuse[:] = d.light_diffuse * gain
        m.light_ambient[:] = d.light_ambient * gain
        m.light_specular[:] = d.light_specular * gain
        m.vis.headlight.diffuse[:] = d.head_diffuse * gain
        m.vis.headlight.ambient[:] = d.head_ambient * gain
        m.vis.headlight.specular[:] = d.head_specular * gain
        if m.nlight:
            rot = _rotation_toward(d.light_dir.mean(axis=0), np.asarray(light["direction"], dtype=np.float64),
                                   float(light.get("turn", 1.0)))
            dirs = d.light_dir @ rot.T
            m.light_dir[:] = dirs / np.linalg.norm(dirs, axis=1, keepdims=True)
            m.light_pos[:] = d.light_pos @ rot.T

    def _apply_novel_object(self, rng: np.random.Generator) -> None:
        """Recolour the manipulated object (one new colour per original material/colour, so its parts stay
        distinct) and, with `change_shape`, give it another texture of the model. Geometry is kept: it is
        physics."""
        m = self.model
        groups: dict[tuple, list[int]] = {}
        for g in self._object_geoms:
            groups.setdefault(self._appearance_key(int(g)), []).append(int(g))
        textured = [i for i in range(m.nmat) if (m.mat_texid[i] >= 0).any()]
        for key in sorted(groups):
            geoms = groups[key]
            original = self._visible_rgba(geoms[0])
            color = self.ood.draw_object_color(rng, original[:3])
            for g in geoms:
                m.geom_rgba[g, :3] = color
                m.geom_rgba[g, 3] = original[3]
            retexture = self.ood.draw_retexture(rng)
            mat = int(textured[int(rng.integers(len(textured)))]) if textured else -1
            if retexture and mat >= 0:
                for g in geoms:
                    m.geom_matid[g] = mat

    def _appearance_key(self, geom: int) -> tuple:
        matid = int(self.model.geom_matid[geom])
        return (matid, *np.round(self.model.geom_rgba[geom], 4).tolist())

    def _visible_rgba(self, geom: int) -> np.ndarray:
        """The colour MuJoCo draws: the material's unless the geom sets its own rgba."""
        rgba = self._defaults.geom_rgba[geom]
        matid = int(self._defaults.geom_matid[geom])
        if matid >= 0 and np.allclose(rgba, _DEFAULT_GEOM_RGBA):
            return self.model.mat_rgba[matid].astype(np.float64)
        return rgba.astype(np.float64)

    def _make_distractor(self, draw: dict[str, Any]) -> _Distractor:
        """Map a unit-square draw onto the table, standing on it, kept clear of the object and the goal."""
        half = 0.5 * float(draw["size"]) * _DISTRACTOR_SPAN
        shape = int(draw["shape"])
        u, v = np.asarray(draw["position"], dtype=np.float64)
        xy = np.array([_DISTRACTOR_X[0] + u * (_DISTRACTOR_X[1] - _DISTRACTOR_X[0]),
                       _DISTRACTOR_Y[0] + v * (_DISTRACTOR_Y[1] - _DISTRACTOR_Y[0])])
        xy = self._keep_clear(xy, half)
        if shape == 0:
            geom_type, size, z = mujoco.mjtGeom.mjGEOM_BOX, [half, half, half], half
        elif shape == 1:
            geom_type, size, z = mujoco.mjtGeom.mjGEOM_SPHERE, [half, half, half], half
        else:
            geom_type, size, z = mujoco.mjtGeom.mjGEOM_CYLINDER, [half, 0.6 * half, 0.0], 0.6 * half
        rgba = np.append(np.asarray(draw["color"], dtype=np.float32), 1.0).astype(np.float32)
        return _Distractor(int(geom_type), np.asarray(size, dtype=np.float64), np.array([xy[0], xy[1], z]), rgba)

    def _keep_clear(self, xy: np.ndarray, half: float) -> np.ndarray:
        """Push `xy` radially away from the task objects and the goal, which must stay visible."""
        for point in self._protected_points():
            delta = xy - point
            dist = float(np.linalg.norm(delta))
            need = half * np.sqrt(2.0) + _KEEP_AWAY
            if dist < need:
                direction = delta / dist if dist > 1e-9 else np.array([1.0, 0.0])
                xy = point + direction * need
        return np.array([np.clip(xy[0], *_TABLE_X), np.clip(xy[1], *_TABLE_Y)])

    def _protected_points(self) -> list[np.ndarray]:
        """xy of every task body (the manipulated object's included) at this episode's start, and of the goal."""
        first_task_body = self.model.body("mocap").id + 1
        bodies = set(range(first_task_body, self.model.nbody))
        bodies.update(int(b) for b in (self._object_bodies if self._object_bodies is not None else ()))
        points = [self.data.xpos[b, :2].copy() for b in sorted(bodies)]
        target = getattr(self._env, "_target_pos", None)
        if target is not None:
            points.append(np.asarray(target, dtype=np.float64)[:2])
        return points

    def _add_distractors(self, scene: mujoco.MjvScene) -> None:
        """Append this episode's distractor geoms to a freshly updated scene (render-only)."""
        for d in self._distractors:
            if scene.ngeom >= scene.maxgeom:
                return
            mujoco.mjv_initGeom(scene.geoms[scene.ngeom], d.geom_type, d.size, d.pos, np.eye(3).ravel(), d.rgba)
            scene.ngeom += 1


# --------------------------------------------------------------------------------------------------- CLI
def run_expert(task: str, episodes: int, image_size: int = 64, seed_start: int = 0, max_steps: int = 150,
               ood: str = "none") -> dict[str, float]:
    """Roll the scripted expert (with rendering) until success or max_steps; success rate, lengths, speed."""
    env = MetaWorldEnv(task, image_size=image_size, ood=OODConfig.parse(ood), max_steps=max_steps)
    successes, lengths, total_steps = 0, [], 0
    start, cpu_start = time.perf_counter(), time.process_time()
    try:
        for seed in range(seed_start, seed_start + episodes):
            env.reset(seed)
            result = StepResult(success=False, score=0.0, done=False)
            while not (result.success or result.done):
                _, result = env.step(env.expert_action())
            successes += int(result.success)
            lengths.append(env.steps)
            total_steps += env.steps
    finally:
        env.close()
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    # CPU seconds (all threads of this process, llvmpipe's included) give a speed that a loaded machine skews less.
    return {"success_rate": successes / episodes, "successes": successes, "episodes": episodes,
            "mean_steps": float(np.mean(lengths)), "steps_per_s": total_steps / elapsed,
            "steps_per_cpu_s": total_steps / max(cpu, 1e-9), "seconds": elapsed}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Measure a Meta-World scripted expert with rendering on.")
    parser.add_argument("--task", default="button-press-v3")
    parser.add_argument("--episodes", type=int, default=50)
    parser.add_argument("--seed-start", type=int, default=0)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--max-steps", type=int, default=150)
    parser.add_argument("--ood", default="none", help="none, light, distractor, novel_object or blind, "
                        "optionally ':strength' (e.g. light:1.5)")
    args = parser.parse_args(argv)
    r = run_expert(args.task, args.episodes, args.image_size, args.seed_start, args.max_steps, args.ood)
    print(f"{args.task}: success {r['successes']}/{r['episodes']} ({100 * r['success_rate']:.1f}%), "
          f"mean steps {r['mean_steps']:.1f}, {r['steps_per_s']:.1f} env steps/s wall, "
          f"{r['steps_per_cpu_s']:.1f} per CPU-second ({r['seconds']:.1f} s, {args.image_size}px, "
          f"{len(DEFAULT_CAMERAS)} cameras, ood={args.ood})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
