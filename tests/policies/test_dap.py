"""DAPPolicy mechanics: conditioning is wired, every coupling mode runs, save/load is exact, errors name keys."""

import numpy as np
import pytest
import torch
from torch import nn

from dapolicy.policies import DAPPolicy, load_pretrained, make_config, make_policy
from dapolicy.spec import EnvSpec

SPEC = EnvSpec(name="test", cameras=("a", "b"), image_size=32, action_dim=3, proprio_dim=2, max_steps=10,
               action_low=(-1, -1, -1), action_high=(1, 1, 1))


def _randomise(module: nn.Module, seed: int = 0) -> None:
    """Zero-initialised output layers (adaLN-Zero) hide wiring bugs; give every weight a random value."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def _policy(method="dap", **overrides):
    torch.manual_seed(0)
    policy = make_policy(method, SPEC, make_config(method, "tiny", overrides))
    _randomise(policy)
    return policy.eval()


def _obs(b=2, seed=0):
    rng = np.random.default_rng(seed)
    return {"images": rng.integers(0, 255, (b, 2, 2, 32, 32, 3), dtype=np.uint8),
            "proprio": rng.normal(size=(b, 2, 2)).astype(np.float32)}


def _batch(b=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "images": torch.randint(0, 255, (b, 2, 2, 32, 32, 3), generator=g, dtype=torch.uint8),
        "latents": torch.randn(b, 2, 2, 4, 4, 4, generator=g),
        "next_latents": torch.randn(b, 2, 4, 4, 4, generator=g),
        "proprio": torch.randn(b, 2, 2, generator=g),
        "action": torch.rand(b, 16, 3, generator=g) * 2 - 1,
        "action_is_pad": torch.zeros(b, 16, dtype=torch.bool),
    }


def test_changing_the_action_changes_the_dynamics_output():
    policy = _policy()
    b = _batch(2)
    z, tau = torch.randn(2, 2, 4, 4, 4), torch.full((2,), 0.5)
    current, proprio = b["latents"][:, -1], b["proprio"].flatten(1)
    out1 = policy.dynamics(z, tau, current, b["action"], proprio)
    out2 = policy.dynamics(z, tau, current, b["action"] + 0.5, proprio)
    assert not torch.allclose(out1, out2)
    assert torch.equal(out1, policy.dynamics(z, tau, current, b["action"], proprio))


def test_changing_the_predicted_next_observation_changes_the_policy_output():
    policy = _policy()
    b = _batch(2)
    net = policy.policy_net
    tokens = net.observation_tokens(b["proprio"], latents=b["latents"])
    a, tau = torch.randn(2, 16, 3), torch.full((2,), 0.3)
    z1, z2 = torch.randn(2, 2, 4, 4, 4), torch.randn(2, 2, 4, 4, 4)
    v1 = net.unet(a, tau, static_tokens=tokens, dynamic_tokens=net.next_tokens(z1, 2))
    v2 = net.unet(a, tau, static_tokens=tokens, dynamic_tokens=net.next_tokens(z2, 2))
    v_null = net.unet(a, tau, static_tokens=tokens, dynamic_tokens=net.next_tokens(None, 2))
    assert not torch.allclose(v1, v2)
    assert not torch.allclose(v1, v_null)
    # The cached static context gives the same answer as projecting the tokens on the fly.
    cached = net.unet(a, tau, static=net.unet.prepare_context(tokens), dynamic_tokens=net.next_tokens(z1, 2))
    assert torch.allclose(cached, v1, atol=1e-5)


@pytest.mark.parametrize("mode", ["jacobi", "gauss_seidel", "predict_then_act", "off"])
def test_every_coupling_mode_runs_batched(mode):
    policy = _policy()
    pred = policy.predict_chunk(_obs(3), return_next=True, mode=mode, return_trace=True)
    actions, frames, trace = pred.actions, pred.next_frames, pred.trace
    assert actions.shape == (3, 16, 3) and np.isfinite(actions).all()
    assert trace["a_hat"].shape == (4, 3, 16, 3)  # K = 4 steps in the tiny config
    if mode == "off":
        assert frames is None and trace["z_hat"] is None
    else:
        assert frames.shape == (3, 2, 32, 32, 3) and frames.dtype == np.uint8
        assert trace["z_hat"].shape == (4, 3, 2, 4, 4, 4)


def test_batch_elements_are_independent():
    policy = _policy()
    obs = _obs(3)
    torch.manual_seed(1)
    full = policy.predict_chunk(obs).actions
    obs2 = {k: v.copy() for k, v in obs.items()}
    obs2["images"][2] = 255 - obs2["images"][2]
    torch.manual_seed(1)
    changed = policy.predict_chunk(obs2).actions
    assert np.allclose(full[:2], changed[:2], atol=1e-5)
    assert not np.allclose(full[2], changed[2])


def test_coupled_actions_differ_from_the_plain_policy():
    policy = _policy()
    torch.manual_seed(3)
    coupled = policy.predict_chunk(_obs(2), mode="jacobi").actions
    torch.manual_seed(3)
    plain = policy.predict_chunk(_obs(2), mode="off").actions
    assert not np.allclose(coupled, plain)


def test_save_and_load_give_identical_actions(tmp_path):
    policy = _policy()
    data = type("D", (), {"action": np.random.rand(50, 3) * 4 - 2, "proprio": np.random.rand(50, 2)})
    policy.fit_normalizer(data)
    policy.save_pretrained(tmp_path / "model")
    loaded = load_pretrained(tmp_path / "model")
    assert type(loaded) is DAPPolicy
    for p in (policy, loaded):
        torch.manual_seed(7)
        p._out = p.predict_chunk(_obs(2)).actions
    np.testing.assert_array_equal(policy._out, loaded._out)
    assert loaded.config == policy.config and loaded.spec == policy.spec


def test_loading_a_truncated_checkpoint_names_the_problem(tmp_path):
    policy = _policy()
    policy.save_pretrained(tmp_path / "m")
    weights = tmp_path / "m" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        DAPPolicy.from_pretrained(tmp_path / "m")
    with pytest.raises(FileNotFoundError, match="config.json"):
        DAPPolicy.from_pretrained(tmp_path / "nothing")


@pytest.mark.parametrize("obs_encoder", ["vae", "resnet"])
def test_non_finite_weights_give_a_named_error_not_nan_actions(obs_encoder):
    """The sampler skips the batch's second NaN check (validate_obs did it), so a diverged encoder or network
    must still be caught: on the actions, before they reach a robot."""
    policy = _policy(obs_encoder=obs_encoder)
    with torch.no_grad():
        next(policy.vae.parameters()).fill_(float("nan"))  # the VAE feeds the dynamics model (and "vae" policy)
    with pytest.raises(FloatingPointError, match="NaN or inf actions"):
        policy.predict_chunk(_obs(1), mode="jacobi")


def test_wrong_shapes_and_missing_keys_name_the_key_and_expected_shape():
    policy = _policy()
    obs = _obs(1)
    with pytest.raises(ValueError, match=r"'proprio'.*\[B, 2, 2\]"):
        policy.predict_chunk({"images": obs["images"]})
    with pytest.raises(ValueError, match=r"'images'.*expected \[B, 2, 2, 32, 32, 3\]"):
        policy.predict_chunk({"images": obs["images"][:, :, :1], "proprio": obs["proprio"]})
    bad = dict(obs, proprio=np.full((1, 2, 2), np.nan, dtype=np.float32))
    with pytest.raises(ValueError, match="'proprio' contains NaN"):
        policy.predict_chunk(bad)
    with pytest.raises(ValueError, match="missing camera 'b'"):
        policy.select_action({"images": {"a": np.zeros((32, 32, 3), np.uint8)}, "proprio": np.zeros(2)})
    with pytest.raises(ValueError, match="missing key 'next_latents'"):
        policy.train()
        b = _batch(2)
        del b["next_latents"]
        policy.compute_loss(b, "dynamics")


def test_select_action_executes_n_action_steps_then_replans():
    policy = _policy()
    calls = []
    original = policy.predict_chunk

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    policy.predict_chunk = counting
    env_obs = {"images": {"a": np.zeros((32, 32, 3), np.uint8), "b": np.zeros((32, 32, 3), np.uint8)},
               "proprio": np.zeros(2, np.float32)}
    policy.reset()
    policy.record_predictions = True
    for _ in range(policy.config.n_action_steps * 2 + 1):
        assert policy.select_action(env_obs).shape == (3,)
    assert len(calls) == 3
    assert policy.last_next_frames.shape == (2, 32, 32, 3)


@pytest.mark.parametrize("method,encoder", [("dap", "vae"), ("dap", "resnet"), ("fm", "vae"), ("fm", "resnet")])
def test_losses_are_finite_and_backpropagate(method, encoder):
    policy = _policy(method, obs_encoder=encoder).train()
    batch = _batch(4)
    for stage in policy.stage_names:
        loss = policy.compute_loss(batch if stage != "vae" else {"images": batch["images"][:, -1]}, stage)["loss"]
        assert torch.isfinite(loss)
        loss.backward()
        grads = [p.grad for p in policy.stage_module(stage).parameters() if p.grad is not None]
        assert grads and all(torch.isfinite(g).all() for g in grads)
    assert ("dynamics" in policy.stage_names) == (method == "dap")


def test_vae_stage_weights_the_foreground_when_asked():
    """`vae.foreground_weight` (set like any field) reaches the VAE stage's loss; "recon" stays the plain MSE.
    The frames have a static scene (a fixed random background) and a bright square that moves between them:
    frames of pure noise would have none, and such a camera is left unweighted (`foreground_weights`)."""
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 255, (1, 2, 32, 32, 3), generator=g, dtype=torch.uint8).repeat(4, 1, 1, 1, 1)
    for i in range(4):
        images[i, :, 4 * i:4 * i + 6, 4 * i:4 * i + 6] = 255
    batch = {"images": images}
    plain = _policy("dap").train()
    torch.manual_seed(0)
    base = plain.compute_loss(batch, "vae")
    weighted = _policy("dap", **{"vae.foreground_weight": 20.0}).train()
    torch.manual_seed(0)
    out = weighted.compute_loss(batch, "vae")
    assert "recon_weighted" in out and "recon_weighted" not in base
    assert torch.allclose(out["recon"], base["recon"]) and not torch.allclose(out["loss"], base["loss"])


def test_named_configs_build_and_paper_is_paper_sized():
    from dapolicy.info import default_spec

    counts = {name: make_policy("dap", default_spec(), size=name).parameter_counts()["total"]
              for name in ("tiny", "small")}
    assert counts["tiny"] < 1_000_000 < counts["small"] < 30_000_000


def test_small_policies_read_current_images_with_the_end_to_end_resnet():
    """The CPU default chosen on validation (docs/results.md §1): DAP and FM tokenise the current images with
    a 16-wide ResNet-GN trained on the task, and DAP's VAE still encodes the frames its dynamics model predicts."""
    from dapolicy.info import default_spec

    for method in ("dap", "fm"):
        config = make_config(method, "small")
        assert (config.obs_encoder, config.resnet.width) == ("resnet", 16)
        policy = make_policy(method, default_spec(), config)
        assert "images" in policy.stage_spec("policy").inputs, method
    assert "vae" in make_policy("dap", default_spec(), make_config("dap", "small")).stage_names
    assert make_config("dap", "tiny").obs_encoder == "vae"


