"""Scripted PushT expert: a sampling planner over push primitives, simulated in a second gym-pusht instance.

gym-pusht ships no expert, and `copy.deepcopy` of its env fails on pymunk's collision handler, so the planner
keeps its own physics-only instance and copies the six body fields (agent position/velocity, block
position/angle/velocity/angular velocity) into a fresh space before every rollout. A primitive is "go around
the block, approach a contact point on the T's outline, push through it"; the planner samples many, simulates
each, executes the best one open-loop and replans when it ends (or when reality drifts from the prediction).

Because the space has zero damping (pymunk: every body loses all its velocity each second) the block is
quasi-static: it moves only while pushed, which is what makes short-horizon rollouts a good predictor.

Run `python -m dapolicy.envs.experts.pusht_planner --episodes 50` to measure the success rate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

# Geometry of gym-pusht's T in the block's local frame (scale 30): a 120x30 bar on top of a 30x90 stem.
T_BAR = np.array([(-60.0, 30.0), (60.0, 30.0), (60.0, 0.0), (-60.0, 0.0)])
T_STEM = np.array([(-15.0, 30.0), (-15.0, 120.0), (15.0, 120.0), (15.0, 30.0)])
T_KEYPOINTS = np.concatenate([T_BAR, T_STEM])  # the 8 keypoints, in gym-pusht's `get_keypoints` order
T_OUTLINE = np.array([(-60.0, 0.0), (60.0, 0.0), (60.0, 30.0), (15.0, 30.0),
                      (15.0, 120.0), (-15.0, 120.0), (-15.0, 30.0), (-60.0, 30.0)])  # union of bar and stem
T_COG = np.array([0.0, 45.0])  # gym-pusht sets the centre of gravity to the mean of the two parts' centres
T_RADIUS = float(np.max(np.linalg.norm(T_OUTLINE - T_COG, axis=1)))  # ~76.5 px
GOAL_POSE = np.array([256.0, 256.0, math.pi / 4])
SUCCESS_COVERAGE = 0.95


@dataclass
class PushTState:
    """The privileged simulator state the planner needs (pixels, radians, per second)."""

    agent_pos: np.ndarray
    agent_vel: np.ndarray
    block_pos: np.ndarray
    block_angle: float
    block_vel: np.ndarray
    block_angvel: float

    @property
    def block_pose(self) -> np.ndarray:
        return np.array([self.block_pos[0], self.block_pos[1], self.block_angle])


def read_state(sim) -> PushTState:
    """Read the six body fields from an (unwrapped) gym-pusht env."""
    return PushTState(
        agent_pos=np.array(sim.agent.position, dtype=np.float64),
        agent_vel=np.array(sim.agent.velocity, dtype=np.float64),
        block_pos=np.array(sim.block.position, dtype=np.float64),
        block_angle=float(sim.block.angle),
        block_vel=np.array(sim.block.velocity, dtype=np.float64),
        block_angvel=float(sim.block.angular_velocity),
    )


def write_state(sim, state: PushTState) -> None:
    """Put `state` into an (unwrapped) gym-pusht env; the caller rebuilds the space first if it wants no
    contact history carried over."""
    sim.agent.position = tuple(float(v) for v in state.agent_pos)
    sim.agent.velocity = tuple(float(v) for v in state.agent_vel)
    sim.block.angle = float(state.block_angle)
    sim.block.position = tuple(float(v) for v in state.block_pos)
    sim.block.velocity = tuple(float(v) for v in state.block_vel)
    sim.block.angular_velocity = float(state.block_angvel)


def physics_step(sim, target: np.ndarray) -> None:
    """One env step without rendering or coverage: the same PD control loop gym-pusht's `step` runs."""
    agent, space, dt = sim.agent, sim.space, sim.dt
    kp, kv = sim.k_p, sim.k_v
    tx, ty = float(target[0]), float(target[1])
    for _ in range(int(1 / (dt * sim.control_hz))):
        p, v = agent.position, agent.velocity
        ax = kp * (tx - p.x) + kv * (0.0 - v.x)
        ay = kp * (ty - p.y) + kv * (0.0 - v.y)
        agent.velocity = (v.x + ax * dt, v.y + ay * dt)
        space.step(dt)


# ----------------------------------------------------------------------------------------------- geometry
def rotation(angle: float) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    return np.array([[c, -s], [s, c]])


