"""Latent dynamics DiT: shapes, identity start, action conditioning, condition dropout, batch independence."""

import pytest
import torch
from torch import nn

from dapolicy import flow
from dapolicy.nn.dit import DiTConfig, LatentDynamicsDiT, sincos_2d_embedding

CAMS, C, S, H, A, P = 2, 4, 4, 4, 3, 5
TINY = DiTConfig(hidden_dim=32, depth=2, heads=2)


def make(cfg: DiTConfig = TINY, randomise: bool = True, proprio_dim: int = P, **kw) -> LatentDynamicsDiT:
    torch.manual_seed(0)
    model = LatentDynamicsDiT(cfg, CAMS, C, kw.pop("latent_size", S), A, H, proprio_dim, **kw).eval()
    if randomise:  # adaLN-Zero makes the fresh network output exactly 0: perturb every parameter
        for p in model.parameters():
            nn.init.normal_(p, std=0.2)
    return model


def inputs(b: int = 3, seed: int = 1, hw: tuple[int, int] = (S, S)):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(b, CAMS, C, *hw, generator=g)
    cur = torch.randn(b, CAMS, C, *hw, generator=g)
    tau = torch.rand(b, generator=g)
    act = torch.randn(b, H, A, generator=g)
    prop = torch.randn(b, P, generator=g)
    return z, tau, cur, act, prop


def test_output_shape_and_zero_at_init():
    model = make(randomise=False)
    z, tau, cur, act, prop = inputs()
    out = model(z, tau, cur, act, prop)
    assert out.shape == z.shape
    assert torch.count_nonzero(out) == 0  # adaLN-Zero + zero final layer: identity blocks, zero velocity


def test_non_square_latent_and_scalar_tau():
    model = make(latent_size=(4, 6))
    z, _, cur, act, prop = inputs(b=2, hw=(4, 6))
    out = model(z, torch.tensor(0.3), cur, act, prop)
    assert out.shape == (2, CAMS, C, 4, 6)
    assert torch.allclose(out, model(z, torch.full((2,), 0.3), cur, act, prop))


def test_patchify_unpatchify_round_trip():
    model = make(latent_size=(4, 6))
    z, _, cur, _, _ = inputs(b=2, hw=(4, 6))
    tokens = model.patchify(z, cur)
    p = TINY.patch_size
    assert tokens.shape == (2, CAMS * 2 * 3, 2 * C * p * p)
    assert torch.equal(model.unpatchify(tokens[..., : C * p * p]), z)


def test_action_changes_output_and_is_deterministic():
    model = make()
    z, tau, cur, act, prop = inputs()
    with torch.no_grad():
        a = model(z, tau, cur, act, prop)
        b = model(z, tau, cur, act + 1.0, prop)
        assert torch.equal(a, model(z, tau, cur, act.clone(), prop))
        assert (a - b).abs().amax(dim=(1, 2, 3, 4)).min() > 1e-3  # every sample reacts
        # the other inputs matter too
        for other in (model(z, tau + 0.2, cur, act, prop), model(z, tau, cur + 1, act, prop),
                      model(z, tau, cur, act, prop + 1)):
            assert not torch.allclose(a, other)


def test_drop_action_ignores_action_and_matches_null_path():
    model = make()
    z, tau, cur, act, prop = inputs()
    drop = torch.ones(3, dtype=torch.bool)
    with torch.no_grad():
        null = model(z, tau, cur, None, prop)
        assert torch.equal(model(z, tau, cur, act, prop, drop_action=drop), null)
        assert torch.equal(model(z, tau, cur, act * 5 - 2, prop, drop_action=drop), null)
        with_action = model(z, tau, cur, act, prop)
        mixed = model(z, tau, cur, act, prop, drop_action=torch.tensor([True, False, True]))
    assert torch.allclose(mixed[[0, 2]], null[[0, 2]], atol=1e-6)
    assert torch.allclose(mixed[1], with_action[1], atol=1e-6)
    assert not torch.allclose(null, with_action)


def test_batch_independence():
    model = make()
    z, tau, cur, act, prop = inputs(b=4)
    z2, tau2, cur2, act2, prop2 = inputs(b=4, seed=7)
    keep = torch.tensor([True, False, False, False])[:, None]
    mix = lambda x, y: torch.where(keep.view(-1, *([1] * (x.dim() - 1))), x, y)  # noqa: E731
    with torch.no_grad():
        a = model(z, tau, cur, act, prop, drop_action=torch.tensor([False, True, False, True]))
        b = model(mix(z, z2), mix(tau[:, None], tau2[:, None])[:, 0], mix(cur, cur2), mix(act, act2),
                  mix(prop, prop2), drop_action=torch.tensor([False, False, True, True]))
        single = model(z[:1], tau[:1], cur[:1], act[:1], prop[:1])
    assert torch.allclose(a[0], b[0], atol=1e-5)
    assert torch.allclose(a[0], single[0], atol=1e-5)


