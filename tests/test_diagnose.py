"""`dap diagnose` (Fig. 2): validation split, per-tau curves, plots, on a synthetic store and a test double.

The double's "latents" are the current frame as float CHW, and its trace moves Z_hat(tau) from grey to that
frame, so PSNR vs the final prediction must rise to the cap and the action MSE vs the final chunk must reach
0 at the last step (the last extrapolation equals the final Euler update).
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from dapolicy import diagnose as dg
from dapolicy.data.store import Episode, EpisodeStore
from dapolicy.policies.base import Capabilities, ChunkPrediction
from dapolicy.policies.coupling import COUPLING_MODES
from dapolicy.policies.normalizer import MinMaxNormalizer
from dapolicy.spec import EnvSpec

SPEC = EnvSpec(name="synthetic", cameras=("front", "wrist"), image_size=16, action_dim=2, proprio_dim=3,
               max_steps=50, action_low=(-1.0, -1.0), action_high=(1.0, 1.0))


class TraceDouble:
    """The parts of the policy contract `diagnose` uses: config, spec, stages, predict_chunk(return_trace),
    decode_latents, action_normalizer."""

    def __init__(self, dynamics: bool = True) -> None:
        self.spec = SPEC
        self.config = SimpleNamespace(n_obs_steps=2, horizon=4, n_action_steps=2, next_offset=2,
                                      uses_dynamics=dynamics, coupling="jacobi" if dynamics else "off",
                                      flow=SimpleNamespace(steps=4))
        self.method = "double"
        self.capabilities = Capabilities(predicts_next_obs=dynamics, has_trace=True,
                                         modes=COUPLING_MODES if dynamics else ())
        self.n_obs_steps, self.horizon, self.n_action_steps, self.next_obs_offset = 2, 4, 2, 2
        self.action_normalizer = MinMaxNormalizer(SPEC.action_dim).fit(np.array([[-2.0, 0.0], [2.0, 10.0]]))
        self.calls: list[dict] = []

    @staticmethod
    def decode_latents(latents: torch.Tensor) -> torch.Tensor:
        return (latents.clamp(0, 1) * 255).round().to(torch.uint8).movedim(-3, -1)

    def predict_chunk(self, obs, return_next=False, mode=None, steps=None, return_trace=False):
        images = torch.as_tensor(np.asarray(obs["images"]))
        b = images.shape[0]
        k = steps or self.config.flow.steps
        self.calls.append({"mode": mode, "steps": steps, "batch": b})
        z1 = images[:, -1].movedim(-1, -3).float() / 255.0  # [B, C, 3, S, S]
        taus = [i / k for i in range(k)]
        weights = [(i + 1) / k for i in range(k)]  # the estimate reaches the final sample at the last step
        z_hat = torch.stack([w * z1 + (1 - w) * 0.5 for w in weights])
        a1 = torch.full((b, self.config.horizon, SPEC.action_dim), 0.25)
        a_hat = torch.stack([w * a1 for w in weights])
        actions = self.action_normalizer.unnormalize(a_hat[-1]).numpy()
        dyn = self.config.uses_dynamics
        return ChunkPrediction(actions, self.decode_latents(z_hat[-1]).numpy() if return_next and dyn else None,
                               {"tau": taus, "z_hat": z_hat if dyn else None, "a_hat": a_hat} if return_trace else None)


def make_store(path, n_expert: int = 10, n_random: int = 3, length: int = 12):
    store = EpisodeStore.create(path, SPEC)
    rng = np.random.default_rng(0)
    for i in range(n_expert + n_random):
        source = "expert" if i % 4 != 3 else "random"  # interleave so "last 10% of experts" is not trivially the tail
        images = {c: rng.integers(0, 256, (length, 16, 16, 3), dtype=np.uint8) for c in SPEC.cameras}
        store.append_episode(Episode(images=images, proprio=rng.normal(size=(length, 3)).astype(np.float32),
                                     action=rng.uniform(-2, 2, (length, 2)).astype(np.float32),
                                     meta={"source": source, "seed": i, "success": True}))
    return store


@pytest.fixture()
def run_dir(tmp_path):
    store = make_store(tmp_path / "data")
    run = tmp_path / "run"
    (run / "model").mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"data": str(tmp_path / "data"), "config": "tiny"}))
    return run, store


def test_validation_split_defaults_to_last_experts(run_dir):
    run, store = run_dir
    data, ids, _ = dg.validation_episodes(run)
    experts = store.select(sources=("expert",), success_only=True)
    assert ids == experts[-1:] and data.num_episodes == 1  # 10% of 10 experts
    cfg = json.loads((run / "config.json").read_text())
    cfg["val_episodes"] = experts[:3]
    (run / "config.json").write_text(json.dumps(cfg))
    _, ids, _ = dg.validation_episodes(run)
    assert ids == experts[:3]
    _, ids, _ = dg.validation_episodes(run, max_episodes=2)
    assert ids == experts[:2]


def test_validation_split_matches_the_trainer(run_dir):
    """A `dap train` run records train.val_fraction: diagnose must hold out exactly the trainer's episodes."""
    from dapolicy.training.batches import split_episodes

    run, store = run_dir
    cfg = json.loads((run / "config.json").read_text())
    cfg["train"] = {"val_fraction": 0.3}
    (run / "config.json").write_text(json.dumps(cfg))
    experts = np.asarray(store.select(sources=("expert",), success_only=True))
    _, expected = split_episodes(store.meta, experts, 0.3)
    _, ids, _ = dg.validation_episodes(run)
    assert ids == expected.tolist() and len(ids) == 3


