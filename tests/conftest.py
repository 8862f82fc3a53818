"""Test-wide settings: headless rendering, deterministic torch, small thread count."""

import os

os.environ.setdefault("MUJOCO_GL", "egl")
os.environ.setdefault("SDL_VIDEODRIVER", "dummy")

import torch  # noqa: E402

torch.set_num_threads(int(os.environ.get("DAP_TEST_THREADS", "1")))
torch.set_flush_denormal(True)


# --------------------------------------------------------------------------------------------------------------
# A task that needs its camera: a square at position s in a 32-px image must be moved to the centre. The proprio
# is a constant, so a policy that ignores the image cannot know where to go.
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from dapolicy.envs.base import StepResult  # noqa: E402
from dapolicy.spec import EnvSpec  # noqa: E402

SQUARE_SPEC = EnvSpec(name="square", cameras=("top",), image_size=32, action_dim=2, proprio_dim=2, max_steps=24,
                      action_low=(-0.1, -0.1), action_high=(0.1, 0.1))
SQUARE_CENTER = np.array([0.5, 0.5], dtype=np.float32)


def render_square(pos: np.ndarray) -> np.ndarray:
    """uint8 [N, 32, 32, 3]: a 6-px orange square at each (x, y) in [0, 1]^2 on black."""
    img = np.zeros((len(pos), 32, 32, 3), np.uint8)
    for i, (x, y) in enumerate(np.clip(pos, 0, 1)):
        cx, cy = int(4 + x * 24), int(4 + y * 24)
        img[i, cy - 3:cy + 3, cx - 3:cx + 3] = (255, 200, 80)
    return img


def square_expert(pos: np.ndarray) -> np.ndarray:
    """The demonstrated action: a fifth of the way to the centre, clipped to the action range."""
    return np.clip((SQUARE_CENTER - pos) / 5.0, -0.1, 0.1).astype(np.float32)


def square_windows(n: int, seed: int, horizon: int = 16, n_obs: int = 2, offset: int = 8) -> dict:
    """n training windows of the square task in the sampler's layout (torch tensors): T_o frames of one camera,
    an H-step expert chunk, the frame k steps later; proprio is constant (zeros)."""
    import torch

    rng = np.random.default_rng(seed)
    s = rng.uniform(0.05, 0.95, size=(n, 2)).astype(np.float32)
    pos, chunk = s.copy(), []
    for _ in range(horizon):
        a = square_expert(pos)
        chunk.append(a)
        pos = pos + a
    action = np.stack(chunk, axis=1)
    nxt = s + action[:, :offset].sum(1)
    return {
        "images": torch.as_tensor(render_square(s)[:, None, None].repeat(n_obs, axis=1)),  # [N, T_o, C=1, S, S, 3]
        "next_images": torch.as_tensor(render_square(nxt)[:, None]),
        "proprio": torch.zeros(n, n_obs, 2),
        "action": torch.as_tensor(action),
        "action_is_pad": torch.zeros(n, horizon, dtype=torch.bool),
    }


class SquareEnv:
    """The square task as an `Env`: success when the square is within 0.06 of the centre."""

    spec = SQUARE_SPEC

    def __init__(self, *args, **kwargs) -> None:
        self.pos = SQUARE_CENTER.copy()

    def _obs(self) -> dict:
        return {"images": {"top": render_square(self.pos[None])[0]}, "proprio": np.zeros(2, np.float32)}

    def reset(self, seed: int) -> dict:
        self.pos = np.random.default_rng(seed).uniform(0.05, 0.95, 2).astype(np.float32)
        self.steps = 0
        return self._obs()

    def step(self, action: np.ndarray):
        self.pos = np.clip(self.pos + np.clip(np.asarray(action, np.float32), -0.1, 0.1), 0, 1)
        self.steps += 1
        success = bool(np.abs(self.pos - SQUARE_CENTER).max() < 0.06)
        return self._obs(), StepResult(success, float(success), self.steps >= self.spec.max_steps)

    def expert_action(self) -> np.ndarray:
        return square_expert(self.pos)

    def close(self) -> None:
        pass


def make_square_store(path, expert: int = 6, random: int = 2, seed: int = 0):
    """An episode store of the square task: expert episodes to success, and random-action episodes."""
    from dapolicy.data.store import Episode, EpisodeStore

    store = EpisodeStore.create(path, SQUARE_SPEC)
    rng = np.random.default_rng(seed)
    for i in range(expert + random):
        env, source = SquareEnv(), "expert" if i < expert else "random"
        obs, frames, actions, success = env.reset(seed + i), [], [], False
        for _ in range(SQUARE_SPEC.max_steps):
            a = env.expert_action() if source == "expert" else rng.uniform(-0.1, 0.1, 2).astype(np.float32)
            frames.append(obs)
            actions.append(a)
            obs, result = env.step(a)
            success = success or result.success
            if source == "expert" and success:
                break
        store.append_episode(Episode(images={"top": np.stack([f["images"]["top"] for f in frames])},
                                     proprio=np.stack([f["proprio"] for f in frames]), action=np.stack(actions),
                                     meta={"source": source, "seed": seed + i, "success": success}))
    return path


@pytest.fixture(scope="session")
def square_store(tmp_path_factory):
    return make_square_store(tmp_path_factory.mktemp("square") / "data")


@pytest.fixture(scope="session")
def smoke(tmp_path_factory):
    """The `smoke` benchmark suite run once (collect, train with init_from, evaluate): (suite folder, work)."""
    import shutil
    from pathlib import Path

    from dapolicy.cli import main as cli_main

    folder = tmp_path_factory.mktemp("bench") / "smoke"
    folder.mkdir()
    shutil.copy(Path(__file__).resolve().parents[1] / "benchmarks" / "smoke" / "suite.toml", folder / "suite.toml")
    work = folder.parent / "work"
    assert cli_main(["benchmark", str(folder / "suite.toml"), "--work", str(work), "--quiet", "--threads", "1"]) == 0
    return folder, work


def copy_with_edited_cell(folder, dest, cell_name: str, edit) -> tuple:
    """A copy of a suite folder with one test cell's record changed by `edit(record)`: (copy, edited record)."""
    import json
    import shutil

    shutil.copytree(folder, dest)
    path = dest / "cells" / "test" / cell_name
    record = json.loads(path.read_text())
    edit(record)
    path.write_text(json.dumps(record))
    return dest, record

