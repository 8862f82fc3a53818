"""pi0 stand-in: shapes and errors, the prefix/suffix block mask, the cached prefix, exact save/load, and a learning
test on the square task (which only the image solves) with a blind control."""

import numpy as np
import pytest
import torch
from conftest import SQUARE_SPEC, square_windows
from torch import nn

from dapolicy.policies import UnsupportedByMethod, load_pretrained, make_config, make_policy
from dapolicy.policies.base import images_to_float
from dapolicy.policies.pi0 import Pi0Config, Pi0Policy, Pi0TransformerConfig, prefix_suffix_mask
from dapolicy.spec import EnvSpec

SPEC = EnvSpec(name="test", cameras=("a", "b"), image_size=32, action_dim=3, proprio_dim=2, max_steps=10,
               action_low=(-1, -1, -1), action_high=(1, 1, 1))


def _randomise(module: nn.Module, seed: int = 0) -> None:
    """Give every weight a random value, so no path is silently zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def _policy(**overrides) -> Pi0Policy:
    torch.manual_seed(0)
    policy = make_policy("pi0", SPEC, make_config("pi0", "tiny", overrides))
    _randomise(policy.net)
    return policy.eval()


def _obs(b=2, seed=0) -> dict:
    rng = np.random.default_rng(seed)
    return {"images": rng.integers(0, 255, (b, 2, 2, 32, 32, 3), dtype=np.uint8),
            "proprio": rng.normal(size=(b, 2, 2)).astype(np.float32)}


def _batch(b=4, seed=0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"images": torch.randint(0, 255, (b, 2, 2, 32, 32, 3), generator=g, dtype=torch.uint8),
            "proprio": torch.randn(b, 2, 2, generator=g), "action": torch.rand(b, 16, 3, generator=g) * 2 - 1}


def _prefix_and_suffix(policy: Pi0Policy, b=2, action_shift=0.0) -> tuple[torch.Tensor, torch.Tensor]:
    batch = _batch(b)
    prefix = policy.prefix(batch, augment=False)
    g = torch.Generator().manual_seed(1)
    suffix = policy.net.suffix_tokens(torch.randn(b, 16, 3, generator=g) + action_shift, torch.full((b,), 0.3))
    return prefix, suffix


def test_one_stage_on_raw_images_and_the_beta_schedule_by_default():
    policy = _policy()
    (stage,) = policy.stages
    assert (stage.name, stage.inputs, stage.sources, stage.layout) == ("policy", ("images",), ("expert",), "windows")
    assert policy.stage_module("policy") is policy.net and policy.config.flow.tau_schedule == "beta"
    policy.train()
    out = policy.compute_loss(_batch(), "policy")
    assert torch.isfinite(out["loss"])
    out["loss"].backward()
    assert all(p.grad is not None for p in policy.net.parameters())  # the conv stem is trained end to end


def test_predict_chunk_shapes_and_trace():
    policy = _policy()
    pred = policy.predict_chunk(_obs(3), return_next=True, return_trace=True, steps=3)
    assert pred.actions.shape == (3, 16, 3) and pred.actions.dtype == np.float32
    assert pred.next_frames is None  # no frames: return_next is ignored for a method that does not predict them
    assert pred.trace["tau"] == [0.0, 1 / 3, 2 / 3] and pred.trace["a_hat"].shape == (3, 3, 16, 3)
    assert pred.trace["z_hat"] is None


def test_errors_name_the_problem():
    policy = _policy()
    with pytest.raises(ValueError, match="missing key 'images'"):
        policy.compute_loss({k: v for k, v in _batch().items() if k != "images"}, "policy")
    with pytest.raises(ValueError, match=r"images must be \[4, 2, 2, 3, 32, 32\]"):
        policy.net.prefix_tokens(torch.zeros(4, 2, 1, 3, 32, 32), torch.zeros(4, 2, 2))
    with pytest.raises(ValueError, match=r"noisy actions must be \[B, 16, 3\]"):
        policy.net.suffix_tokens(torch.zeros(4, 8, 3), torch.zeros(4))
    with pytest.raises(ValueError, match="no stage 'vae'"):
        policy.compute_loss(_batch(), "vae")
    with pytest.raises(UnsupportedByMethod, match="no generation mode"):
        policy.predict_chunk(_obs(), mode="jacobi")
    with pytest.raises(ValueError, match="divisible by heads"):
        Pi0TransformerConfig(width=30, heads=4)
    with pytest.raises(ValueError, match="n_action_steps <= horizon"):
        Pi0Config(horizon=4, n_action_steps=8)
    with pytest.raises(ValueError, match="stem's down-sampling 8"):
        Pi0Policy(make_config("pi0", "tiny"), EnvSpec(name="x", cameras=("a",), image_size=36, action_dim=2,
                                                     proprio_dim=2, max_steps=5))


def test_the_mask_blocks_prefix_to_suffix_attention():
    mask = prefix_suffix_mask(3, 2)
    assert mask[:3, :3].all() and not mask[:3, 3:].any() and mask[3:].all()
    policy = _policy()
    with torch.no_grad():
        prefix, suffix = _prefix_and_suffix(policy)
        _, other_suffix = _prefix_and_suffix(policy, action_shift=1.0)
        out_prefix, v = policy.net(prefix, suffix)
        out_prefix_other, v_other = policy.net(prefix, other_suffix)
        _, v_other_prefix = policy.net(prefix.flip(0), suffix)
    assert torch.equal(out_prefix, out_prefix_other)  # the prefix never sees the noisy actions
    assert not torch.allclose(v, v_other)
    assert not torch.allclose(v, v_other_prefix)  # ... but the actions see the prefix
    # Action tokens attend to each other: changing the first action changes the velocity of the last one.
    suffix_first = suffix.clone()
    suffix_first[:, 0] += torch.randn(suffix.shape[-1], generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        _, v_first = policy.net(prefix, suffix_first)
    assert not torch.allclose(v[:, -1], v_first[:, -1])


def test_cached_prefix_gives_the_masked_forward_and_is_computed_once_per_chunk():
    policy = _policy()
    with torch.no_grad():
        prefix, suffix = _prefix_and_suffix(policy)
        torch.testing.assert_close(policy.net.velocity(suffix, policy.net.prefix_cache(prefix)),
                                   policy.net(prefix, suffix)[1], atol=1e-5, rtol=1e-5)
    calls = {"stem": 0, "velocity": 0}
    policy.net.stem.register_forward_hook(lambda *_: calls.__setitem__("stem", calls["stem"] + 1))
    velocity = policy.net.velocity
    policy.net.velocity = lambda *a: calls.__setitem__("velocity", calls["velocity"] + 1) or velocity(*a)
    policy.predict_chunk(_obs(2), steps=5)
    assert calls == {"stem": 1, "velocity": 5}


def test_save_load_gives_identical_actions(tmp_path):
    policy = _policy()
    policy.action_normalizer.fit(np.random.default_rng(0).normal(size=(50, 3)))
    loaded = load_pretrained(policy.save_pretrained(tmp_path / "m"))
    assert type(loaded) is Pi0Policy
    a, b = (p.predict_chunk(_obs(2), generator=torch.Generator().manual_seed(3)).actions for p in (policy, loaded))
    np.testing.assert_array_equal(a, b)


# ---------------------------------------------------------------------------------------------- learning
def _train(policy: Pi0Policy, data: dict, steps: int, lr: float, rng: np.random.Generator) -> list[float]:
    """AdamW with a short warm-up and a linear decay on random minibatches of 16 windows."""
    module = policy.stage_module("policy")
    opt = torch.optim.AdamW(module.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min(1.0, (i + 1) / 20) * (1 - i / steps))
    policy.train()
    losses = []
    for _ in range(steps):
        idx = torch.as_tensor(rng.integers(0, len(data["action"]), 16))
        loss = policy.compute_loss({k: v[idx] for k, v in data.items()}, "policy")["loss"]
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)
        opt.step()
        schedule.step()
        losses.append(loss.item())
    return losses


def test_learns_the_square_task_from_the_image_and_does_clearly_worse_blind():
    """The proprio is constant, so only the image says where the square is. The same initialisation is trained
    on the real frames (sighted) and on blank frames (blind)."""
    train, test = square_windows(256, seed=1), square_windows(64, seed=2)
    errors = {}
    for blind in (False, True):
        torch.manual_seed(0)
        policy = make_policy("pi0", SQUARE_SPEC, make_config("pi0", "tiny"))
        policy.fit_normalizer(type("Data", (), {"action": train["action"].reshape(-1, 2).numpy(),
                                                "proprio": train["proprio"].reshape(-1, 2).numpy()}))
        tr, te = dict(train), dict(test)
        if blind:
            tr["images"], te["images"] = torch.zeros_like(tr["images"]), torch.zeros_like(te["images"])
        losses = _train(policy, tr, 200, 3e-3, np.random.default_rng(0))
        if not blind:
            start, end = np.mean(losses[:10]), np.mean(losses[-20:])
            assert end < 0.2 * start, f"sighted loss did not fall clearly: {start:.3f} -> {end:.3f}"
        actions = policy.predict_chunk({"images": te["images"], "proprio": te["proprio"]},
                                       generator=torch.Generator().manual_seed(0)).actions
        span = (policy.action_normalizer.high - policy.action_normalizer.low).mean().item()
        errors[blind] = np.abs(actions - te["action"].numpy()).mean() / span
    err, blind_err = errors[False], errors[True]
    # Sighted: mean absolute error below 6% of the demonstrated action range (measured ~0.03); blind ~0.09.
    assert err < 0.06, f"the sampled chunk misses the demonstrated actions by {err:.3f} of the action range"
    assert blind_err > 2 * err, f"blanking the images should clearly hurt: sighted {err:.3f}, blind {blind_err:.3f}"


def test_images_are_what_the_stem_reads():
    """The prefix's image tokens come from the raw pixels: another image gives other tokens, same proprio."""
    policy = _policy()
    batch = _batch(2)
    with torch.no_grad():
        a = policy.net.prefix_tokens(images_to_float(batch["images"]), batch["proprio"])
        b = policy.net.prefix_tokens(images_to_float(batch["images"].flip(0)), batch["proprio"])
    assert not torch.allclose(a[:, :-1], b[:, :-1]) and torch.equal(a[:, -1], b[:, -1])