def test_diagnose_curves_and_files(run_dir):
    run, _ = run_dir
    policy = TraceDouble()
    res = dg.diagnose(run, windows=10, batch_size=4, policy=policy, progress=False, flow_steps=5)
    out = run / "diagnose"
    saved = json.loads((out / "diagnose.json").read_text())
    assert saved["tau"] == pytest.approx([0.0, 0.2, 0.4, 0.6, 0.8]) and saved["n_windows"] == 10
    assert {c["batch"] for c in policy.calls} == {4, 2} and {c["steps"] for c in policy.calls} == {5}
    for cam in SPEC.cameras:
        curve = np.array(saved["psnr_vs_final"][cam])
        assert np.all(np.diff(curve) > 0) and curve[-1] == dg.PSNR_CAP_DB
        assert len(saved["psnr_vs_real"][cam]) == 5
        assert saved["final_psnr_vs_real"][cam] == pytest.approx(saved["psnr_vs_real"][cam][-1])
    mse_final = np.array(saved["action_mse_vs_final"])
    assert mse_final[-1] == 0.0 and np.all(np.diff(mse_final) < 0)
    assert saved["final_action_mse_vs_demo"] == pytest.approx(saved["action_mse_vs_demo"][-1])
    assert (out / "diagnose.png").stat().st_size > 0 and (out / "strip.png").stat().st_size > 0
    assert res["val_episodes"] == saved["val_episodes"]


def test_demo_actions_are_normalised(run_dir):
    """MSE vs the demonstration is in the policy's [-1, 1] units: check one window by hand."""
    run, _ = run_dir
    policy = TraceDouble()
    res = dg.diagnose(run, windows=1, policy=policy, progress=False, out_dir=run / "d1")
    data, _, _ = dg.validation_episodes(run)
    t = int(dg.choose_windows(data.num_frames, 1, 0)[0])  # the window diagnose chose (seed 0)
    end = int(data.episode_ends[0])
    steps = [min(t + h, end - 1) for h in range(4)]
    valid = np.array([t + h < end for h in range(4)])
    demo = policy.action_normalizer.normalize(torch.as_tensor(data.action[steps])).numpy()
    err = ((0.25 - demo) ** 2).mean(axis=-1)
    assert res["final_action_mse_vs_demo"] == pytest.approx(err[valid].mean(), rel=1e-5)


def test_no_dynamics_policy_has_only_action_curves(run_dir):
    run, _ = run_dir
    res = dg.diagnose(run, windows=3, policy=TraceDouble(dynamics=False), progress=False)
    assert "psnr_vs_real" not in res and len(res["action_mse_vs_demo"]) == 4
    assert (run / "diagnose" / "diagnose.png").is_file() and "strip" not in res


def test_missing_data_path_is_a_clear_error(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="--data"):
        dg.validation_episodes(tmp_path)


def test_cli(run_dir, monkeypatch, capsys):
    from dapolicy.cli import main

    run, _ = run_dir
    monkeypatch.setattr(dg, "load_policy", lambda path, device=None: TraceDouble())
    assert main(["diagnose", str(run), "--windows", "4", "--out", str(run / "cli")]) == 0
    assert (run / "cli" / "diagnose.json").is_file()
    assert "PSNR" in capsys.readouterr().out


