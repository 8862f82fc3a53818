"""OOD spelling and strength, strength 0 = in distribution, effects growing with strength, the novel object is the
manipulated one (pixels change, physics does not), and the blind control."""

from __future__ import annotations

import numpy as np
import pytest

from dapolicy.envs.perturbations import (
    ALL_KINDS,
    BLIND_GREY,
    DEFAULT_STRENGTH,
    OOD_KINDS,
    BlindEnv,
    OODConfig,
    blind_observation,
)

SIZE = 32


# ----------------------------------------------------------------------------------------------- parsing
def test_parse_kind_and_strength():
    c = OODConfig.parse("light:0.8")
    assert (c.kind, c.strength, c.spec, c.label) == ("light", 0.8, "light:0.8", "light@0.8")
    d = OODConfig.parse(" Novel-Object ")
    assert (d.kind, d.strength, d.label) == ("novel_object", DEFAULT_STRENGTH["novel_object"], "novel_object")
    assert OODConfig.parse(f"distractor:{DEFAULT_STRENGTH['distractor']}").label == "distractor"  # default: plain
    assert OODConfig.parse("light:2").label == "light@2" and OODConfig.parse("light:0").perturbs is False
    for kind in ("none", "blind"):
        c = OODConfig.parse(kind)
        assert (c.kind, c.strength, c.label, c.perturbs) == (kind, 0.0, kind, False)
    assert OODConfig.parse("blind").blind and OODConfig.parse("blind").for_env().kind == "none"
    assert set(OOD_KINDS) == set(DEFAULT_STRENGTH) and "blind" in ALL_KINDS and "blind" not in OOD_KINDS
    for text in ("light:0.8", "novel_object:1.5", "distractor", "blind", "none"):  # spec parses back
        assert OODConfig.parse(OODConfig.parse(text).spec).spec == OODConfig.parse(text).spec


@pytest.mark.parametrize("text, words", [
    ("light:abc", ["'abc'", "light:abc", "not a number"]),
    ("sparkle", ["'sparkle'", "light", "distractor", "novel_object", "blind"]),
    ("light:-1", ["-1", ">= 0"]),
    ("light:nan", ["nan", "finite"]),
    ("none:0.5", ["'none'", "no strength"]),
    ("blind:1", ["'blind'", "no strength"]),
])
def test_parse_errors_name_the_problem(text, words):
    with pytest.raises(ValueError) as err:
        OODConfig.parse(text)
    for word in words:
        assert word in str(err.value)


def test_evaluate_and_cli_use_the_same_parser():
    import argparse

    from dapolicy.evaluate import OOD_SUITE, _ood_argument, normalize_ood

    assert normalize_ood("light:0.8") == "light:0.8" and normalize_ood("ALL") == "all"
    assert normalize_ood("novel-object") == "novel_object" and normalize_ood("blind") == "blind"
    assert "blind" not in OOD_SUITE  # --ood all: none + the three perturbations only
    with pytest.raises(ValueError, match="sparkle"):
        normalize_ood("sparkle")
    with pytest.raises(argparse.ArgumentTypeError, match="not a number"):
        _ood_argument("light:abc")


# ----------------------------------------------------------------------------------------------- draws
def test_a_seed_draws_the_same_perturbation_growing_with_strength():
    def light(s):
        c = OODConfig("light", s)
        return c.draw_light(c.rng(5))

    l1, l2 = light(1.0), light(2.0)
    assert np.log(l2["brightness"]) == pytest.approx(2 * np.log(l1["brightness"]))
    np.testing.assert_allclose(l2["color"] - 1, 2 * (l1["color"] - 1))
    np.testing.assert_array_equal(l1["direction"], l2["direction"])
    assert light(0.0)["brightness"] == 1.0 and np.all(light(0.0)["color"] == 1.0)

    def distractors(s):
        c = OODConfig("distractor", s)
        return c.draw_distractors(c.rng(3))

    weak, strong = distractors(0.5), distractors(2.0)
    assert 1 <= len(weak) < len(strong) and distractors(0.0) == []
    for a, b in zip(weak, strong):  # the weak draw's items, grown
        np.testing.assert_array_equal(a["position"], b["position"])
        assert b["size"] == pytest.approx(a["size"] * 2.0)

    original = np.array([0.5, 0.1, 0.1])
    dist = []
    for s in (0.0, 0.5, 1.0, 2.0):
        c = OODConfig("novel_object", s)
        dist.append(np.linalg.norm(c.draw_object_color(c.rng(9), original) - original))
    assert dist[0] == 0.0 and dist[2] >= OODConfig().hue_shift - 1e-9
    assert all(a < b for a, b in zip(dist, dist[1:]))