def test_paper_config_has_paper_scale_parameter_count():
    """`dap info --config paper` must report 330-410M trainable parameters (the paper: 369M)."""
    from dapolicy.info import default_spec

    with torch.device("meta"):  # counts shapes without allocating 1.4 GB
        counts = make_policy("dap", default_spec(), size="paper").parameter_counts()
    assert 330e6 <= counts["total"] <= 410e6, counts


@pytest.mark.parametrize("mode", ["jacobi", "gauss_seidel", "predict_then_act"])
def test_rollout_source_hands_the_policy_what_inference_hands_it(mode):
    """next_obs_mix.rollout: at training tau in [k/K, (k+1)/K) the policy sees the estimate that sampling from
    the same noise hands it at step k (nothing at step 0 of Jacobi/Gauss-Seidel, the final one in predict-then-act)."""
    policy = _policy(coupling=mode)
    obs = _obs(3)
    k = policy.config.flow.steps
    pred = policy.predict_chunk(obs, return_trace=True, generator=torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)  # predict_chunk draws the next-latent noise, then the action noise
    z0 = torch.randn(3, 2, 4, 4, 4, generator=g)
    a0 = torch.randn(3, 16, 3, generator=g)
    batch = policy.validate_obs(obs)
    batch["latents"] = policy.encode_latents(batch["images"])
    tokens = policy.observation_tokens(batch, augment=False)
    tau = torch.tensor([0.5 / k, 2.5 / k, (k - 0.5) / k])
    est, first = policy._rollout_estimate(batch, tokens, a0, tau, z_noise=z0)
    z_hat = pred.trace["z_hat"]
    if mode == "predict_then_act":
        assert not first.any()
        for i in range(3):
            torch.testing.assert_close(est[i], z_hat[-1][i])
    else:
        assert first.tolist() == [True, False, False]
        torch.testing.assert_close(est[1], z_hat[1][1])
        torch.testing.assert_close(est[2], z_hat[k - 2][2])


