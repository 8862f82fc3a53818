"""Every registered method goes through the whole workflow: tiny train -> save -> load -> predict_chunk ->
one evaluation episode, and `dap info` lists it at every size."""

import json

import numpy as np
import pytest
import torch
from conftest import SquareEnv

from dapolicy.cli import main as cli_main
from dapolicy.evaluate import evaluate
from dapolicy.overrides import OverrideError
from dapolicy.policies import SIZES, ChunkPrediction, get_method, load_pretrained, make_config, method_names
from dapolicy.train import train

FAST = dict(config="tiny", steps=2, threads=1, progress=False, batch_size=4, device="cpu")


@pytest.mark.parametrize("method", method_names())
def test_every_method_trains_saves_loads_predicts_and_evaluates(method, square_store, tmp_path):
    run = train(square_store, tmp_path / method, method=method, **FAST)
    stored = json.loads((run / "config.json").read_text())
    assert stored["method"] == method and stored["stages"] == list(load_pretrained(run).stage_names)
    policy = load_pretrained(run)
    assert type(policy) is get_method(method).policy_class and policy.method == method
    obs = {"images": np.zeros((3, policy.n_obs_steps, 1, 32, 32, 3), np.uint8),
           "proprio": np.zeros((3, policy.n_obs_steps, 2), np.float32)}
    pred = policy.predict_chunk(obs, return_next=True)
    assert isinstance(pred, ChunkPrediction) and pred.actions.shape == (3, policy.horizon, 2)
    assert (pred.next_frames is not None) == policy.capabilities.predicts_next_obs
    result = evaluate(run, episodes=1, videos=0, max_steps=4, progress=False, env_factory=lambda *a, **k: SquareEnv())
    assert result["n_episodes"] == 1 and result["method"] == method


def test_info_lists_every_method_at_every_size(capsys):
    assert cli_main(["info"]) == 0
    out = capsys.readouterr().out
    for method in method_names():
        assert f"\n{method}" in out
    assert out.count("trainable parameters") == len(method_names()) * len(SIZES)


def test_set_reaches_any_field_and_names_the_closest_on_a_typo():
    cfg = make_config("dap", "tiny", ["flow.steps=3", "next_obs_mix.null=1", "next_obs_mix.dynamics=0",
                                      "next_obs_mix.ground_truth=0", "dynamics_sources=[\"expert\"]"])
    assert cfg.flow.steps == 3 and cfg.next_obs_mix.null == 1.0 and cfg.dynamics_sources == ("expert",)
    with pytest.raises(OverrideError, match="did you mean flow.steps"):
        make_config("dap", "tiny", ["flow.step=3"])
    with pytest.raises(OverrideError, match="next_obs_mix is a group"):
        make_config("dap", "tiny", ["next_obs_mix=3"])
    with pytest.raises(OverrideError, match="integer"):
        make_config("dap", "tiny", ["horizon=3.5"])
    with pytest.raises(ValueError, match="sum to 1"):
        make_config("dap", "tiny", ["next_obs_mix.null=0.5"])
    with pytest.raises(ValueError, match="unknown method 'dpc'; did you mean"):
        get_method("dpc")


def test_config_file_then_set(tmp_path):
    (tmp_path / "c.toml").write_text("horizon = 8\n[flow]\nsteps = 2\n")
    (tmp_path / "c.json").write_text(json.dumps({"flow": {"steps": 7}}))
    cfg = make_config("fm", "tiny", ["flow.steps=5"], config_file=tmp_path / "c.toml")
    assert cfg.horizon == 8 and cfg.flow.steps == 5
    assert make_config("fm", "tiny", config_file=tmp_path / "c.json").flow.steps == 7
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(OverrideError, match="not valid JSON"):
        make_config("fm", "tiny", config_file=tmp_path / "bad.json")


def test_set_from_the_cli_is_stored_and_an_existing_run_refuses_a_changed_config(square_store, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "--data", str(square_store), "--out", str(out), "--config", "tiny", "--steps", "1",
            "--no-progress", "--threads", "1", "--device", "cpu", "--set", "flow.steps=3"]
    assert cli_main(args) == 0
    assert load_pretrained(out).config.flow.steps == 3
    code = cli_main(["train", "--data", str(square_store), "--out", str(out), "--stage", "policy", "--no-progress",
                     "--set", "flow.steps=5"])
    assert code == 2 and "--init-from" in capsys.readouterr().err
    code = cli_main(["train", "--data", str(square_store), "--out", str(tmp_path / "x"), "--set", "flow.stepz=5",
                     "--no-progress"])
    assert code == 2 and "did you mean flow.steps" in capsys.readouterr().err


def test_init_from_copies_earlier_stages_and_trains_only_the_rest(square_store, tmp_path):
    base = train(square_store, tmp_path / "base", seed=1, **FAST)
    ablation = train(square_store, tmp_path / "gt", init_from=base, seed=2,
                     overrides=["next_obs_mix.ground_truth=1", "next_obs_mix.dynamics=0", "next_obs_mix.null=0"],
                     **FAST)
    a, b = load_pretrained(base), load_pretrained(ablation)
    for stage in ("vae", "dynamics"):
        for (k, va), vb in zip(a.stage_module(stage).state_dict().items(), b.stage_module(stage).state_dict().values()):
            assert torch.equal(va, vb), f"{stage}.{k} was not copied"
    assert not all(torch.equal(x, y) for x, y in zip(a.policy_net.parameters(), b.policy_net.parameters()))
    assert b.config.next_obs_mix.ground_truth == 1.0
    state = json.loads((ablation / "state.json").read_text())
    assert state["stages_done"] == ["vae", "dynamics", "policy"] and state["init_from"] == str(base / "model")
    stages_trained = {r["stage"] for r in map(json.loads, (ablation / "metrics.jsonl").read_text().splitlines())
                      if r["kind"] == "train"}
    assert stages_trained == {"policy"}
    # FM from a DAP run reuses its VAE
    fm = train(square_store, tmp_path / "fm", method="fm", init_from=base, **FAST)
    assert torch.equal(load_pretrained(fm).vae.latent_scale, a.vae.latent_scale)
