"""`dap collect` on the real PushT env (tiny episodes), resume after an interruption, random actors,
and a smoke test of `dap render-ood`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from dapolicy.cli import main
from dapolicy.collect import RANDOM_SEED_OFFSET, CollectConfig, Job, collect, ou_actor, plan_jobs, walk_actor
from dapolicy.data.store import EpisodeStore
from dapolicy.spec import EnvSpec

TINY = dict(image_size=32, max_steps=4, random_length=5, progress=False)


class Stop(Exception):
    pass


def test_collect_pusht_writes_store_and_summary(tmp_path: Path) -> None:
    out = tmp_path / "run"
    summary = collect("pusht", out, expert_episodes=1, random_episodes=1, seed=3, **TINY)
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk == json.loads(json.dumps(summary))
    assert summary["episodes"] == 2 and summary["complete"] is True
    assert summary["sources"]["expert"]["episodes"] == 1
    assert summary["sources"]["random"]["episodes"] + summary["sources"]["noisy_expert"]["episodes"] == 1
    assert summary["expert_success_rate"] in (0.0, 1.0)
    assert summary["spec"]["name"] == "pusht" and summary["settings"]["seed"] == 3

    store = EpisodeStore.open(out, verify=True)  # the collect dir itself opens
    meta = store.meta
    assert [m["source"] for m in meta] == ["expert", "random"]
    assert [m["seed"] for m in meta] == [3, 3 + RANDOM_SEED_OFFSET]
    assert meta[0]["length"] <= 4 and meta[1]["length"] <= 5
    assert summary["frames"] == sum(m["length"] for m in meta) == store.num_frames
    ep = store.read_episode(1)
    assert ep.images["top"].shape == (meta[1]["length"], 32, 32, 3)
    assert (ep.action >= 0).all() and (ep.action <= 512).all()


def test_existing_dir_needs_resume(tmp_path: Path) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / "something").write_text("x")
    with pytest.raises(FileExistsError, match="--resume"):
        collect("pusht", out, expert_episodes=0, random_episodes=1, **TINY)
    code = main(["collect", "pusht", "--out", str(out), "--expert-episodes", "0", "--random-episodes", "1",
                 "--quiet"])
    assert code == 2


def test_interrupted_then_resumed(tmp_path: Path) -> None:
    out = tmp_path / "run"
    settings = dict(expert_episodes=1, random_episodes=2, noisy_fraction=0.0, **TINY)

    def stop_after_first(index: int, meta: dict) -> None:
        if index == 0:
            raise Stop

    with pytest.raises(Stop):
        collect("pusht", out, on_episode=stop_after_first, **settings)
    partial = json.loads((out / "summary.json").read_text())
    assert partial["episodes"] == 1 and partial["complete"] is False

    with pytest.raises(ValueError, match="seed"):  # resuming with other seeds would mix two collections
        collect("pusht", out, resume=True, seed=7, **settings)

    summary = collect("pusht", out, resume=True, **settings)
    assert summary["episodes"] == 3 and summary["complete"] is True
    seeds = [m["seed"] for m in EpisodeStore.open(out).meta]
    assert seeds == [0, RANDOM_SEED_OFFSET, RANDOM_SEED_OFFSET + 1]

    again = collect("pusht", out, resume=True, **settings)  # nothing left to do
    assert again["episodes"] == 3


def test_cli_collect(tmp_path: Path, capsys) -> None:
    out = tmp_path / "cli"
    code = main(["collect", "pusht", "--out", str(out), "--expert-episodes", "0", "--random-episodes", "2",
                 "--image-size", "32", "--random-length", "3", "--noisy-fraction", "0", "--quiet"])
    assert code == 0
    assert "2 episodes" in capsys.readouterr().out
    assert json.loads((out / "summary.json").read_text())["sources"]["random"]["episodes"] == 2


def test_plan_jobs_seeds_and_split() -> None:
    cfg = CollectConfig(env="pusht", out="x", expert_episodes=3, random_episodes=10, seed=5, noisy_fraction=0.3)
    jobs = plan_jobs(cfg)
    assert [j.seed for j in jobs[:3]] == [5, 6, 7] and all(j.source == "expert" for j in jobs[:3])
    assert [j.seed for j in jobs[3:]] == list(range(5 + RANDOM_SEED_OFFSET, 15 + RANDOM_SEED_OFFSET))
    assert sum(j.source == "noisy_expert" for j in jobs) == 3
    assert len({j.seed for j in jobs}) == len(jobs)
    assert Job("random", 1) == Job("random", 1)
    with pytest.raises(ValueError, match="noisy_fraction"):
        CollectConfig(env="pusht", out="x", noisy_fraction=1.5)


SPEC = EnvSpec(name="pusht", cameras=("top",), image_size=32, action_dim=2, proprio_dim=2, max_steps=300,
               action_low=(0.0, 0.0), action_high=(512.0, 512.0))


def test_random_actors_are_seeded_smooth_and_in_bounds() -> None:
    obs = {"proprio": np.array([256.0, 256.0], np.float32)}
    for make in (lambda rng: ou_actor(SPEC, rng, 0.1, 0.2), lambda rng: walk_actor(SPEC, rng, 0.04, 0.85, 0.3)):
        actor1, actor2 = make(np.random.default_rng(0)), make(np.random.default_rng(0))
        a = np.stack([actor1(obs) for _ in range(200)])
        b = np.stack([actor2(obs) for _ in range(200)])
        np.testing.assert_array_equal(a, b)
        assert a.dtype == np.float32 and (a >= 0).all() and (a <= 512).all()
        steps = np.linalg.norm(np.diff(a, axis=0), axis=1)
        assert steps.mean() < 0.7 * np.linalg.norm(a - a.mean(0), axis=1).mean()  # white noise: ~1.4x
        assert a.std(0).min() > 5.0  # but it does move
    walk = walk_actor(SPEC, np.random.default_rng(1), 0.04, 0.85, 0.3)
    targets = np.stack([walk(obs) for _ in range(300)])
    assert np.linalg.norm(targets - 256.0, axis=1).max() <= 0.3 * 256 + 1e-3  # stays near the agent


def test_render_ood_smoke(tmp_path: Path) -> None:
    from PIL import Image

    out = tmp_path / "ood.png"
    assert main(["render-ood", "pusht", "--out", str(out), "--seeds", "2", "--image-size", "32"]) == 0
    img = Image.open(out)
    assert img.size[0] > 2 * 32 and img.size[1] > 4 * 32