@pytest.mark.parametrize("mode", ["jacobi", "gauss_seidel"])
def test_rollout_source_runs_each_sample_only_as_far_as_its_step(mode, monkeypatch):
    """The training-time rollout stops each sample at the step its tau needs (two groups) and hands it the same
    estimate as sampling the whole batch for K steps: every step k = 0..K-1, with fewer dynamics-model rows."""
    policy = _policy(coupling=mode, **{"flow.steps": 6})
    k, b = 6, 12
    obs = _obs(b)
    pred = policy.predict_chunk(obs, return_trace=True, generator=torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)  # predict_chunk draws the next-latent noise, then the action noise
    z0, a0 = torch.randn(b, 2, 4, 4, 4, generator=g), torch.randn(b, 16, 3, generator=g)
    batch = policy.validate_obs(obs)
    batch["latents"] = policy.encode_latents(batch["images"])
    tokens = policy.observation_tokens(batch, augment=False)
    tau = (torch.arange(b) % k + 0.5) / k  # every step, twice
    rows = []
    original = policy.dynamics.forward
    monkeypatch.setattr(policy.dynamics, "forward",
                        lambda z, *a, **kw: rows.append(z.shape[0]) or original(z, *a, **kw))
    est, first = policy._rollout_estimate(batch, tokens, a0, tau, z_noise=z0)
    assert sum(rows) < k * b  # a K-step run of the whole batch calls the dynamics model on k * b rows
    assert first.tolist() == [i % k == 0 for i in range(b)]
    z_hat = pred.trace["z_hat"]
    for i in range(b):
        if i % k:
            torch.testing.assert_close(est[i], z_hat[i % k - 1][i], rtol=1e-4, atol=1e-5)


