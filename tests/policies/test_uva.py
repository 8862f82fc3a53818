"""UVA stand-in: shapes and errors, frames and actions denoised jointly from the history, exact save/load, and a
learning test on the square task (which only the image solves) with a blind control."""

import numpy as np
import pytest
import torch
from conftest import SQUARE_SPEC, square_windows
from torch import nn

from dapolicy.policies import UnsupportedByMethod, load_pretrained, make_config, make_policy
from dapolicy.policies.uva import UVAConfig, UVAPolicy
from dapolicy.spec import EnvSpec

SPEC = EnvSpec(name="test", cameras=("a", "b"), image_size=32, action_dim=3, proprio_dim=2, max_steps=10,
               action_low=(-1, -1, -1), action_high=(1, 1, 1))


def _randomise(module: nn.Module, seed: int = 0) -> None:
    """Zero-initialised heads and adaLN gates (identity start) hide wiring bugs; give every weight a value."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def _policy(**overrides) -> UVAPolicy:
    torch.manual_seed(0)
    policy = make_policy("uva", SPEC, make_config("uva", "tiny", overrides))
    _randomise(policy.model)
    return policy.eval()


def _obs(b=2, seed=0) -> dict:
    rng = np.random.default_rng(seed)
    return {"images": rng.integers(0, 255, (b, 2, 2, 32, 32, 3), dtype=np.uint8),
            "proprio": rng.normal(size=(b, 2, 2)).astype(np.float32)}


def _batch(b=4, seed=0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"latents": torch.randn(b, 2, 2, 4, 4, 4, generator=g),
            "next_latents": torch.randn(b, 2, 4, 4, 4, generator=g), "proprio": torch.randn(b, 2, 2, generator=g),
            "action": torch.rand(b, 16, 3, generator=g) * 2 - 1}


def test_stages_reuse_fms_vae_stage_and_train_the_joint_model_on_cached_latents():
    policy = _policy()
    vae, joint = policy.stages
    assert (vae.name, vae.layout, vae.changes_latents) == ("vae", "frames", True)
    assert (joint.name, joint.inputs, joint.sources, joint.success_only) == ("policy", ("latents",), ("expert",), True)
    assert policy.stage_module("vae") is policy.vae and policy.stage_module("policy") is policy.model
    assert policy.capabilities.predicts_next_obs and policy.capabilities.has_trace
    policy.train()
    out = policy.compute_loss(_batch(), "policy")
    assert set(out) == {"loss", "action_loss", "frame_loss"} and torch.isfinite(out["loss"])
    out["loss"].backward()
    assert all(p.grad is not None for p in policy.model.parameters() if p.requires_grad)
    images = torch.randint(0, 255, (3, 2, 32, 32, 3), dtype=torch.uint8)
    assert torch.isfinite(policy.compute_loss({"images": images}, "vae")["loss"])
    assert policy.after_stage("vae", images.numpy())["latent_scale"] > 0


def test_one_shared_tau_per_sample_unless_decoupled():
    seen = []
    for decouple in (False, True):
        policy = _policy(decouple_tau=decouple)
        forward = policy.model.forward
        policy.model.forward = lambda *args: seen.append((args[4], args[5])) or forward(*args)
        policy.compute_loss(_batch(8), "policy")
    (shared_z, shared_a), (own_z, own_a) = seen
    assert torch.equal(shared_z, shared_a) and not torch.equal(own_z, own_a)


def test_predict_chunk_shapes_frames_and_trace():
    policy = _policy()
    pred = policy.predict_chunk(_obs(3), return_next=True, return_trace=True, steps=3)
    assert pred.actions.shape == (3, 16, 3) and pred.actions.dtype == np.float32
    assert pred.next_frames.shape == (3, 2, 32, 32, 3) and pred.next_frames.dtype == np.uint8
    assert pred.trace["tau"] == [0.0, 1 / 3, 2 / 3]
    assert pred.trace["a_hat"].shape == (3, 3, 16, 3) and pred.trace["z_hat"].shape == (3, 3, 2, 4, 4, 4)
    assert policy.predict_chunk(_obs(3)).next_frames is None
    assert policy.next_obs_offset == policy.n_action_steps == 8


def test_errors_name_the_problem():
    policy = _policy()
    with pytest.raises(ValueError, match="next_latents"):
        policy.compute_loss({k: v for k, v in _batch().items() if k != "next_latents"}, "policy")
    bad = _batch()
    bad["latents"] = bad["latents"][:, :1]
    with pytest.raises(ValueError, match=r"history must be \[4, 2, 2, 4, 4, 4\]"):
        policy.compute_loss(bad, "policy")
    with pytest.raises(ValueError, match="no stage 'dynamics'"):
        policy.compute_loss(_batch(), "dynamics")
    with pytest.raises(UnsupportedByMethod, match="no generation mode 'jacobi'"):
        policy.predict_chunk(_obs(), mode="jacobi")
    with pytest.raises(ValueError, match="'images' has shape"):
        policy.predict_chunk({**_obs(), "images": np.zeros((2, 2, 1, 32, 32, 3), np.uint8)})
    with pytest.raises(ValueError, match="n_action_steps <= horizon"):
        UVAConfig(horizon=4, n_action_steps=8)
    with pytest.raises(ValueError, match="frame_loss_weight"):
        UVAConfig(frame_loss_weight=-1.0)
    with pytest.raises(ValueError, match="divisible by 16"):
        UVAPolicy(make_config("uva", "tiny"), EnvSpec(name="x", cameras=("a",), image_size=40, action_dim=2,
                                                     proprio_dim=2, max_steps=5))


def test_next_frame_depends_on_the_history_and_is_generated_jointly_with_the_actions():
    policy = _policy()
    b = _batch(2)
    history, proprio, action = b["latents"], b["proprio"], b["action"]
    z, tau = torch.randn(2, 2, 4, 4, 4), torch.full((2,), 0.4)
    with torch.no_grad():
        v_z, v_a = policy.model(history, proprio, z, action, tau, tau)
        v_z_other_history, v_a_other_history = policy.model(history.flip(0), proprio, z, action, tau, tau)
        v_z_other_action, _ = policy.model(history, proprio, z, action + 0.5, tau, tau)
        _, v_a_other_frame = policy.model(history, proprio, z + 0.5, action, tau, tau)
    assert not torch.allclose(v_z, v_z_other_history) and not torch.allclose(v_a, v_a_other_history)
    assert not torch.allclose(v_z, v_z_other_action) and not torch.allclose(v_a, v_a_other_frame)  # one sequence
    # Through the whole policy: the same noise and another history give another predicted frame.
    obs = _obs(2)
    frames = [policy.predict_chunk(o, return_next=True, generator=torch.Generator().manual_seed(0)).next_frames
              for o in (obs, {**obs, "images": obs["images"][::-1].copy()})]
    assert not np.array_equal(frames[0], frames[1][::-1])


def test_save_load_gives_identical_actions_and_frames(tmp_path):
    policy = _policy()
    policy.action_normalizer.fit(np.random.default_rng(0).normal(size=(50, 3)))
    loaded = load_pretrained(policy.save_pretrained(tmp_path / "m"))
    assert type(loaded) is UVAPolicy
    a, b = (p.predict_chunk(_obs(2), return_next=True, generator=torch.Generator().manual_seed(3))
            for p in (policy, loaded))
    np.testing.assert_array_equal(a.actions, b.actions)
    np.testing.assert_array_equal(a.next_frames, b.next_frames)


def test_init_from_an_fm_run_reuses_its_vae(square_store, tmp_path):
    """The "vae" stage is FM's (same stage name, same sizes per named config), so a UVA run can start from it."""
    from dapolicy.train import train

    fast = dict(config="tiny", steps=2, threads=1, progress=False, batch_size=4, device="cpu")
    fm = train(square_store, tmp_path / "fm", method="fm", **fast)
    uva = train(square_store, tmp_path / "uva", method="uva", init_from=fm, **fast)
    a, b = load_pretrained(fm).vae.state_dict(), load_pretrained(uva).vae.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------------------------- learning