# ----------------------------------------------------------------------------------------------- PushT
@pytest.fixture(scope="module")
def pusht():
    pytest.importorskip("gym_pusht")
    from dapolicy.envs.pusht import PushTEnv

    env = PushTEnv(image_size=SIZE)
    yield env
    env.close()


def _frame(env, ood: OODConfig, seed: int) -> np.ndarray:
    env.ood = ood  # read at reset: one env serves every setting
    return np.concatenate([img for img in env.reset(seed)["images"].values()], axis=1).astype(np.float64)


@pytest.mark.parametrize("kind", OOD_KINDS)
def test_pusht_strength_zero_is_in_distribution_and_effect_grows(pusht, kind):
    seeds = range(6)
    clean = {s: _frame(pusht, OODConfig(), s) for s in seeds}
    change = []
    for strength in (0.0, 0.5, 1.0, 2.0):
        frames = {s: _frame(pusht, OODConfig(kind, strength), s) for s in seeds}
        change.append(np.mean([np.abs(frames[s] - clean[s]).mean() for s in seeds]))
        if strength == 0.0:
            for s in seeds:
                np.testing.assert_array_equal(frames[s], clean[s])
    assert change[0] == 0.0 and all(a < b for a, b in zip(change, change[1:])), change


def test_blind_greys_the_images_keeps_proprio_and_physics(pusht):
    from dapolicy.envs.pusht import PushTEnv

    plain = pusht
    plain.ood = OODConfig()
    wrapped = BlindEnv(PushTEnv(image_size=SIZE))
    try:
        a, b = plain.reset(3), wrapped.reset(3)
        action = np.array([200.0, 300.0], np.float32)
        for _ in range(3):
            (a, _), (b, _) = plain.step(action), wrapped.step(action)
        np.testing.assert_array_equal(a["proprio"], b["proprio"])
        assert b["images"]["top"].shape == a["images"]["top"].shape and b["images"]["top"].dtype == np.uint8
        assert np.all(b["images"]["top"] == BLIND_GREY) and not np.all(a["images"]["top"] == BLIND_GREY)
        assert wrapped.spec == plain.spec and wrapped.state.block_pose.tolist() == plain.state.block_pose.tolist()
        np.testing.assert_array_equal(wrapped.expert_action(), plain.expert_action())
        plain.ood = OODConfig("blind")  # an env handed "blind" directly greys its own frames too
        assert np.all(plain.reset(3)["images"]["top"] == BLIND_GREY)
    finally:
        plain.ood = OODConfig()
        wrapped.close()
    obs = {"images": {"x": np.zeros((2, 2, 3), np.uint8)}, "proprio": np.ones(2, np.float32)}
    out = blind_observation(obs)
    assert np.all(out["images"]["x"] == BLIND_GREY) and out["proprio"] is obs["proprio"]


# ----------------------------------------------------------------------------------------------- Meta-World
def _object_mask(env, camera: str) -> tuple[np.ndarray, np.ndarray]:
    """(pixels where a geom of the manipulated object is the nearest surface, pixels of a site), from a
    segmentation render. Sites (the goal marker) are transparent: the object's colour shows through them."""
    import mujoco

    renderer = env._renderer
    renderer.enable_segmentation_rendering()
    try:
        renderer.update_scene(env.data, camera=camera)
        seg = renderer.render()
    finally:
        renderer.disable_segmentation_rendering()
    if camera.startswith("corner"):
        seg = seg[::-1]
    is_object = (seg[..., 1] == mujoco.mjtObj.mjOBJ_GEOM) & np.isin(seg[..., 0], env.object_geoms)
    return is_object, seg[..., 1] == mujoco.mjtObj.mjOBJ_SITE