def test_untrained_tiny_dap_policy(run_dir):
    """The real DAPPolicy: trace layout, latent decoding and the normaliser as the contract gives them."""
    from dapolicy.policies import make_config, make_policy

    run, _ = run_dir
    torch.manual_seed(0)
    make_policy("dap", SPEC, size="tiny").save_pretrained(run / "model")
    res = dg.diagnose(run / "model", windows=3, progress=False)  # a model folder inside a run also works
    k = make_config("dap", "tiny").flow.steps
    assert len(res["tau"]) == k and set(res["psnr_vs_real"]) == set(SPEC.cameras)
    assert res["action_mse_vs_final"][-1] == pytest.approx(0.0, abs=1e-10)
    assert all(v == dg.PSNR_CAP_DB for v in (c[-1] for c in res["psnr_vs_final"].values()))
    assert (run / "diagnose" / "strip.png").is_file()
    assert res["prediction_gates"] and not any(res["prediction_gates"])  # DAP's default gates start shut


def test_a_gated_policy_reports_its_prediction_gates(run_dir):
    """With `unet.gated_dynamic_context` the JSON holds tanh(g) of every attention layer, in execution order."""
    from dapolicy.policies import make_config, make_policy

    run, _ = run_dir
    torch.manual_seed(0)
    policy = make_policy("dap", SPEC, make_config("dap", "tiny", ["unet.gated_dynamic_context=true",
                                                                  "unet.dynamic_gate_init=0.5"]))
    blocks = policy.policy_net.unet._attention_blocks()
    with torch.no_grad():
        blocks[0].gate.fill_(-1.0)  # the first layer executed
    policy.save_pretrained(run / "model")
    res = dg.diagnose(run / "model", windows=2, progress=False)
    gates = res["prediction_gates"]
    assert len(gates) == len(blocks) and gates[0] == pytest.approx(np.tanh(-1.0))
    assert gates[1:] == pytest.approx([np.tanh(0.5)] * (len(blocks) - 1))
    assert json.loads((run / "diagnose" / "diagnose.json").read_text())["prediction_gates"] == gates


def test_copy_baseline_and_action_sensitivity_can_tell_a_model_that_ignores_the_action(run_dir):
    """The new references: copying the current frame, the VAE ceiling, and the gain from the true action."""
    from dapolicy.policies import make_policy

    run, _ = run_dir
    torch.manual_seed(0)
    policy = make_policy("dap", SPEC, size="tiny").eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # zero-initialised output layers (adaLN-Zero) would hide the action pathway
        for p in policy.dynamics.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    res = dg.diagnose(run, windows=4, policy=policy, progress=False)
    for key in ("psnr_copy_current", "psnr_vae_recon", "psnr_true_action", "psnr_other_action",
                "action_psnr_gain_db", "action_sensitivity"):
        assert set(res[key]) == set(SPEC.cameras), key
    assert all(v > 0 for v in res["action_sensitivity"].values())
    with torch.no_grad():  # now the action tokens are the same whatever the action
        for p in policy.dynamics.action_mlp.parameters():
            p.zero_()
    res = dg.diagnose(run, windows=4, policy=policy, progress=False)
    assert all(v == 0 for v in res["action_sensitivity"].values())
    assert all(v == pytest.approx(0, abs=1e-9) for v in res["action_psnr_gain_db"].values())


def capture_strip(monkeypatch) -> dict:
    """The arrays `diagnose` hands to `plot_strip` (filled when it plots; the strip is still drawn)."""
    seen: dict = {}
    real_plot = dg.plot_strip
    monkeypatch.setattr(dg, "plot_strip", lambda strip, *a: seen.update(strip) or real_plot(strip, *a))
    return seen


def test_strip_shows_the_prediction_for_the_true_and_another_chunk(run_dir, monkeypatch):
    """The sensitivity can be won by spoiling the frame for an implausible chunk; the strip shows both frames."""
    from dapolicy.policies import make_policy

    run, _ = run_dir
    torch.manual_seed(0)
    policy = make_policy("dap", SPEC, size="tiny").eval()
    seen = capture_strip(monkeypatch)
    res = dg.diagnose(run, windows=4, policy=policy, progress=False)
    n = seen["real"].shape[0]
    assert seen["pred_true"].shape == seen["pred_other"].shape == seen["real"].shape and n > 0
    assert Path(res["strip"]).is_file()
    for key, psnr in (("pred_true", "psnr_true_action"), ("pred_other", "psnr_other_action")):
        assert not np.array_equal(seen[key], seen["real"]), key  # a prediction, not the real frame again
        assert np.isfinite(res[psnr][SPEC.cameras[0]])