def test_rollout_source_restores_the_policy_network_mode_after_an_error(monkeypatch):
    """The rollout samples with the policy network in eval mode; a failure inside it leaves training's mode."""
    policy = _policy(coupling="jacobi").train()
    batch = _batch(3)
    tokens = policy.observation_tokens(batch, augment=False)

    def broken(*args, **kwargs):
        raise RuntimeError("dynamics model failed")

    monkeypatch.setattr(policy.dynamics, "forward", broken)
    with pytest.raises(RuntimeError, match="dynamics model failed"):
        policy._rollout_estimate(batch, tokens, torch.randn(3, 16, 3), torch.tensor([0.9, 0.9, 0.9]))
    assert policy.policy_net.training


def test_rollout_share_trains_on_own_rollouts(monkeypatch):
    """A rollout share calls the coupled rollout (not the ground truth) for its samples."""
    policy = _policy(**{"next_obs_mix.ground_truth": 0, "next_obs_mix.dynamics": 0, "next_obs_mix.rollout": 1.0,
                        "next_obs_mix.null": 0}).train()
    calls = []
    original = policy._rollout_estimate
    monkeypatch.setattr(policy, "_rollout_estimate", lambda *a, **k: calls.append(1) or original(*a, **k))
    out = policy.compute_loss(_batch(4), "policy")
    assert calls == [1] and float(out["share_rollout"]) == 1.0 and torch.isfinite(out["loss"])