def _play(env, ood: OODConfig, seed: int, actions: np.ndarray) -> tuple[list[dict], np.ndarray]:
    env.ood = ood
    images = [env.reset(seed)["images"]]
    for a in actions:
        images.append(env.step(a)[0]["images"])
    return images, np.concatenate([env.data.qpos, env.data.qvel]).copy()


@pytest.mark.parametrize("task, expected", [
    ("push-v3", {"objGeom"}),
    ("pick-place-v3", {"objGeom"}),
    ("coffee-push-v3", {"mug"}),
    ("peg-insert-side-v3", {"peg"}),
])
def test_novel_object_recolours_the_manipulated_object_only(task, expected):
    pytest.importorskip("metaworld")
    from dapolicy.envs.metaworld import MetaWorldEnv

    env = MetaWorldEnv(task, image_size=48)
    try:
        seed = 4
        env.reset(seed)
        names = {env.model.geom(int(g)).name for g in env.object_geoms}
        assert expected <= names, names  # found from the task's state, not a name list
        masks, sites = {}, {}
        for c in env.spec.cameras:
            masks[c], sites[c] = _object_mask(env, c)
        assert sum(m.sum() for m in masks.values()) >= 10  # the object is in view
        actions = np.tile([0.3, 0.4, -0.6, 1.0], (5, 1))  # move and close the gripper: contacts may happen
        clean, clean_state = _play(env, OODConfig(), seed, actions)
        novel, novel_state = _play(env, OODConfig("novel_object"), seed, actions)
        np.testing.assert_array_equal(novel_state, clean_state)  # colours only: identical physics
        object_change = []
        for c in env.spec.cameras:
            diff = np.abs(novel[0][c].astype(int) - clean[0][c].astype(int)).sum(-1)
            assert np.all(diff[~masks[c] & ~sites[c]] == 0), f"{task}/{c}: pixels off the manipulated object changed"
            object_change.append(diff[masks[c]].mean() / 3 if masks[c].any() else 0.0)
        assert max(object_change) > 10.0, object_change  # mean |change| per channel, 0-255
        weak, _ = _play(env, OODConfig("novel_object", 0.0), seed, actions[:0])
        for c in env.spec.cameras:
            np.testing.assert_array_equal(weak[0][c], clean[0][c])
    finally:
        env.close()


def test_metaworld_strength_zero_is_in_distribution_and_light_grows():
    pytest.importorskip("metaworld")
    from dapolicy.envs.metaworld import MetaWorldEnv

    env = MetaWorldEnv("push-v3", image_size=SIZE)
    try:
        seeds = range(3)
        clean = {s: _frame(env, OODConfig(), s) for s in seeds}
        for kind in OOD_KINDS:
            for s in seeds:
                np.testing.assert_array_equal(_frame(env, OODConfig(kind, 0.0), s), clean[s])
        for kind in ("light", "distractor"):
            change = [np.mean([np.abs(_frame(env, OODConfig(kind, strength), s) - clean[s]).mean() for s in seeds])
                      for strength in (0.5, 1.0, 2.0)]
            assert 0 < change[0] < change[1] < change[2], (kind, change)
        env.ood = OODConfig("blind")
        assert all(np.all(img == BLIND_GREY) for img in env.reset(0)["images"].values())
    finally:
        env.close()


def test_render_ood_rows_take_strengths(tmp_path):
    pytest.importorskip("gym_pusht")
    from PIL import Image

    from dapolicy.cli import main

    out = tmp_path / "ood.png"
    assert main(["render-ood", "pusht", "--out", str(out), "--seeds", "1", "--image-size", "32", "--scale", "1",
                 "--ood", "light:0,light:1.5,blind"]) == 0
    from dapolicy.render_ood import _GAP, _HEADER_HEIGHT, _LABEL_WIDTH

    with Image.open(out) as img:
        grid = np.asarray(img.convert("RGB"))
    assert grid.shape[0] == _HEADER_HEIGHT + 3 * (32 + _GAP)  # three rows
    y = _HEADER_HEIGHT + 2 * (32 + _GAP)
    assert np.all(grid[y:y + 32, _LABEL_WIDTH:_LABEL_WIDTH + 32] == BLIND_GREY)  # the blind row
    assert main(["render-ood", "pusht", "--out", str(tmp_path / "bad.png"), "--ood", "light:abc"]) == 2
    assert not (tmp_path / "bad.png").exists()