def _train(policy: UVAPolicy, data: dict, stage: str, steps: int, lr: float, rng: np.random.Generator) -> list[dict]:
    """AdamW with a short warm-up and a linear decay on random minibatches of 16 (32 single frames for the VAE)."""
    module = policy.stage_module(stage)
    opt = torch.optim.AdamW(module.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min(1.0, (i + 1) / 20) * (1 - i / steps))
    policy.train()
    n, size = len(next(iter(data.values()))), 32 if stage == "vae" else 16
    logs = []
    for _ in range(steps):
        idx = torch.as_tensor(rng.integers(0, n, size))
        out = policy.compute_loss({k: v[idx] for k, v in data.items()}, stage)
        opt.zero_grad()
        out["loss"].backward()
        torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)
        opt.step()
        schedule.step()
        logs.append({k: v.item() for k, v in out.items()})
    return logs


def test_learns_the_square_task_from_the_image_and_does_clearly_worse_blind():
    """The proprio is constant, so only the history latents say where the square is. The VAE is trained once
    on the real frames; the joint model is then trained twice from the same initialisation: on the real
    frames (sighted) and on blank frames (blind, history and next frame alike)."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    # 1x1 latent patches: a 32 px image is a 4x4 latent, 2x2 patches would leave 4 tokens per frame.
    policy = make_policy("uva", SQUARE_SPEC, make_config("uva", "tiny", ["transformer.patch_size=1",
                                                                         "vae.blocks_per_level=[0, 0, 1, 1]"]))
    train, test = square_windows(256, seed=1), square_windows(64, seed=2)
    policy.fit_normalizer(type("Data", (), {"action": train["action"].reshape(-1, 2).numpy(),
                                            "proprio": train["proprio"].reshape(-1, 2).numpy()}))
    _train(policy, {"images": train["images"][:, -1]}, "vae", 100, 3e-3, rng)
    policy.after_stage("vae", train["images"][:, -1].numpy())
    init = {k: v.clone() for k, v in policy.model.state_dict().items()}
    span = (policy.action_normalizer.high - policy.action_normalizer.low).mean().item()

    results = {}
    for blind in (False, True):
        torch.manual_seed(1)
        policy.model.load_state_dict(init)
        tr, te = dict(train), dict(test)
        if blind:
            for d in (tr, te):
                d["images"], d["next_images"] = torch.zeros_like(d["images"]), torch.zeros_like(d["next_images"])
        data = {"latents": policy.encode_latents(tr["images"]),  # cached once, as the trainer does
                "next_latents": policy.encode_latents(tr["next_images"]), "proprio": tr["proprio"],
                "action": tr["action"]}
        logs = _train(policy, data, "policy", 300, 3e-3, np.random.default_rng(1))
        pred = policy.predict_chunk({"images": te["images"], "proprio": te["proprio"]}, return_next=True,
                                    generator=torch.Generator().manual_seed(0))
        err = np.abs(pred.actions - te["action"].numpy()).mean() / span
        results[blind] = (err, logs, pred, te)

    err, logs, pred, te = results[False]
    blind_err = results[True][0]
    for key in ("action_loss", "frame_loss"):
        start, end = np.mean([r[key] for r in logs[:10]]), np.mean([r[key] for r in logs[-20:]])
        assert end < 0.3 * start, f"sighted {key} did not fall clearly: {start:.3f} -> {end:.3f}"
    # Sighted: mean absolute error below 6% of the demonstrated action range (measured ~0.03); blind ~0.09.
    assert err < 0.06, f"the sampled chunk misses the demonstrated actions by {err:.3f} of the action range"
    assert blind_err > 2 * err, f"blanking the images should clearly hurt: sighted {err:.3f}, blind {blind_err:.3f}"
    # The generated next frame is where the square will be: in latent space it is much closer to the true next
    # frame than the current frame is (the square moves ~80% of the way to the centre in k = 8 steps).
    z_true = policy.encode_latents(te["next_images"])
    pred_gap = (policy.encode_latents(torch.as_tensor(pred.next_frames)) - z_true).abs().mean().item()
    copy_gap = (policy.encode_latents(te["images"][:, -1]) - z_true).abs().mean().item()
    assert pred_gap < 0.5 * copy_gap, f"predicted next frame is not nearer the truth: {pred_gap:.3f} vs {copy_gap:.3f}"