def test_each_model_has_its_own_statistics_and_actions_are_mapped_between_them():
    """The policy's normaliser covers its expert data, the dynamics model's every episode; the coupled sampler
    hands the policy's action estimate to the dynamics model in the dynamics model's units."""
    policy = _policy()
    rng = np.random.default_rng(0)
    expert = type("D", (), {"action": rng.uniform(-0.5, 0.5, (40, 3)), "proprio": rng.uniform(0, 1, (40, 2))})
    everything = type("D", (), {"action": rng.uniform(-3, 3, (80, 3)), "proprio": rng.uniform(-2, 2, (80, 2))})
    policy.fit_normalizers(lambda stage: everything if stage == "dynamics" else expert)
    assert float(policy.action_normalizer.high.max()) <= 0.5 < float(policy.dynamics_action_normalizer.high.max())
    a_env = torch.as_tensor(rng.uniform(-2, 2, (5, 16, 3)), dtype=torch.float32)
    scale, shift = policy.policy_to_dynamics_action()
    mapped = policy.action_normalizer.normalize(a_env) * scale + shift
    torch.testing.assert_close(mapped, policy.dynamics_action_normalizer.normalize(a_env))
    # the fast sampler and the reference sampler agree under the mapping too
    from dapolicy.policies import fast_sampler

    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    batch = policy.validate_obs(_obs(2))
    fast = fast_sampler.predict(policy, dict(batch), True, "jacobi", 4, False, g())
    ref = fast_sampler.reference_predict(policy, dict(batch), True, "jacobi", 4, False, g())
    torch.testing.assert_close(fast[0], ref[0], atol=1e-5, rtol=1e-4)


def test_default_training_next_observation_is_the_dynamics_estimate_never_the_ground_truth(monkeypatch):
    """The defaults (chosen on validation seeds): 90% the frozen dynamics model's estimate, 10% null, no real
    o_{t+k}: every next latent the policy sees is an estimate or null."""
    policy = _policy().train()
    assert policy.config.next_obs_mix.shares == (0.0, 0.9, 0.0, 0.1)
    batch = _batch(32)
    marker = 123.0
    seen = []
    monkeypatch.setattr(policy, "_dynamics_estimate", lambda sub: torch.full_like(sub["next_latents"], marker))
    original = policy.policy_net.next_tokens
    monkeypatch.setattr(policy.policy_net, "next_tokens",
                        lambda z, b, null_mask=None: seen.append((z, null_mask)) or original(z, b, null_mask))
    out = policy.compute_loss(batch, "policy")
    (z, null), = seen
    assert bool((z[~null] == marker).all())  # every non-null sample sees the estimate
    assert "share_ground_truth" not in out and 0 < float(out["share_dynamics"]) < 1


def test_action_contrast_hinge():
    from dapolicy.policies.dap import action_contrast_loss

    true, other = torch.tensor([0.1, 0.1, 0.1]), torch.tensor([0.3, 0.12, 0.05])
    counted = torch.tensor([True, True, False])
    # sample 0: gap 0.2 >= margin -> 0; sample 1: 0.05 + 0.1 - 0.12 = 0.03; sample 2 not counted
    torch.testing.assert_close(action_contrast_loss(true, other, counted, 0.05), torch.tensor(0.03 / 2))
    assert float(action_contrast_loss(true, other, torch.zeros(3, dtype=torch.bool), 0.05)) == 0.0


