"""`dap eval`: the closed-loop evaluator, driven by a test double that implements the policy contract.

The double acts with the env's scripted expert (plus seeded noise, so reproducibility is a real check) and
"predicts" the next frame as the current one. This tests the evaluator loop, not a learned policy; the true
train -> save -> eval smoke test lives with the policy tests.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from dapolicy import evaluate as ev
from dapolicy.envs.base import StepResult, make_env
from dapolicy.policies.base import Capabilities, ChunkPrediction
from dapolicy.policies.coupling import COUPLING_MODES
from dapolicy.spec import EnvSpec

SIZE = 32


# ----------------------------------------------------------------------------------------------- doubles
class ExpertDouble:
    """Implements what the evaluator uses of the policy contract: config, spec, stages, predict_chunk."""

    def __init__(self, spec: EnvSpec, n_obs: int = 2, horizon: int = 4, n_action: int = 2,
                 dynamics: bool = True, noise: float = 0.01) -> None:
        self.spec = spec
        self.config = SimpleNamespace(n_obs_steps=n_obs, horizon=horizon, n_action_steps=n_action,
                                      next_offset=n_action, uses_dynamics=dynamics, coupling="jacobi",
                                      flow=SimpleNamespace(steps=3), method="double")
        self.method = "double"
        self.capabilities = Capabilities(predicts_next_obs=dynamics, has_trace=False,
                                         modes=COUPLING_MODES if dynamics else ())
        self.n_obs_steps, self.horizon, self.n_action_steps, self.next_obs_offset = n_obs, horizon, n_action, n_action
        self.noise = noise
        self.env = None  # set by the env factory
        self.calls: list[dict] = []

    def predict_chunk(self, obs, return_next=False, mode=None, steps=None, return_trace=False):
        images, proprio = np.asarray(obs["images"]), np.asarray(obs["proprio"])
        c, s = len(self.spec.cameras), self.spec.image_size
        assert images.shape == (1, self.config.n_obs_steps, c, s, s, 3) and images.dtype == np.uint8
        assert proprio.shape == (1, self.config.n_obs_steps, self.spec.proprio_dim)
        self.calls.append({"mode": mode, "steps": steps, "return_next": return_next, "images": images.copy()})
        a = np.asarray(self.env.expert_action(), np.float32)
        chunk = np.repeat(a[None, None], self.config.horizon, axis=1)
        chunk = chunk + self.noise * torch.randn(chunk.shape).numpy()
        return ChunkPrediction(chunk.astype(np.float32), images[:, -1] if return_next else None)


def double_factory(policy, seen: list | None = None):
    """make_env wrapper that hands the built env to the double (it needs the expert)."""
    def factory(name, **kwargs):
        env = make_env(name, **kwargs)
        policy.env = env
        if seen is not None:
            seen.append((name, kwargs))
        return env
    return factory


class LineEnv:
    """A tiny numpy env: a point on a line must reach the goal; images encode the position."""

    def __init__(self, goal: float = 5.0, max_steps: int = 30, ood=None) -> None:
        self.spec = EnvSpec(name="line", cameras=("a", "b"), image_size=8, action_dim=1, proprio_dim=1,
                            max_steps=max_steps, action_low=(-1.0,), action_high=(1.0,))
        self.goal, self.ood, self.x, self.closed = goal, ood, 0.0, False

    def _obs(self):
        v = np.uint8(min(255, int(self.x * 20)))
        return {"images": {"a": np.full((8, 8, 3), v, np.uint8), "b": np.full((8, 8, 3), 255 - v, np.uint8)},
                "proprio": np.array([self.x], np.float32)}

    def reset(self, seed: int):
        self.x = float(np.random.default_rng(seed).uniform(0, 1))
        return self._obs()

    def step(self, action):
        self.x += float(np.clip(action[0], -1, 1))
        success = abs(self.x - self.goal) < 0.5
        return self._obs(), StepResult(success=success, score=min(1.0, self.x / self.goal), done=False)

    def expert_action(self):
        return np.array([np.clip(self.goal - self.x, -1, 1)], np.float32)

    def close(self):
        self.closed = True


def line_setup(**double_kwargs):
    envs: list[LineEnv] = []
    policy = ExpertDouble(LineEnv().spec, noise=0.0, **double_kwargs)

    def factory(name, image_size, cameras, ood):
        env = LineEnv(ood=ood)
        policy.env = env
        envs.append(env)
        return env
    return policy, factory, envs


# ----------------------------------------------------------------------------------------------- real env
def _real_env_name() -> str:
    if importlib.util.find_spec("dapolicy.envs.pusht") and importlib.util.find_spec("gym_pusht"):
        return "pusht"
    pytest.importorskip("metaworld")
    return "metaworld/button-press-v3"


@pytest.fixture(scope="module")
def real_spec() -> EnvSpec:
    env = make_env(_real_env_name(), image_size=SIZE)
    spec = env.spec
    env.close()
    return spec


def _image_hash(calls) -> str:
    h = hashlib.sha256()
    for c in calls:
        h.update(c["images"].tobytes())
    return h.hexdigest()


def test_evaluate_real_env_json_videos_and_reproducibility(tmp_path, real_spec):
    runs = []
    for out in ("a", "b"):
        policy = ExpertDouble(real_spec)
        res = ev.evaluate(tmp_path / "run", episodes=2, seed=7, videos=1, max_steps=6, out_dir=tmp_path / out,
                          policy=policy, env_factory=double_factory(policy), progress=False)
        runs.append((res, policy))
    res, policy = runs[0]
    saved = json.loads((tmp_path / "a" / "none.json").read_text())
    for key in ("success_rate", "ci95", "n_episodes", "mean_score", "episodes", "latency_ms", "settings"):
        assert key in saved
    assert saved["n_episodes"] == 2 and saved["name"] == "none" and saved["env"] == real_spec.name
    lo, hi = saved["ci95"]
    assert 0.0 <= lo <= saved["success_rate"] <= hi <= 1.0
    assert [e["seed"] for e in saved["episodes"]] == [7, 8]
    assert all(1 <= e["steps"] <= 6 and 0.0 <= e["score"] <= 1.0 for e in saved["episodes"])
    assert saved["latency_ms"]["p50"] > 0 and saved["latency_ms"]["p90"] >= saved["latency_ms"]["p50"]
    assert saved["settings"]["max_steps"] == 6 and saved["settings"]["n_action_steps"] == 2
    # Same seeds -> the same observations reach the policy, and the same per-episode results.
    assert runs[0][0]["episodes"] == runs[1][0]["episodes"]
    assert _image_hash(runs[0][1].calls) == _image_hash(runs[1][1].calls)
    # One video (first episode), two rows: real cameras and the predicted frames.
    assert len(saved["videos"]) == 1
    with Image.open(saved["videos"][0]) as gif:
        assert gif.n_frames >= 2
        w, h = gif.size
    n_cams = len(real_spec.cameras)
    assert h > 2 * 192 and w >= n_cams * 192


def test_ood_option_reaches_the_env(tmp_path, real_spec):
    seen: list = []
    first_obs = {}
    for kind in ("none", "novel-object"):
        policy = ExpertDouble(real_spec)
        res = ev.evaluate(tmp_path, episodes=1, ood=kind, videos=0, max_steps=1, out_dir=tmp_path,
                          policy=policy, env_factory=double_factory(policy, seen), progress=False)
        first_obs[kind] = policy.calls[-1]["images"]
        assert res["ood"] == kind.replace("-", "_")
    assert [kw["ood"].kind for _, kw in seen] == ["none", "novel_object"]
    assert all(kw["image_size"] == SIZE and name == real_spec.name for name, kw in seen)
    assert (tmp_path / "novel_object.json").is_file()
    # Same seed, same physics, different pixels.
    assert not np.array_equal(first_obs["none"], first_obs["novel-object"])


# ----------------------------------------------------------------------------------------------- loop logic
def test_receding_horizon_semantics():
    policy, factory, _ = line_setup(n_obs=3, horizon=5, n_action=3)
    env = factory("line", image_size=8, cameras=("a", "b"), ood=None)
    ctl = ev.RecedingHorizonController(policy, env.spec, mode="gauss_seidel", steps=5)
    obs = env.reset(0)
    for _ in range(7):
        obs, _ = env.step(ctl.act(obs))
    assert len(policy.calls) == 3  # re-plans at steps 0, 3, 6
    first = policy.calls[0]["images"][0]
    assert all(np.array_equal(first[0], first[i]) for i in range(3))  # history padded with the first frame
    second = policy.calls[1]["images"][0]
    assert not np.array_equal(second[-1], second[-2])  # then a sliding window of real frames
    assert {(c["mode"], c["steps"]) for c in policy.calls} == {("gauss_seidel", 5)}
    assert len(ctl.latencies) == 3
    ctl.reset()
    env.reset(1)
    ctl.act(env.reset(1))
    assert len(policy.calls) == 4  # reset empties the queue


def test_success_stops_episode_and_names(tmp_path):
    policy, factory, envs = line_setup()
    res = ev.evaluate(tmp_path, episodes=3, seed=0, videos=2, mode="predict_then_act", flow_steps=2,
                      out_dir=tmp_path, policy=policy, env_factory=factory, progress=False)
    assert res["name"] == "none_predict_then_act_k2"
    assert (tmp_path / "none_predict_then_act_k2.json").is_file()
    assert res["success_rate"] == 1.0 and res["ci95"][1] == 1.0
    assert all(e["success"] and e["steps"] <= 7 for e in res["episodes"])
    assert res["mean_score"] == pytest.approx(np.mean([e["score"] for e in res["episodes"]]))
    assert len(res["videos"]) == 2 and all(envs_i.closed for envs_i in envs)
    # Chunks that decoded frames for the videos are left out of the latency (the third episode has none).
    assert res["latency_includes_decode"] is False
    assert res["latency_ms"]["n"] == sum(not c["return_next"] for c in policy.calls[1:])


def test_no_dynamics_policy_videos_have_one_row(tmp_path):
    policy, factory, _ = line_setup(dynamics=False)
    res = ev.evaluate(tmp_path, episodes=1, videos=1, max_steps=3, out_dir=tmp_path, policy=policy,
                      env_factory=factory, progress=False)
    assert not any(c["return_next"] for c in policy.calls)
    with Image.open(res["videos"][0]) as gif:
        assert gif.size[1] < 2 * 192
    assert res["latency_includes_decode"] is False


def test_ood_all_writes_summary(tmp_path):
    policy, factory, envs = line_setup()
    res = ev.evaluate(tmp_path, episodes=2, ood="all", videos=0, out_dir=tmp_path, policy=policy,
                      env_factory=factory, progress=False)
    assert list(res["suites"]) == ["none", "light", "distractor", "novel_object"]
    assert [e.ood.kind for e in envs] == ["none", "light", "distractor", "novel_object"]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [r["ood"] for r in summary["rows"]] == list(res["suites"])
    assert "novel_object" in (tmp_path / "summary.md").read_text()
    # Every suite used the same seeds.
    assert {tuple(e["seed"] for e in r["episodes"]) for r in res["suites"].values()} == {(100000, 100001)}


def test_bad_arguments(tmp_path):
    policy, factory, _ = line_setup()
    with pytest.raises(ValueError, match="OOD"):
        ev.evaluate(tmp_path, episodes=1, ood="fog", policy=policy, env_factory=factory)
    with pytest.raises(ValueError, match="mode"):
        ev.evaluate(tmp_path, episodes=1, mode="newton", policy=policy, env_factory=factory)
    with pytest.raises(FileNotFoundError, match="no saved model"):
        ev.resolve_model_dir(tmp_path)
    wrong = ExpertDouble(EnvSpec("line", ("a", "b"), 8, action_dim=3, proprio_dim=1, max_steps=5))
    with pytest.raises(ValueError, match="action_dim"):
        ev.evaluate(tmp_path, episodes=1, policy=wrong, env_factory=factory)


def test_cli(tmp_path, monkeypatch, capsys):
    from dapolicy.cli import main

    policy, factory, _ = line_setup()
    run = tmp_path / "run"
    (run / "model").mkdir(parents=True)
    monkeypatch.setattr(ev, "load_policy", lambda path, device=None: policy)
    monkeypatch.setattr(ev, "make_env", factory)
    assert main(["eval", str(run), "--episodes", "2", "--videos", "0", "--max-steps", "4", "--ood",
                 "light"]) == 0
    assert (run / "eval" / "light.json").is_file()
    assert "light" in capsys.readouterr().out


def test_untrained_tiny_dap_policy_from_run_folder(tmp_path, real_spec):
    """The real DAPPolicy through `from_pretrained`: loading, predicted frames in the video, modes."""
    from dapolicy.policies import make_policy

    torch.manual_seed(0)
    make_policy("dap", real_spec, size="tiny").save_pretrained(tmp_path / "run" / "model")
    res = ev.evaluate(tmp_path / "run", episodes=2, videos=1, max_steps=5, progress=False)
    assert (tmp_path / "run" / "eval" / "none.json").is_file() and res["method"] == "dap"
    assert res["settings"]["model_dir"] == str(tmp_path / "run" / "model")
    assert res["latency_ms"]["n"] >= 1 and not res["latency_includes_decode"]
    with Image.open(res["videos"][0]) as gif:
        assert gif.size[1] > 2 * 192  # second row: the predicted next frame
    off = ev.evaluate(tmp_path / "run" / "model", episodes=1, videos=1, max_steps=3, mode="off", flow_steps=2,
                      progress=False)
    assert off["name"] == "none_off_k2" and (tmp_path / "run" / "eval" / "none_off_k2.json").is_file()
    with Image.open(off["videos"][0]) as gif:
        assert gif.size[1] < 2 * 192  # no prediction without the dynamics model


def test_video_helpers(tmp_path):
    from dapolicy import video

    real = [np.zeros((8, 8, 3), np.uint8), np.full((8, 8, 3), 255, np.uint8)]
    one_row = video.compose_frame(real, size=64)
    two_rows = video.compose_frame(real, [real[1], real[0]], size=64)
    assert one_row.shape[1] == two_rows.shape[1] == 2 * 64 + 2 and two_rows.shape[0] > 2 * 64
    assert video.upscale(real[0], 64).shape == (64, 64, 3)
    path = video.write_video([one_row] * 3, tmp_path / "v.mp4")
    assert path.exists() and path.suffix == (".mp4" if video.has_ffmpeg() else ".gif")
    with pytest.raises(ValueError):
        video.write_video([], tmp_path / "empty.gif")


def test_workers_give_the_records_of_one_process(tmp_path, real_spec):
    """Episodes in 2 spawned processes: the same per-episode results (seeded by episode), videos and chunk count."""
    from dapolicy.policies import make_policy

    torch.manual_seed(0)
    make_policy("dap", real_spec, size="tiny").save_pretrained(tmp_path / "run" / "model")
    common = dict(episodes=3, videos=1, max_steps=12, threads=1, progress=False)
    one = ev.evaluate(tmp_path / "run", out_dir=tmp_path / "one", **common)
    two = ev.evaluate(tmp_path / "run", out_dir=tmp_path / "two", workers=2, **common)
    fields = ("episode", "seed", "success", "steps", "score")
    assert [[r[f] for f in fields] for r in two["episodes"]] == [[r[f] for f in fields] for r in one["episodes"]]
    assert two["latency_ms"]["n"] == one["latency_ms"]["n"] and two["settings"]["workers"] == 2
    assert [p.split("/")[-1] for p in two["videos"]] == [p.split("/")[-1] for p in one["videos"]]
    assert all((tmp_path / "two" / "videos" / p.split("/")[-1]).is_file() for p in two["videos"])


def test_workers_argument_is_checked(tmp_path):
    policy, factory, _ = line_setup()
    with pytest.raises(ValueError, match="workers must be >= 1"):
        ev.evaluate(tmp_path, episodes=1, workers=0, policy=policy, env_factory=factory)
    with pytest.raises(ValueError, match="pass run_dir, not policy"):
        ev.evaluate(tmp_path, episodes=1, workers=2, policy=policy, env_factory=factory)


def test_max_steps_above_the_tasks_episode_limit_is_refused(tmp_path):
    """The env ends every episode at its own limit: a longer --max-steps would be recorded but never run."""
    policy, factory, envs = line_setup()
    with pytest.raises(ValueError, match="above line's episode limit"):
        ev.evaluate(tmp_path, episodes=1, videos=0, max_steps=31, out_dir=tmp_path, policy=policy,
                    env_factory=factory, progress=False, name="x")
    assert envs and envs[0].closed and not (tmp_path / "x.json").exists()