def test_without_proprio_token():
    model = make(proprio_dim=0)
    z, tau, cur, act, _ = inputs()
    with torch.no_grad():
        assert model(z, tau, cur, act, None).shape == z.shape
        assert not torch.allclose(model(z, tau, cur, act, None), model(z, tau, cur, None, None))


@pytest.mark.parametrize(
    "change",
    [
        {"z": torch.zeros(3, CAMS, C, S, S + 2)},
        {"z": torch.zeros(3, CAMS + 1, C, S, S)},
        {"cur": torch.zeros(2, CAMS, C, S, S)},
        {"tau": torch.zeros(2)},
        {"act": torch.zeros(3, H + 1, A)},
        {"prop": None},
        {"prop": torch.zeros(3, P + 1)},
        {"drop": torch.zeros(3)},
    ],
)
def test_bad_inputs_raise(change):
    model = make(randomise=False)
    z, tau, cur, act, prop = inputs()
    args = {"z": z, "tau": tau, "cur": cur, "act": act, "prop": prop, "drop": None} | change
    with pytest.raises(ValueError):
        model(args["z"], args["tau"], args["cur"], args["act"], args["prop"], drop_action=args["drop"])


def test_config_and_constructor_validation():
    with pytest.raises(ValueError):
        DiTConfig(hidden_dim=30, heads=4)
    with pytest.raises(ValueError):
        DiTConfig(dropout=1.0)
    with pytest.raises(ValueError, match="patch_size"):
        LatentDynamicsDiT(DiTConfig(hidden_dim=32, heads=2, patch_size=3), CAMS, C, 4, A, H, P)


def test_sincos_embedding_is_distinct_per_position():
    emb = sincos_2d_embedding(32, 3, 4)
    assert emb.shape == (12, 32)
    assert torch.cdist(emb, emb).add(torch.eye(12) * 10).min() > 0.1


def test_learned_pos_embed_is_a_parameter():
    model = make(DiTConfig(hidden_dim=32, depth=2, heads=2, learned_pos_embed=True))
    assert "pos_embed" in dict(model.named_parameters())
    assert "pos_embed" not in dict(make().named_parameters())  # fixed sin-cos buffer by default


@pytest.mark.slow  # the first torch.utils.checkpoint call imports torch._dynamo (~5 s, once per session)
def test_grad_checkpoint_gives_the_same_gradients():
    base = make()
    ckpt = make(DiTConfig(hidden_dim=32, depth=2, heads=2, grad_checkpoint=True))
    ckpt.load_state_dict(base.state_dict())
    base.train(), ckpt.train()
    z, tau, cur, act, prop = inputs()
    drop = torch.tensor([False, True, False])
    base(z, tau, cur, act, prop, drop).square().mean().backward()
    ckpt(z, tau, cur, act, prop, drop).square().mean().backward()
    for (name, p), q in zip(base.named_parameters(), ckpt.parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-5), name


def test_learns_an_action_dependent_shift():
    """Next latent = current + per-camera shift given by the mean action: the flow loss must fall."""
    torch.manual_seed(0)
    model = LatentDynamicsDiT(TINY, CAMS, C, S, A, H, P).train()
    g = torch.Generator().manual_seed(3)
    cur = torch.randn(16, CAMS, C, S, S, generator=g)
    act = torch.randn(16, H, A, generator=g)
    nxt = cur + act.mean(dim=(1, 2))[:, None, None, None, None]
    prop = torch.randn(16, P, generator=g)
    tau = flow.sample_tau(16, flow.FlowConfig(), generator=g)
    x_tau, target = flow.training_pair(nxt, tau, generator=g)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        loss = flow.flow_loss(model(x_tau, tau, cur, act, prop), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses[::10]


def count(cfg: DiTConfig, cams: int = 2, latent: int = 8, action_dim: int = 4, horizon: int = 16) -> int:
    with torch.device("meta"):  # no memory, no init cost: paper scale is cheap to count
        model = LatentDynamicsDiT(cfg, cams, 4, latent, action_dim, horizon, 8)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_parameter_counts_scale():
    tiny = count(DiTConfig(hidden_dim=48, depth=2, heads=4))
    small = count(DiTConfig(hidden_dim=192, depth=4, heads=4))
    paper = count(DiTConfig(hidden_dim=768, depth=12, heads=12))
    assert tiny < 200_000
    assert 2_000_000 < small < 5_000_000
    assert 130_000_000 < paper < 180_000_000