def test_next_obs_reliance_tells_a_policy_that_reads_the_future_from_one_that_ignores_it(run_dir):
    """Demo-action error given the real next frames, another window's, and none: equal when the policy's
    next-observation tokens ignore the frames, different when they do not."""
    from dapolicy.policies import make_policy

    run, _ = run_dir
    torch.manual_seed(0)
    policy = make_policy("dap", SPEC, size="tiny").eval()
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():  # zero-initialised output layers would hide the next-observation pathway
        for p in policy.policy_net.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.2)
    res = dg.diagnose(run, windows=12, policy=policy, progress=False)
    rel = res["next_obs_reliance"]
    assert set(rel) == {"real", "shuffled", "null", "coupled"}
    assert rel["real"] != pytest.approx(rel["shuffled"], rel=1e-6)
    with torch.no_grad():  # the next-observation tokens no longer depend on the frames
        for p in policy.policy_net.next_tokenizer.parameters():
            p.zero_()
    rel = dg.diagnose(run, windows=12, policy=policy, progress=False)["next_obs_reliance"]
    assert rel["real"] == pytest.approx(rel["shuffled"], rel=1e-9)


def test_change_explained_credits_the_real_change_and_nothing_for_erasing_or_copying():
    """The honest counterpart of the sensitivity: 1 for the real change, 0 for none, and 0 for a VAE that
    erases the moving object in both its pictures (the PushT failure), which a comparison with the real
    current frame would credit with half the change."""
    background = np.full((1, 8, 8, 3), 40, np.uint8)
    background[:, ::2] = 90  # stripes, so that "no change" and "the background" differ from a constant
    current, real = background.copy(), background.copy()
    current[:, 1:3, 1:3] = 255  # the object here now ...
    real[:, 5:7, 5:7] = 255  # ... and here next
    residual_real = float(dg.change_residual(real, current, current, real)[0])
    real_change = float((((real.astype(float) - current) / 255.0) ** 2).mean())
    assert dg.change_explained(residual_real, real_change) == pytest.approx(1.0)
    copy = float(dg.change_residual(current, current, current, real)[0])
    assert dg.change_explained(copy, real_change) == pytest.approx(0.0)
    # A VAE that erases the object: the reconstruction and the prediction are both the bare background.
    erased = float(dg.change_residual(background, background, current, real)[0])
    assert dg.change_explained(erased, real_change) == pytest.approx(0.0)
    naive = float(dg.change_residual(background, current, current, real)[0])  # measured from the real frame
    assert dg.change_explained(naive, real_change) == pytest.approx(0.5)
    wrong = float(dg.change_residual(np.roll(real, 3, axis=1), current, current, real)[0])
    assert dg.change_explained(wrong, real_change) < 0  # change that did not happen costs


def test_change_explained_ignores_the_other_chunk_so_spoiling_it_cannot_raise_it(run_dir):
    """A model whose prediction given the true chunk is its reconstruction of the current frame explains none
    of the change, however different its frame for another chunk is (a high action sensitivity)."""
    from dapolicy.policies import make_policy

    run, _ = run_dir
    torch.manual_seed(0)
    policy = make_policy("dap", SPEC, size="tiny").eval()
    demo_chunks: list[np.ndarray] = []

    def predict_next(obs, actions, generator=None):
        recon = dg.to_numpy(policy.decode_latents(policy.encode_latents(np.asarray(obs["images"])[:, -1])))
        if not demo_chunks:
            demo_chunks.append(np.asarray(actions))  # diagnose asks for the demonstrated chunk first
        if np.array_equal(actions, demo_chunks[-1]):
            return recon
        return np.full_like(recon, 255)  # a spoiled frame for the other chunk

    policy.predict_next = predict_next
    res = dg.diagnose(run, windows=4, batch_size=4, policy=policy, progress=False)
    for cam in SPEC.cameras:
        assert res["change_explained"]["true"][cam] == pytest.approx(0.0, abs=1e-9)
        assert res["change_explained"]["other"][cam] < 0
        assert res["action_sensitivity"][cam] > 1  # the gameable figure is high
        assert res["change_explained"]["vae"][cam] <= 1.0
        # its no-action frame is spoiled too (None is not the demo chunk): that earns the action nothing
        assert res["change_explained"]["no_action"][cam] < 0
        assert res["change_explained"]["action"][cam] == pytest.approx(0.0, abs=1e-9)


def test_change_explained_by_action_is_what_the_chunk_adds_over_an_action_free_prediction():
    assert dg.change_explained_by_action(0.3, 0.1) == pytest.approx(0.2)
    assert dg.change_explained_by_action(0.3, -0.5) == pytest.approx(0.3)  # spoiling the no-action frame: no credit
    assert dg.change_explained_by_action(0.1, 0.1) == pytest.approx(0.0)  # a model that ignores the action
    assert dg.change_explained_by_action(-0.2, -0.2) == pytest.approx(0.0)  # ... even one worse than copying
    assert dg.change_explained_by_action(0.0, -0.5) == pytest.approx(0.0)


