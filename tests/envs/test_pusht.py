"""PushT env: spec and observation contract, determinism, expert progress, OOD changes pixels not physics."""

import numpy as np
import pytest

pytest.importorskip("gym_pusht")

from dapolicy.envs.base import Env, make_env  # noqa: E402
from dapolicy.envs.experts.pusht_planner import (  # noqa: E402
    EDGE_CUM,
    GOAL_POSE,
    PlannerConfig,
    _inside_outline,
    coverage,
    keypoint_error,
    outline_point,
)
from dapolicy.envs.perturbations import OOD_KINDS, OODConfig  # noqa: E402
from dapolicy.envs.pusht import PushTEnv  # noqa: E402

SIZE = 32


def state_tuple(env: PushTEnv) -> tuple:
    s = env.state
    return (*s.agent_pos, *s.agent_vel, *s.block_pos, s.block_angle, *s.block_vel, s.block_angvel)


def pushing_actions(env: PushTEnv, n: int) -> list[np.ndarray]:
    """A fixed action sequence that drives the agent through the block (so contacts happen)."""
    s = env.state
    start, goal = s.agent_pos, s.block_pos + (s.block_pos - s.agent_pos) * 0.5
    return [(start + (goal - start) * min(1.0, (k + 1) / (n - 2))).astype(np.float32) for k in range(n)]


def test_spec_and_observation_shapes():
    env = make_env("pusht", image_size=SIZE)
    assert isinstance(env, PushTEnv) and isinstance(env, Env)
    spec = env.spec
    assert (spec.name, spec.cameras, spec.image_size) == ("pusht", ("top",), SIZE)
    assert (spec.action_dim, spec.proprio_dim, spec.max_steps) == (2, 2, 300)
    assert spec.action_low == (0.0, 0.0) and spec.action_high == (512.0, 512.0)
    obs = env.reset(seed=0)
    for o in (obs, env.step(np.array([256.0, 256.0], np.float32))[0]):
        assert set(o) == {"images", "proprio"} and set(o["images"]) == {"top"}
        assert o["images"]["top"].shape == (SIZE, SIZE, 3) and o["images"]["top"].dtype == np.uint8
        assert o["proprio"].shape == (2,) and o["proprio"].dtype == np.float32
    _, result = env.step(np.array([256.0, 256.0], np.float32))
    assert isinstance(result.success, bool) and 0.0 <= result.score <= 1.0 and not result.done
    assert "coverage" in result.info
    env.close()


def test_done_at_max_steps():
    env = PushTEnv(image_size=SIZE, max_steps=3)
    env.reset(seed=1)
    dones = [env.step(np.array([100.0, 100.0], np.float32))[1].done for _ in range(3)]
    assert dones == [False, False, True]
    env.close()


def test_reset_is_deterministic():
    env = PushTEnv(image_size=SIZE)
    obs_a, state_a = env.reset(seed=7), state_tuple(env)
    env.reset(seed=8)
    obs_b, state_b = env.reset(seed=7), state_tuple(env)
    assert state_a == state_b
    np.testing.assert_array_equal(obs_a["images"]["top"], obs_b["images"]["top"])
    np.testing.assert_array_equal(obs_a["proprio"], obs_b["proprio"])
    env.reset(seed=8)
    assert state_tuple(env) != state_a
    env.close()


def test_bad_action_shape_raises():
    env = PushTEnv(image_size=SIZE)
    env.reset(seed=0)
    with pytest.raises(ValueError, match=r"shape \(2,\)"):
        env.step(np.zeros(3, np.float32))
    with pytest.raises(ValueError, match=r"shape \(2,\)"):
        env.step(np.zeros((1, 2), np.float32))
    env.close()


def test_planner_geometry():
    assert keypoint_error(GOAL_POSE) == pytest.approx(0.0, abs=1e-9)
    assert coverage(GOAL_POSE) == pytest.approx(1.0)
    assert coverage(GOAL_POSE + np.array([200.0, 0.0, 0.0])) == 0.0
    for s in np.linspace(0.5, EDGE_CUM[-1] - 0.5, 37):  # normals point out of the T everywhere
        p, n = outline_point(s)
        assert not _inside_outline(p + 2 * n) and _inside_outline(p - 2 * n)


def test_expert_makes_progress():
    env = PushTEnv(image_size=SIZE, planner_config=PlannerConfig(n_samples=12))
    env.reset(seed=3)
    start = keypoint_error(env.state.block_pose)
    for _ in range(25):
        action = env.expert_action()
        assert action.shape == (2,) and action.dtype == np.float32
        env.step(action)
    assert keypoint_error(env.state.block_pose) < start - 10.0
    env.close()


def test_expert_is_reproducible():
    env = PushTEnv(image_size=SIZE, planner_config=PlannerConfig(n_samples=4))
    runs = []
    for _ in range(2):
        env.reset(seed=5)
        poses = []
        for _ in range(6):
            env.step(env.expert_action())
            poses.append(env.state.block_pose)
        runs.append(poses)
    np.testing.assert_array_equal(np.array(runs[0]), np.array(runs[1]))
    env.close()


@pytest.mark.parametrize("kind", OOD_KINDS)
def test_ood_changes_pixels_not_physics(kind):
    plain = PushTEnv(image_size=SIZE)
    perturbed = PushTEnv(image_size=SIZE, ood=OODConfig(kind=kind))
    obs_p, obs_o = plain.reset(seed=11), perturbed.reset(seed=11)
    block_start = plain.state.block_pose
    differs = [not np.array_equal(obs_p["images"]["top"], obs_o["images"]["top"])]
    for action in pushing_actions(plain, 12):
        (obs_p, _), (obs_o, _) = plain.step(action), perturbed.step(action)
        assert state_tuple(plain) == state_tuple(perturbed)
        np.testing.assert_array_equal(obs_p["proprio"], obs_o["proprio"])
        differs.append(not np.array_equal(obs_p["images"]["top"], obs_o["images"]["top"]))
    assert all(differs)
    assert not np.allclose(plain.state.block_pose, block_start)  # the actions did push the block
    plain.close()
    perturbed.close()


@pytest.mark.parametrize("kind", OOD_KINDS)
def test_ood_draw_follows_seed(kind):
    a = PushTEnv(image_size=SIZE, ood=OODConfig(kind=kind))
    b = PushTEnv(image_size=SIZE, ood=OODConfig(kind=kind))
    img_a, img_b = a.reset(seed=4)["images"]["top"], b.reset(seed=4)["images"]["top"]
    np.testing.assert_array_equal(img_a, img_b)
    b.reset(seed=5)
    first, other = a.reset(seed=4)["images"]["top"], a.reset(seed=5)["images"]["top"]
    np.testing.assert_array_equal(first, img_a)
    assert repr(a.ood_params) == repr(b.ood_params)  # same draw for seed 5 in both envs
    assert not np.array_equal(first, other)
    a.close()
    b.close()