def to_world(points: np.ndarray, pose: np.ndarray) -> np.ndarray:
    """Local T coordinates -> world pixels for a block pose (x, y, angle)."""
    return points @ rotation(pose[2]).T + pose[:2]


def to_local(points: np.ndarray, pose: np.ndarray) -> np.ndarray:
    return (points - pose[:2]) @ rotation(pose[2])


GOAL_KEYPOINTS = to_world(T_KEYPOINTS, GOAL_POSE)


def keypoint_error(pose: np.ndarray) -> float:
    """Mean distance (px) between the block's 8 keypoints and the goal's: smooth in translation and angle."""
    return float(np.mean(np.linalg.norm(to_world(T_KEYPOINTS, pose) - GOAL_KEYPOINTS, axis=1)))


def coverage(pose: np.ndarray) -> float:
    """Fraction of the goal T covered by the block, as gym-pusht computes it (shapely polygons)."""
    import shapely.geometry as sg

    block = sg.MultiPolygon([sg.Polygon(to_world(p, pose)) for p in (T_BAR, T_STEM)])
    goal = _goal_geometry()
    return float(goal.intersection(block).area / goal.area)


_GOAL_GEOM = None


def _goal_geometry():
    global _GOAL_GEOM
    if _GOAL_GEOM is None:
        import shapely.geometry as sg

        _GOAL_GEOM = sg.MultiPolygon([sg.Polygon(to_world(p, GOAL_POSE)) for p in (T_BAR, T_STEM)])
    return _GOAL_GEOM


def _outline_edges() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Edge starts, unit directions, outward normals and lengths of the T outline (local frame)."""
    starts = T_OUTLINE
    ends = np.roll(T_OUTLINE, -1, axis=0)
    vec = ends - starts
    lengths = np.linalg.norm(vec, axis=1)
    dirs = vec / lengths[:, None]
    normals = np.stack([dirs[:, 1], -dirs[:, 0]], axis=1)
    mid = starts + 0.5 * vec
    if not _inside_outline(mid[0] + normals[0]):  # orient normals outward whatever the vertex order
        return starts, dirs, normals, lengths
    return starts, dirs, -normals, lengths


def _inside_outline(p: np.ndarray) -> bool:
    """Point-in-polygon (even-odd) for the local T outline."""
    x, y = float(p[0]), float(p[1])
    inside = False
    n = len(T_OUTLINE)
    for i in range(n):
        x1, y1 = T_OUTLINE[i]
        x2, y2 = T_OUTLINE[(i + 1) % n]
        if (y1 > y) != (y2 > y) and x < x1 + (y - y1) * (x2 - x1) / (y2 - y1):
            inside = not inside
    return inside


EDGE_START, EDGE_DIR, EDGE_NORMAL, EDGE_LEN = _outline_edges()
EDGE_CUM = np.concatenate([[0.0], np.cumsum(EDGE_LEN)])


def outline_point(s: float) -> tuple[np.ndarray, np.ndarray]:
    """Point and outward normal at arc length s (wrapped) along the T outline, local frame."""
    s = s % EDGE_CUM[-1]
    i = int(np.searchsorted(EDGE_CUM, s, side="right") - 1)
    return EDGE_START[i] + EDGE_DIR[i] * (s - EDGE_CUM[i]), EDGE_NORMAL[i]


def _point_segment_distances(x: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Distances from points x [N,2] to segments a-b [N,2] (broadcasting)."""
    d = b - a
    t = np.clip(np.sum((x - a) * d, axis=-1) / np.maximum(np.sum(d * d, axis=-1), 1e-12), 0.0, 1.0)
    return np.linalg.norm(x - (a + t[..., None] * d), axis=-1)


