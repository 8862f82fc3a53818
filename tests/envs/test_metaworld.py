"""Meta-World env: spec and observation format, seeding, camera orientation, expert, OOD is visual-only."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("metaworld")

from dapolicy.envs.base import Env, make_env  # noqa: E402
from dapolicy.envs.metaworld import MetaWorldEnv, expert_policy_class, task_names  # noqa: E402
from dapolicy.envs.perturbations import OOD_KINDS, OODConfig  # noqa: E402

TASK = "button-press-v3"
SIZE = 32


@pytest.fixture(scope="module")
def env():
    e = MetaWorldEnv(TASK, image_size=SIZE)
    yield e
    e.close()


def _rollout(e: MetaWorldEnv, seed: int, actions: np.ndarray) -> tuple[list, np.ndarray, dict]:
    """Reset with `seed`, play `actions`; return the observations, the final raw state and the final images."""
    obs = [e.reset(seed)]
    for a in actions:
        o, _ = e.step(a)
        obs.append(o)
    return obs, e.state, obs[-1]["images"]


def test_spec_and_observation_format(env):
    assert isinstance(env, Env)
    s = env.spec
    assert s.name == f"metaworld/{TASK}" and s.cameras == ("corner4", "gripperPOV")
    assert (s.image_size, s.action_dim, s.proprio_dim, s.max_steps) == (SIZE, 4, 4, 150)
    assert s.action_low == (-1.0,) * 4 and s.action_high == (1.0,) * 4
    obs = env.reset(0)
    assert list(obs["images"]) == list(s.cameras)
    for img in obs["images"].values():
        assert img.shape == (SIZE, SIZE, 3) and img.dtype == np.uint8
    assert obs["proprio"].shape == (4,) and obs["proprio"].dtype == np.float32
    assert env.state.shape == (39,)
    np.testing.assert_allclose(obs["proprio"], env.state[:4].astype(np.float32))
    obs, res = env.step(np.array([2.0, 0.0, 0.0, 0.0]))  # out of range: clipped, not an error
    assert isinstance(res.success, bool) and res.score in (0.0, 1.0) and res.done is False
    a = env.expert_action()
    assert a.shape == (4,) and np.all(np.abs(a) <= 1.0)


def test_make_env_and_custom_cameras():
    e = make_env(f"metaworld/{TASK}", image_size=16, cameras=("topview",), max_steps=3)
    try:
        obs = e.reset(0)
        assert list(obs["images"]) == ["topview"] and obs["images"]["topview"].shape == (16, 16, 3)
        results = [e.step(np.zeros(4))[1] for _ in range(3)]
        assert [r.done for r in results] == [False, False, True]
        with pytest.raises(RuntimeError, match="reset"):
            e.step(np.zeros(4))
    finally:
        e.close()


def test_reset_is_deterministic_and_seeds_differ(env):
    first = env.reset(7)
    s7 = env.state
    for _ in range(3):
        env.step(env.expert_action())
    again = env.reset(7)
    np.testing.assert_array_equal(env.state, s7)
    np.testing.assert_array_equal(first["images"]["corner4"], again["images"]["corner4"])
    env.reset(8)
    assert not np.allclose(env.state[4:7], s7[4:7])  # the button moved


def test_corner_camera_is_flipped_right_way_up(env):
    env.reset(0)
    ours = env.render("corner4")
    env._renderer.update_scene(env.data, camera="corner4")
    raw = env._renderer.render()
    np.testing.assert_array_equal(ours, raw[::-1])
    assert not np.array_equal(ours, raw)
    # gripperPOV is already upright: not flipped
    env._renderer.update_scene(env.data, camera="gripperPOV")
    np.testing.assert_array_equal(env.render("gripperPOV"), env._renderer.render())


def test_expert_solves_button_press(env):
    env.reset(0)
    for _ in range(env.spec.max_steps):
        _, res = env.step(env.expert_action())
        if res.success:
            break
    assert res.success and res.score == 1.0


@pytest.mark.parametrize("kind", OOD_KINDS)
def test_ood_changes_pixels_not_physics(env, kind):
    rng = np.random.default_rng(0)
    actions = rng.uniform(-1, 1, size=(6, 4))
    actions[:, 2] = -0.5  # move down, so the hand pushes against the table / objects
    base_obs, base_state, base_imgs = _rollout(env, 3, actions)
    e = MetaWorldEnv(TASK, image_size=SIZE, ood=OODConfig(kind=kind))
    try:
        ood_obs, ood_state, ood_imgs = _rollout(e, 3, actions)
        np.testing.assert_array_equal(ood_state, base_state)
        for a, b in zip(base_obs, ood_obs):
            np.testing.assert_array_equal(a["proprio"], b["proprio"])
        assert any(not np.array_equal(base_imgs[c], ood_imgs[c]) for c in e.spec.cameras)
        assert not np.array_equal(base_obs[0]["images"]["corner4"], ood_obs[0]["images"]["corner4"])
        # the same seed draws the same perturbation
        again = e.reset(3)
        np.testing.assert_array_equal(again["images"]["corner4"], ood_obs[0]["images"]["corner4"])
    finally:
        e.close()


def test_in_distribution_episode_restores_visuals(env):
    clean = env.reset(2)["images"]["corner4"]
    e = MetaWorldEnv(TASK, image_size=SIZE, ood=OODConfig(kind="light"))
    try:
        lit = e.reset(2)["images"]["corner4"]
        e.ood = OODConfig()  # the next episode is in distribution: defaults must come back
        np.testing.assert_array_equal(e.reset(2)["images"]["corner4"], clean)
        assert not np.array_equal(lit, clean)
    finally:
        e.close()


def test_unknown_task_names_it():
    with pytest.raises(ValueError, match="buton-press-v3") as err:
        MetaWorldEnv("buton-press-v3")
    assert "button-press-v3" in str(err.value)  # lists the valid names


def test_unknown_camera_is_rejected():
    with pytest.raises(ValueError, match="nosuchcam"):
        MetaWorldEnv(TASK, image_size=SIZE, cameras=("nosuchcam",))


def test_bad_action_shape_names_expected_shape(env):
    env.reset(0)
    with pytest.raises(ValueError, match=r"\(4,\)"):
        env.step(np.zeros(3))


def test_every_task_has_an_expert():
    names = task_names()
    assert len(names) == 50 and "peg-insert-side-v3" in names
    assert expert_policy_class("peg-insert-side-v3").__name__ == "SawyerPegInsertionSideV3Policy"
    for name in names:
        assert expert_policy_class(name).__name__.endswith("V3Policy")