def test_action_contrast_term_of_the_dynamics_loss(monkeypatch):
    """Off by default (one dynamics forward); on, a second forward with another window's chunk, a term that
    pushes the action pathway (a gradient for the action MLP) and both parts logged."""
    batch = _batch(8)
    plain = _policy().train()
    calls = []
    forward = plain.dynamics.forward
    monkeypatch.setattr(plain.dynamics, "forward", lambda *a, **k: calls.append(a[3]) or forward(*a, **k))
    assert set(plain.compute_loss(batch, "dynamics")) == {"loss"} and len(calls) == 1

    policy = _policy(action_contrast=0.5, action_contrast_margin=10.0).train()  # margin: every gap counts
    calls.clear()
    forward = policy.dynamics.forward
    monkeypatch.setattr(policy.dynamics, "forward", lambda *a, **k: calls.append(a[3]) or forward(*a, **k))
    out = policy.compute_loss(batch, "dynamics")
    assert len(calls) == 2 and not torch.equal(calls[0], calls[1])
    assert sorted(map(tuple, calls[1].flatten(1).tolist())) == sorted(map(tuple, calls[0].flatten(1).tolist()))
    torch.testing.assert_close(out["loss"], out["flow_loss"] + 0.5 * out["action_contrast"])
    assert float(out["action_contrast"]) > 0

    def action_mlp_grad(p):
        torch.manual_seed(1)
        return torch.autograd.grad(p.compute_loss(batch, "dynamics")["loss"], p.dynamics.action_mlp[0].weight)[0]

    monkeypatch.undo()
    with_term, without = action_mlp_grad(policy), action_mlp_grad(_policy().train())  # same weights and draws
    assert (with_term - without).abs().sum() > 1e-6
    with pytest.raises(ValueError, match="action_contrast"):
        make_config("dap", "tiny", ["action_contrast=-1"])


@pytest.mark.parametrize("encoder", ["vae", "resnet"])
def test_current_image_dropout_hides_the_images_and_always_shows_a_prediction(monkeypatch, encoder):
    """Off by default. On, the hidden samples' image tokens do not depend on the images (proprio still counts)
    and every hidden sample sees a next-observation estimate, never the null tokens."""
    assert _policy().config.current_image_dropout == 0.0
    policy = _policy(current_image_dropout=0.5, obs_encoder=encoder).train()
    keep = torch.tensor([True, False, True, False])
    batch, other = _batch(4, seed=0), _batch(4, seed=1)
    tok = policy.observation_tokens(batch, augment=False, image_keep=keep)
    tok_other = policy.observation_tokens({**other, "proprio": batch["proprio"]}, augment=False, image_keep=keep)
    torch.testing.assert_close(tok[~keep], tok_other[~keep])  # hidden: the images do not matter
    assert not torch.allclose(tok[keep], tok_other[keep])  # shown: they do
    tok_proprio = policy.observation_tokens({**batch, "proprio": other["proprio"]}, augment=False, image_keep=keep)
    assert not torch.allclose(tok[~keep], tok_proprio[~keep])

    seen = []
    original = policy.policy_net.next_tokens
    monkeypatch.setattr(policy, "_current_image_keep", lambda b, device: torch.arange(b) % 2 == 0)
    monkeypatch.setattr(policy.policy_net, "next_tokens",
                        lambda z, b, null_mask=None: seen.append(null_mask) or original(z, b, null_mask))
    for seed in range(5):  # the default mix draws null for 10% of the samples: never for the hidden ones
        torch.manual_seed(seed)
        out = policy.compute_loss(_batch(32, seed), "policy")
        assert float(out["images_hidden"]) == 0.5 and torch.isfinite(out["loss"])
    hidden = torch.arange(32) % 2 == 1
    assert not any(bool(null[hidden].any()) for null in seen)
    assert any(bool(null[~hidden].any()) for null in seen)


def test_current_image_dropout_is_validated():
    with pytest.raises(ValueError, match="current_image_dropout"):
        make_config("dap", "tiny", {"current_image_dropout": 1.0})
    with pytest.raises(ValueError, match="other than null"):
        make_config("dap", "tiny", {"current_image_dropout": 0.3, "next_obs_mix.dynamics": 0, "next_obs_mix.null": 1})


def test_predict_chunk_switches_to_eval_mode_when_the_policy_or_a_stage_model_trains():
    """predict_chunk skips the costly eval() walk when everything is already in eval mode, but never samples
    with a model in training mode: training switches one stage's model (a direct child) at a time."""
    policy = _policy()
    policy.eval()
    policy.policy_net.train()  # as the training loop leaves it
    policy.predict_chunk(_obs(1))
    assert not any(m.training for m in policy.modules())
    policy.train()
    policy.predict_chunk(_obs(1))
    assert not any(m.training for m in policy.modules())