def _cross(o: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return (u[..., 0] - o[..., 0]) * (v[..., 1] - o[..., 1]) - (u[..., 1] - o[..., 1]) * (v[..., 0] - o[..., 0])


_EDGE_A, _EDGE_B = T_OUTLINE, np.roll(T_OUTLINE, -1, axis=0)


def outline_distance(p: np.ndarray, q: np.ndarray) -> float:
    """Smallest distance between segment pq (local frame) and the T outline (0 if they cross)."""
    p_, q_ = np.broadcast_to(p, _EDGE_A.shape), np.broadcast_to(q, _EDGE_A.shape)
    crossing = (_cross(_EDGE_A, _EDGE_B, p_) * _cross(_EDGE_A, _EDGE_B, q_) < 0) & \
               (_cross(p_, q_, _EDGE_A) * _cross(p_, q_, _EDGE_B) < 0)
    if crossing.any():
        return 0.0
    return float(min(_point_segment_distances(p_, _EDGE_A, _EDGE_B).min(),
                     _point_segment_distances(q_, _EDGE_A, _EDGE_B).min(),
                     _point_segment_distances(_EDGE_A, p_, q_).min(),
                     _point_segment_distances(_EDGE_B, p_, q_).min()))


def segment_clear(p: np.ndarray, q: np.ndarray, pose: np.ndarray, radius: float) -> bool:
    """Whether a disc of `radius` can travel from p to q (world) without touching the T at `pose`."""
    lp, lq = to_local(np.stack([p, q]), pose)
    if _inside_outline(lp) or _inside_outline(lq):
        return False
    return outline_distance(lp, lq) >= radius


def resample(waypoints: list[np.ndarray], step: float) -> np.ndarray:
    """Targets along a polyline, spaced at most `step` apart, excluding the start point."""
    out: list[np.ndarray] = []
    for a, b in zip(waypoints[:-1], waypoints[1:]):
        dist = float(np.linalg.norm(b - a))
        n = max(1, int(math.ceil(dist / step)))
        out.extend(a + (b - a) * (k / n) for k in range(1, n + 1))
    return np.array(out).reshape(-1, 2)


# ------------------------------------------------------------------------------------------------ planner
@dataclass
class PlannerConfig:
    """Parameters of the sampling planner (pixels, radians, env steps).

    n_samples: push primitives sampled and simulated per replanning.
    max_step_px: the agent target moves at most this far per env step (smooth, human-like demos).
    agent_radius: radius of the pusher disc in gym-pusht.
    clearance: gap kept between the disc and the T at the start of the approach.
    orbit_margin: extra radius, beyond the T's circumradius and the disc, of the go-around circle.
    jitter_std: std of the push direction's deviation from the contact's inward normal.
    push_far: (min, max) push length beyond first contact when far from the goal.
    push_near: (min, max) push length near the goal (fine corrections).
    near_error: mean keypoint error (px) under which the planner scores by coverage instead of keypoints.
    check_error: a rollout checks coverage (to stop on success) once the block's origin is this close (px)
        to the goal's and its angle within check_error / 60 rad (the bar's half-length) of it.
    step_cost_px: far from the goal, cost per rollout step in px of keypoint error (detours must pay off).
    step_cost_coverage: near the goal, cost per rollout step in units of coverage.
    hold_steps: steps the final push target is held (the PD controller lags ~2 steps behind a moving target).
    long_way_prob: probability of going around the block the long way (useful near walls).
    deviation_tol: replan early when the real block drifts this far (px, keypoints) from the prediction.
    workspace: (low, high) clip of targets so the disc never presses into the walls.
    """

    n_samples: int = 48
    max_step_px: float = 22.0
    agent_radius: float = 15.0
    clearance: float = 6.0
    orbit_margin: float = 10.0
    jitter_std: float = 0.3
    push_far: tuple[float, float] = (20.0, 140.0)
    push_near: tuple[float, float] = (2.0, 40.0)
    near_error: float = 20.0
    check_error: float = 8.0
    step_cost_px: float = 0.2
    step_cost_coverage: float = 2e-4
    hold_steps: int = 2
    long_way_prob: float = 0.15
    deviation_tol: float = 1.5
    workspace: tuple[float, float] = (22.0, 490.0)


@dataclass
class Rollout:
    """A simulated primitive: its targets, predicted block poses after each step, and its cost."""

    targets: np.ndarray
    poses: np.ndarray
    cost: float
    success: bool = False
    params: dict = field(default_factory=dict)


class PushTPlanner:
    """Samples push primitives, simulates each in its own gym-pusht instance, executes the best.

    Deterministic given its seed: `reset(seed)` re-seeds the sampler, so expert demos are reproducible.
    """

    def __init__(self, config: PlannerConfig | None = None) -> None:
        self.config = config or PlannerConfig()
        self._sim = None
        self._rng = np.random.default_rng(0)
        self._plan: Rollout | None = None
        self._index = 0
        self.n_replans = 0

    # -- public -------------------------------------------------------------------------------------------
    def reset(self, seed: int) -> None:
        """Start an episode: the sampler's randomness comes from the episode seed only."""
        self._rng = np.random.default_rng([int(seed), 0x5054])
        self._plan, self._index, self.n_replans = None, 0, 0

    def act(self, state: PushTState) -> np.ndarray:
        """The next absolute agent target (float32 [2], pixels) for the current state."""
        if self._needs_replan(state):
            self._plan, self._index = self.plan(state), 0
            self.n_replans += 1
        target = self._plan.targets[self._index]
        self._index += 1
        return target.astype(np.float32)

    def plan(self, state: PushTState) -> Rollout:
        """Sample `n_samples` primitives from `state`, simulate them and return the cheapest."""
        near = keypoint_error(state.block_pose) < self.config.near_error
        best: Rollout | None = None
        for _ in range(self.config.n_samples):
            targets, params = self._sample_primitive(state, near)
            rollout = self._simulate(state, targets, near)
            rollout.params = params
            if best is None or rollout.cost < best.cost:
                best = rollout
            if best.success:
                break
        return best

    # -- sampling ------------------------------------------------------------------------------------------
    def _sample_primitive(self, state: PushTState, near: bool) -> tuple[np.ndarray, dict]:
        """Targets for: go around the block (if needed), approach the contact point, push through it."""
        cfg, rng = self.config, self._rng
        pose = state.block_pose
        rot = rotation(pose[2])
        for _ in range(20):  # resample contacts whose approach start would overlap the T (concave corners)
            s = rng.uniform(0.0, EDGE_CUM[-1])
            local_c, local_n = outline_point(s)
            jitter = float(np.clip(rng.normal(0.0, cfg.jitter_std), -1.0, 1.0))
            d_local = rotation(jitter) @ -local_n
            start_local = local_c - d_local * (cfg.agent_radius + cfg.clearance)
            if self._disc_fits(start_local, cfg.agent_radius + 0.5 * cfg.clearance):
                break
        contact = rot @ local_c + pose[:2]
        direction = rot @ d_local
        start = rot @ start_local + pose[:2]
        lo, hi = cfg.push_near if near else cfg.push_far
        length = float(np.exp(rng.uniform(math.log(lo), math.log(hi))))
        end = contact - direction * cfg.agent_radius + direction * length
        long_way = bool(rng.random() < cfg.long_way_prob)
        waypoints = self._route(state.agent_pos, start, pose, long_way)
        waypoints.append(end)
        targets = resample(waypoints, cfg.max_step_px)
        targets = np.concatenate([targets, np.repeat(targets[-1:], cfg.hold_steps, axis=0)])
        targets = np.clip(targets, *cfg.workspace).astype(np.float32)
        return targets, {"s": s, "jitter": jitter, "length": length, "long_way": long_way}

    def _disc_fits(self, local_p: np.ndarray, radius: float) -> bool:
        """Whether a disc at a local point is outside the T with at least `radius` to spare."""
        return not _inside_outline(local_p) and outline_distance(local_p, local_p) >= radius - 1e-6

    def _route(self, agent: np.ndarray, start: np.ndarray, pose: np.ndarray, long_way: bool) -> list[np.ndarray]:
        """Waypoints from the agent to the approach start: straight if clear, else along a circle around
        the block's centre of gravity (the shorter way unless `long_way`)."""
        cfg = self.config
        if not long_way and segment_clear(agent, start, pose, cfg.agent_radius + 2.0):
            return [agent, start]
        cog = to_world(T_COG[None], pose)[0]
        radius = T_RADIUS + cfg.agent_radius + cfg.orbit_margin
        a0 = math.atan2(agent[1] - cog[1], agent[0] - cog[0])
        a1 = math.atan2(start[1] - cog[1], start[0] - cog[0])
        delta = (a1 - a0 + math.pi) % (2 * math.pi) - math.pi
        if long_way:
            delta -= math.copysign(2 * math.pi, delta)
        n = max(1, int(math.ceil(abs(delta) / (math.pi / 8))))
        arc = [cog + radius * np.array([math.cos(a0 + delta * k / n), math.sin(a0 + delta * k / n)])
               for k in range(n + 1)]
        return [agent, *arc, start]

    # -- simulation ----------------------------------------------------------------------------------------
    def _simulator(self):
        """The second, physics-only gym-pusht instance (created on first use)."""
        if self._sim is None:
            import gym_pusht  # noqa: F401  (registers the env)
            import gymnasium as gym

            self._sim = gym.make("gym_pusht/PushT-v0", obs_type="state", disable_env_checker=True).unwrapped
            self._sim.reset(seed=0)
        return self._sim

    def _simulate(self, state: PushTState, targets: np.ndarray, near: bool) -> Rollout:
        """Roll the targets out from `state` in a fresh space; stop early on success."""
        cfg = self.config
        sim = self._simulator()
        sim._setup()  # fresh space: no contact history from the previous rollout
        sim.collision_handeler.post_solve = _ignore_contacts  # gym's contact counter only slows rollouts
        write_state(sim, state)
        poses = np.empty((len(targets), 3))
        gx, gy, ga = GOAL_POSE
        for i, target in enumerate(targets):
            physics_step(sim, target)
            x, y, angle = sim.block.position.x, sim.block.position.y, sim.block.angle
            poses[i] = (x, y, angle)
            # cheap prefilter: success needs the origin within a few px and the angle within a few degrees
            close = math.hypot(x - gx, y - gy) < cfg.check_error and \
                abs((angle - ga + math.pi) % (2 * math.pi) - math.pi) < cfg.check_error / 60.0
            if close and coverage(poses[i]) > SUCCESS_COVERAGE:
                n = i + 1
                return Rollout(targets[:n], poses[:n], cost=-1.0 + cfg.step_cost_coverage * n, success=True)
        if near:  # both scores are compared only within one replanning, so their units may differ
            cost = 1.0 - coverage(poses[-1]) + cfg.step_cost_coverage * len(targets)
        else:
            cost = keypoint_error(poses[-1]) + cfg.step_cost_px * len(targets)
        return Rollout(targets, poses, cost=cost)

    def _needs_replan(self, state: PushTState) -> bool:
        """Replan when there is no plan, it is used up, or the real block left the predicted path."""
        if self._plan is None or self._index >= len(self._plan.targets):
            return True
        if self._index == 0:
            return False
        predicted = self._plan.poses[self._index - 1]
        drift = to_world(T_KEYPOINTS, predicted) - to_world(T_KEYPOINTS, state.block_pose)
        return float(np.max(np.linalg.norm(drift, axis=1))) > self.config.deviation_tol


def _ignore_contacts(arbiter, space, data) -> None:
    """Post-solve callback that does nothing (gym-pusht's only counts contact points for `info`)."""


# --------------------------------------------------------------------------------------------- benchmark
def run_episode(seed: int, config: PlannerConfig | None = None, image_size: int = 64,
                max_steps: int = 300) -> dict:
    """One expert episode in `PushTEnv` (rendering included, as when collecting demos)."""
    from dapolicy.envs.pusht import PushTEnv  # late: pusht.py imports this module

    env = PushTEnv(image_size=image_size, max_steps=max_steps, planner_config=config)
    env.reset(seed)
    best, steps, success = 0.0, 0, False
    for steps in range(1, max_steps + 1):  # noqa: B007 (the count is reported after the loop)
        _, result = env.step(env.expert_action())
        best = max(best, float(result.info["coverage"]))
        success = result.success
        if result.done:
            break
    replans = env.planner.n_replans
    env.close()
    return {"seed": seed, "success": success, "steps": steps, "max_coverage": round(best, 4), "replans": replans}


def main(argv: list[str] | None = None) -> int:
    """Measure the expert: success rate, mean steps and wall/CPU seconds per episode over a seed range."""
    import argparse
    import os
    import time

    os.environ.setdefault("SDL_VIDEODRIVER", "dummy")
    # under `python -m` this file runs as __main__; use the importable module's classes, as PushTEnv does
    from dapolicy.envs.experts.pusht_planner import PlannerConfig, run_episode
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--episodes", type=int, default=50)
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--samples", type=int, default=PlannerConfig.n_samples)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args(argv)
    config = PlannerConfig(n_samples=args.samples)
    results, t0, cpu0 = [], time.perf_counter(), time.process_time()
    for seed in range(args.first_seed, args.first_seed + args.episodes):
        r = run_episode(seed, config, image_size=args.image_size)
        results.append(r)
        if args.verbose:
            print(r, flush=True)
    elapsed, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    n_ok = sum(r["success"] for r in results)
    print(f"success {n_ok}/{len(results)} = {n_ok / len(results):.2f}  "
          f"mean steps {np.mean([r['steps'] for r in results]):.1f} "
          f"(successes {np.mean([r['steps'] for r in results if r['success']] or [0]):.1f})  "
          f"mean max coverage {np.mean([r['max_coverage'] for r in results]):.3f}  "
          f"{elapsed / len(results):.2f} s/episode ({cpu / len(results):.2f} s CPU)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