def test_change_explained_by_action_credits_a_model_whose_chunk_shows_the_future(run_dir, monkeypatch):
    """Given a chunk the model shows its VAE's picture of the real next frame; without an action, that of the
    current frame. The action's part is then the whole of the true chunk's (the VAE ceiling); the same model
    answering with the future whatever the action (None included) scores 0."""
    from dapolicy.policies import make_policy

    run, _ = run_dir
    torch.manual_seed(0)
    policy = make_policy("dap", SPEC, size="tiny").eval()
    recon = lambda frames: dg.to_numpy(policy.decode_latents(policy.encode_latents(np.asarray(frames))))  # noqa: E731
    future: dict = {}
    original = dg._frame_baselines

    def remembering_the_future(policy_, obs, batch, other_actions, real, seed, predictions=None):
        future["next"] = real  # the real next frames of this batch, for the fake predictions below
        return original(policy_, obs, batch, other_actions, real, seed, predictions)

    monkeypatch.setattr(dg, "_frame_baselines", remembering_the_future)
    policy.predict_next = lambda obs, actions, generator=None: recon(
        future["next"] if actions is not None else np.asarray(obs["images"])[:, -1])
    sees = dg.diagnose(run, windows=4, batch_size=4, policy=policy, progress=False)["change_explained"]
    policy.predict_next = lambda obs, actions, generator=None: recon(future["next"])
    blind = dg.diagnose(run, windows=4, batch_size=4, policy=policy, progress=False)["change_explained"]
    for cam in SPEC.cameras:
        assert sees["true"][cam] == pytest.approx(sees["vae"][cam])  # (an untrained VAE: a ceiling below 0)
        assert sees["no_action"][cam] == pytest.approx(0.0, abs=1e-9)
        assert sees["action"][cam] == pytest.approx(sees["true"][cam]) and abs(sees["action"][cam]) > 1e-3
        assert blind["true"][cam] == pytest.approx(sees["true"][cam])
        assert blind["action"][cam] == pytest.approx(0.0, abs=1e-9)
    policy.config.action_dropout = 0.0  # no trained no-action mode: no figure rather than a meaningless one
    untrained = dg.diagnose(run, windows=4, batch_size=4, policy=policy, progress=False)["change_explained"]
    assert "no_action" not in untrained and "action" not in untrained and "true" in untrained


def test_strip_windows_gathers_over_batches_and_rejects_zero(run_dir, monkeypatch):
    """`--strip-windows 6` with batches of 4: the strip shows 6 windows, the frames in window order."""
    from dapolicy.policies import make_policy

    run, _ = run_dir
    torch.manual_seed(0)
    policy = make_policy("dap", SPEC, size="tiny").eval()
    seen = capture_strip(monkeypatch)
    dg.diagnose(run, windows=8, batch_size=4, strip_windows=6, policy=policy, progress=False)
    assert seen["real"].shape[0] == seen["current"].shape[0] == seen["pred_true"].shape[0] == 6
    assert seen["decoded"].shape[1] == 6
    first = dict(seen)
    dg.diagnose(run, windows=8, batch_size=8, strip_windows=6, policy=policy, progress=False)
    np.testing.assert_array_equal(first["real"], seen["real"])  # the same windows, however they are batched
    with pytest.raises(ValueError, match="strip_windows"):
        dg.diagnose(run, windows=8, strip_windows=0, policy=policy, progress=False)


def test_cli_prints_the_change_explained_per_camera(run_dir, capsys):
    """`dap diagnose RUN/model --strip-windows 2`: the printed summary has the new line for every camera."""
    from dapolicy.cli import main
    from dapolicy.policies import make_policy

    run, _ = run_dir
    torch.manual_seed(0)
    make_policy("dap", SPEC, size="tiny").save_pretrained(run / "model")
    assert main(["diagnose", str(run / "model"), "--windows", "3", "--strip-windows", "2", "--quiet"]) == 0
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if "change explained, true chunk" in line]
    assert len(lines) == len(SPEC.cameras) and "VAE ceiling" in lines[0]
    saved = json.loads((run / "diagnose" / "diagnose.json").read_text())  # RUN/diagnose for RUN/model
    assert set(saved["change_explained"]) == {"true", "other", "no_action", "action", "vae"}
    assert "the action's own part" in lines[0]