def test_image_next_observation_reader_decodes_and_reads_with_the_policy_resnet():
    """next_obs_reader="image": the estimate is decoded by the frozen VAE and tokenised by the same ResNet as
    the current images; the policy output depends on it, and the policy loss trains that ResNet through it."""
    with pytest.raises(ValueError, match="obs_encoder 'resnet'"):
        make_config("dap", "tiny", {"next_obs_reader": "image", "obs_encoder": "vae"})
    with pytest.raises(ValueError, match="next_obs_reader"):
        make_config("dap", "tiny", {"next_obs_reader": "pixels", "obs_encoder": "resnet"})
    policy = _policy(obs_encoder="resnet", next_obs_reader="image")
    assert not hasattr(policy.policy_net, "next_tokenizer")
    z1, z2 = torch.randn(2, 2, 4, 4, 4), torch.randn(2, 2, 4, 4, 4)
    calls = []
    encoder = policy.policy_net.image_encoders[0]
    hook = encoder.register_forward_hook(lambda m, i, o: calls.append(i[0].shape))
    t1 = policy.next_observation_tokens(z1, 2)
    hook.remove()
    assert calls == [(2, 3, 32, 32)]  # the decoded frames of camera 0, at image size
    assert t1.shape == policy.next_observation_tokens(None, 2).shape
    assert not torch.allclose(t1, policy.next_observation_tokens(z2, 2))
    b = _batch(2)
    tokens = policy.observation_tokens(b, augment=False)
    a, tau = torch.randn(2, 16, 3), torch.full((2,), 0.3)
    unet = policy.policy_net.unet
    v1 = unet(a, tau, static_tokens=tokens, dynamic_tokens=t1)
    v2 = unet(a, tau, static_tokens=tokens, dynamic_tokens=policy.next_observation_tokens(z2, 2))
    assert not torch.allclose(v1, v2)

    policy.train()
    batch = _batch(8)
    batch["images"] = torch.zeros_like(batch["images"])  # current images carry nothing: any ResNet gradient
    out = policy.compute_loss(batch, "policy")            # that depends on the estimate comes through it
    out["loss"].backward()
    assert torch.isfinite(out["loss"])
    assert all(p.grad is None or float(p.grad.abs().sum()) == 0 for p in policy.vae.parameters())
    assert float(encoder.stem[0].weight.grad.abs().sum()) > 0


def test_rollout_samples_with_hidden_images_roll_out_with_the_images_and_never_see_null(monkeypatch):
    """With `current_image_dropout` and the rollout source, the rollout is the one inference would run (current
    images in view), and a hidden sample whose rollout hands no estimate (first Jacobi step) gets the dynamics
    estimate instead of the null observation."""
    policy = _policy(current_image_dropout=0.5, **{"next_obs_mix.dynamics": 0.0, "next_obs_mix.rollout": 1.0,
                                                   "next_obs_mix.null": 0.0}).train()
    keep = torch.arange(32) % 2 == 0
    monkeypatch.setattr(policy, "_current_image_keep", lambda b, device: keep)
    rollout_calls, nulls = [], []
    original_rollout, original_next = policy._rollout_estimate, policy.policy_net.next_tokens

    def rollout(batch, tokens, *args, **kwargs):
        z_hat, first = original_rollout(batch, tokens, *args, **kwargs)
        rollout_calls.append((batch, tokens, first))
        return z_hat, first

    def next_tokens(z, b, null_mask=None):
        if null_mask is not None:  # the training batch's call (the rollout's own calls pass none)
            nulls.append(null_mask)
        return original_next(z, b, null_mask)

    monkeypatch.setattr(policy, "_rollout_estimate", rollout)
    monkeypatch.setattr(policy.policy_net, "next_tokens", next_tokens)
    for seed in range(4):
        torch.manual_seed(seed)
        assert torch.isfinite(policy.compute_loss(_batch(32, seed), "policy")["loss"])
    assert any(bool((first & ~keep).any()) for _, _, first in rollout_calls)  # the case arose
    assert len(nulls) == 4 and not any(bool(null[~keep].any()) for null in nulls)  # and never showed null
    batch, tokens, _ = rollout_calls[0]
    hidden = policy.observation_tokens(batch, augment=False, image_keep=torch.zeros(32, dtype=torch.bool))
    assert not torch.allclose(tokens[~keep], hidden[~keep])  # the rollout saw the images


