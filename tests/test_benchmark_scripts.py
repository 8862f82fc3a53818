"""Scripts under benchmarks/ that measure trained runs: they must tell a good model from a bad one."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from dapolicy.data.store import Episode, EpisodeStore
from dapolicy.spec import EnvSpec

ROOT = Path(__file__).resolve().parents[1]
SPEC = EnvSpec(name="synthetic", cameras=("top",), image_size=16, action_dim=2, proprio_dim=2, max_steps=50,
               action_low=(-1.0, -1.0), action_high=(1.0, 1.0))
AGENT_PIXELS = 4  # a 2 x 2 blue square on white


def load_script(name: str, suite: str = "cpu"):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / suite / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def frames_with_agent(length: int, rng: np.random.Generator) -> np.ndarray:
    images = np.full((length, 16, 16, 3), 255, np.uint8)
    for t in range(length):
        y, x = rng.integers(0, 14, 2)
        images[t, y:y + 2, x:x + 2] = (40, 90, 230)  # PushT's agent blue
    return images


class VAEDouble:
    """encode/decode of the policy contract: `erase=True` paints the agent white, as PushT's base VAE does."""

    method = "dap"

    def __init__(self, erase: bool) -> None:
        self.erase = erase

    def encode_latents(self, images) -> torch.Tensor:
        return torch.as_tensor(np.asarray(images))

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        out = latents.clone()
        if self.erase:
            blue = (out[..., 2] > 200) & (out[..., 0] < 100)
            out[blue] = 255
        return out


@pytest.fixture()
def pusht_like_run(tmp_path):
    store = EpisodeStore.create(tmp_path / "data", SPEC)
    rng = np.random.default_rng(0)
    for i in range(10):
        store.append_episode(Episode(images={"top": frames_with_agent(12, rng)},
                                     proprio=rng.normal(size=(12, 2)).astype(np.float32),
                                     action=rng.uniform(-1, 1, (12, 2)).astype(np.float32),
                                     meta={"source": "expert", "seed": i, "success": True}))
    run = tmp_path / "run"
    (run / "model").mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"data": str(tmp_path / "data"), "config": "tiny"}))
    return run


@pytest.mark.parametrize("erase", [False, True])
def test_vae_agent_pixels_tells_a_vae_that_erases_the_agent(pusht_like_run, tmp_path, monkeypatch, erase):
    script = load_script("vae_agent_pixels")
    monkeypatch.setattr(script, "load_policy", lambda run, device: VAEDouble(erase))
    out = tmp_path / "agent.json"
    assert script.main([str(pusht_like_run), "--frames", "8", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["frames"] == 8 and result["frames_with_agent"] == 8
    assert result["agent_pixels_real_mean"] == AGENT_PIXELS
    if erase:
        assert result["agent_pixels_recon_mean"] == 0 and result["frames_agent_kept"] == 0
        assert result["mse_on_agent_pixels"] > 0.3
    else:
        assert result["agent_pixels_recon_mean"] == AGENT_PIXELS and result["frames_agent_kept"] == 8
        assert result["mse_on_agent_pixels"] == 0


def test_vae_agent_pixels_refuses_a_method_without_a_vae(pusht_like_run, monkeypatch):
    script = load_script("vae_agent_pixels")
    monkeypatch.setattr(script, "load_policy", lambda run, device: type("FM", (), {"method": "fm"})())
    with pytest.raises(SystemExit, match="has no image VAE"):
        script.main([str(pusht_like_run)])


def test_vae_agent_pixels_names_a_bad_argument(pusht_like_run, tmp_path, capsys):
    script = load_script("vae_agent_pixels")
    with pytest.raises(SystemExit):
        script.main([str(pusht_like_run), "--frames", "0"])
    assert "--frames must be at least 1" in capsys.readouterr().err
    with pytest.raises(SystemExit) as stop:
        script.main([str(tmp_path / "nowhere")])
    assert stop.value.code == 2 and "nowhere" in capsys.readouterr().err


def test_gated_vs_joint_latency_writes_the_three_variants_and_their_ratios(tmp_path, monkeypatch):
    script = load_script("gated_vs_joint", "latency")
    out = tmp_path / "latency.json"
    monkeypatch.setattr("sys.argv", ["gated_vs_joint.py", "--config", "tiny", "--steps", "2", "--reps", "2",
                                     "--out", str(out)])
    threads = torch.get_num_threads()
    try:
        script.main()
    finally:
        torch.set_num_threads(threads)
    row = json.loads(out.read_text())["by_batch"]["1"]
    for name in ("dap-gated", "dap-joint", "fm"):
        assert row[name]["n"] == 2 and 0 < row[name]["p50_ms"] <= row[name]["p90_ms"] + 1e-9
    assert row["ratio_gated_over_fm"] == pytest.approx(row["dap-gated"]["p50_ms"] / row["fm"]["p50_ms"])