def test_act_given_next_and_predict_next_reject_float_frames_and_non_positive_steps():
    policy = _policy()
    frames = np.zeros((2, 2, 32, 32, 3), dtype=np.uint8)
    assert policy.act_given_next(_obs(2), frames, steps=2).shape == (2, 16, 3)
    with pytest.raises(ValueError, match="uint8"):
        policy.act_given_next(_obs(2), frames.astype(np.float32))
    with pytest.raises(ValueError, match="steps must be >= 1"):
        policy.act_given_next(_obs(2), None, steps=0)
    with pytest.raises(ValueError, match="steps must be >= 1"):
        policy.predict_next(_obs(2), None, steps=-1)


@pytest.mark.parametrize("method", ["fm", "dap"])
def test_register_tokens_are_learned_context_shared_by_every_input(method):
    plain, policy = _policy(method), _policy(method, register_tokens=3)
    assert not any("registers" in k for k in plain.state_dict())  # old checkpoints still load
    assert policy.policy_net.registers.shape == (3, policy.config.token_dim)
    batch = _batch(4)
    tokens = policy.observation_tokens(batch, augment=False)
    assert tokens.shape[1] == plain.observation_tokens(batch, augment=False).shape[1] + 3
    torch.testing.assert_close(tokens[:, -3:], policy.policy_net.registers[None].expand(4, -1, -1))
    policy.train()
    policy.compute_loss(batch, "policy")["loss"].backward()
    assert policy.policy_net.registers.grad is not None and policy.policy_net.registers.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="register_tokens"):
        make_config(method, "tiny", {"register_tokens": -1})


def test_the_dap_method_trains_a_null_only_policy_exactly_as_fm_trains_the_same_network(square_store, tmp_path):
    """DAP's policy stage with the null prediction only is FM with as many register tokens: from the same initial
    weights, on the same data and seed, every step's loss is the same. So a gap between those two benchmark rows
    comes from their initial weights (DAP draws its policy network after its VAE), not from how `dap` trains."""
    import copy
    import json

    from dapolicy.data.store import EpisodeStore
    from dapolicy.train import train
    from dapolicy.training.checkpoint import seed_everything
    from dapolicy.training.config import TrainConfig

    spec = EpisodeStore.open(square_store).spec
    common = ["obs_encoder=resnet", "resnet.width=8"]
    seed_everything(0)
    # the joint softmax (the default before 2026-11-28): the null tokens sit beside the observation's, as registers do
    dap = make_policy("dap", spec, make_config("dap", "tiny", common + ["unet.gated_dynamic_context=false",
        "next_obs_mix.ground_truth=0", "next_obs_mix.dynamics=0", "next_obs_mix.rollout=0", "next_obs_mix.null=1"]))
    null = dap.policy_net.null_next.detach()
    fm = make_policy("fm", spec, make_config("fm", "tiny", common + [f"register_tokens={null.shape[0]}"]))
    weights = {k: v for k, v in dap.policy_net.state_dict().items() if not k.startswith(("next_tokenizer", "null"))}
    fm.policy_net.load_state_dict({**weights, "registers": null.clone()})
    losses = {}
    for name, policy in (("dap", dap), ("fm", fm)):
        run = train(square_store, tmp_path / name, method=name, config="tiny", steps=6, seed=0, threads=1,
                    progress=False, device="cpu", train_config=TrainConfig.preset("tiny", log_interval=1),
                    policy_factory=lambda _spec, p=policy: copy.deepcopy(p))
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        losses[name] = [r["loss"] for r in records if r.get("kind") == "train" and r.get("stage") == "policy"]
    assert len(losses["dap"]) == 6
    assert losses["dap"] == pytest.approx(losses["fm"], rel=1e-4)
    # and the test can tell: other initial weights give other losses
    seed_everything(1)
    other = make_policy("fm", spec, make_config("fm", "tiny", common + [f"register_tokens={null.shape[0]}"]))
    run = train(square_store, tmp_path / "other", method="fm", config="tiny", steps=6, seed=0, threads=1,
                progress=False, device="cpu", train_config=TrainConfig.preset("tiny", log_interval=1),
                policy_factory=lambda _spec: other)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in records if r.get("kind") == "train"] != pytest.approx(losses["fm"], rel=1e-4)
