"""CrossAttnUNet1D: shapes, context dependence, the static-cache identity, batch independence, learning."""

import math

import pytest
import torch

from dapolicy.nn.unet1d import ContextCache, CrossAttnBlock1D, CrossAttnUNet1D, UNet1DConfig

A, CTX, H = 3, 16, 8


def tiny(**kw) -> CrossAttnUNet1D:
    torch.manual_seed(0)
    cfg = UNet1DConfig(down_dims=(16, 32), kernel_size=3, n_groups=4, tau_embed_dim=16, attn_heads=2, **kw)
    return CrossAttnUNet1D(cfg, action_dim=A, context_dim=CTX).eval()


def inputs(b: int = 2, m_static: int = 5, m_dyn: int = 4):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(b, H, A, generator=g)
    tau = torch.rand(b, generator=g)
    static = torch.randn(b, m_static, CTX, generator=g)
    dyn = torch.randn(b, m_dyn, CTX, generator=g)
    return x, tau, static, dyn


def test_output_shape_and_three_levels():
    net = tiny()
    x, tau, s, d = inputs()
    assert net(x, tau, static_tokens=s, dynamic_tokens=d).shape == x.shape
    cfg = UNet1DConfig(down_dims=(8, 16, 16), kernel_size=3, n_groups=4, tau_embed_dim=8, attn_heads=2)
    net3 = CrossAttnUNet1D(cfg, A, CTX)
    assert len(net3.context_layers()) == 6  # 3 down + mid + 2 up
    assert net3(torch.randn(1, 16, A), 0.5, static_tokens=s[:1]).shape == (1, 16, A)


def test_context_changes_output():
    net = tiny()
    x, tau, s, d = inputs()
    # a random perturbation (a constant offset would be removed by the context LayerNorm)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        base = net(x, tau, static_tokens=s, dynamic_tokens=d)
        other_dyn = net(x, tau, static_tokens=s, dynamic_tokens=d + torch.randn(d.shape, generator=g))
        other_static = net(x, tau, static_tokens=s + torch.randn(s.shape, generator=g), dynamic_tokens=d)
        other_tau = net(x, tau * 0.5, static_tokens=s, dynamic_tokens=d)
    for other in (other_dyn, other_static, other_tau):
        assert (other - base).abs().max() > 1e-4


def test_prepared_cache_matches_on_the_fly_projection():
    net = tiny()
    x, tau, s, d = inputs()
    with torch.no_grad():
        cache = net.prepare_context(s)
        assert isinstance(cache, ContextCache) and len(cache.kv) == len(net.context_layers())
        assert cache.batch_size == 2 and cache.num_tokens == 5
        cached = net(x, tau, static=cache, dynamic_tokens=d)
        fly = net(x, tau, static_tokens=s, dynamic_tokens=d)
        # the same as one group holding all tokens
        joint = net(x, tau, static_tokens=torch.cat([s, d], dim=1))
        dyn_cache = net(x, tau, static=cache, dynamic_tokens=net.prepare_context(d))
    torch.testing.assert_close(cached, fly, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(joint, fly, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dyn_cache, fly, rtol=1e-5, atol=1e-6)


def test_batch1_cache_broadcasts():
    net = tiny()
    x, tau, s, d = inputs()
    with torch.no_grad():
        cache = net.prepare_context(s[:1])
        out = net(x, tau, static=cache, dynamic_tokens=d)
        ref = net(x, tau, static_tokens=s[:1].expand(2, -1, -1), dynamic_tokens=d)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


def test_batch_independence():
    net = tiny()
    x, tau, s, d = inputs(b=3)
    with torch.no_grad():
        full = net(x, tau, static_tokens=s, dynamic_tokens=d)
        for i in range(3):
            one = net(x[i : i + 1], tau[i : i + 1], static_tokens=s[i : i + 1], dynamic_tokens=d[i : i + 1])
            torch.testing.assert_close(one, full[i : i + 1], rtol=1e-4, atol=1e-5)
    # gradients do not leak between samples either
    x = x.clone().requires_grad_(True)
    net(x, tau, static_tokens=s, dynamic_tokens=d)[0].sum().backward()
    assert x.grad[1:].abs().max() == 0


def test_invalid_inputs_raise():
    net = tiny()
    x, tau, s, d = inputs()
    with pytest.raises(ValueError, match="multiple of 2"):
        net(torch.randn(2, 7, A), tau, static_tokens=s)
    with pytest.raises(ValueError, match=r"\[B, H, 3\]"):
        net(torch.randn(2, H, A + 1), tau, static_tokens=s)
    with pytest.raises(ValueError, match="needs context"):
        net(x, tau)
    with pytest.raises(ValueError, match="not both"):
        net(x, tau, static=net.prepare_context(s), static_tokens=s)
    with pytest.raises(ValueError, match=r"\[B, M, 16\]"):
        net(x, tau, static_tokens=torch.randn(2, 5, CTX + 1))
    with pytest.raises(ValueError, match="batch"):
        net(x, tau, static_tokens=torch.randn(3, 5, CTX))
    with pytest.raises(ValueError, match="tau"):
        net(x, torch.rand(3), static_tokens=s)
    with pytest.raises(ValueError):
        UNet1DConfig(down_dims=(16, 30), n_groups=4)
    with pytest.raises(ValueError):
        UNet1DConfig(kernel_size=4)


def test_film_only_variant():
    torch.manual_seed(0)
    cfg = UNet1DConfig(down_dims=(16, 32), kernel_size=3, n_groups=4, tau_embed_dim=16, cross_attention=False)
    net = CrossAttnUNet1D(cfg, action_dim=A, context_dim=0, global_cond_dim=6)
    assert net.context_layers() == []
    x = torch.randn(2, H, A)
    g = torch.randn(2, 6)
    out = net(x, torch.rand(2), global_cond=g)
    assert out.shape == x.shape
    assert (net(x, torch.rand(2), global_cond=g + 1) - out).abs().max() > 1e-4
    with pytest.raises(ValueError, match="global_cond"):
        net(x, 0.3)


def test_overfits_context_dependent_target():
    """Same x and tau, two contexts -> two different targets: only the context can tell them apart."""
    torch.manual_seed(0)
    net = tiny().train()
    g = torch.Generator().manual_seed(3)
    ctx = torch.randn(2, 4, CTX, generator=g)
    target = torch.randn(2, H, A, generator=g)
    x = torch.randn(1, H, A, generator=g).expand(2, H, A)
    tau = torch.tensor(0.3)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    losses = []
    for _ in range(60):
        cache = net.prepare_context(ctx[:, :2])
        loss = (net(x, tau, static=cache, dynamic_tokens=ctx[:, 2:]) - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.01 * losses[0]  # typically ~5e-4 after 60 steps


def test_fast_cpu_inference_path_matches_training_path():
    """Under no_grad the convs use an im2col GEMM (and a rearranged transposed-conv weight); same numbers."""
    cfg = UNet1DConfig(down_dims=(8, 16, 16), kernel_size=5, n_groups=4, tau_embed_dim=8, attn_heads=2)
    torch.manual_seed(0)
    net = CrossAttnUNet1D(cfg, A, CTX)
    x, tau, s, d = inputs()
    x = torch.randn(2, 16, A)
    train_path = net(x, tau, static_tokens=s, dynamic_tokens=d)
    with torch.no_grad():
        fast = net(x, tau, static_tokens=s, dynamic_tokens=d)
    torch.testing.assert_close(fast, train_path.detach(), rtol=1e-5, atol=1e-5)
    # the cached transposed-conv weight follows in-place parameter updates
    with torch.no_grad():
        for lvl in net.ups:
            lvl.up.weight.mul_(-0.5)
        fast = net(x, tau, static_tokens=s, dynamic_tokens=d)
    torch.testing.assert_close(fast, net(x, tau, static_tokens=s, dynamic_tokens=d).detach(), rtol=1e-5, atol=1e-5)


def test_traced_inference_matches_eager_for_new_inputs():
    from dapolicy.nn.unet1d import TracedInference

    net = tiny()
    x, tau, s, d = inputs(b=1)
    fast = TracedInference(net)
    with torch.no_grad():
        cache = net.prepare_context(s)
        for step in range(3):  # the trace is reused: inputs must not be baked in
            x_k, d_k, t_k = x + step, d * (step + 1), 0.1 * step
            ref = net(x_k, t_k, static=cache, dynamic_tokens=d_k)
            torch.testing.assert_close(fast(x_k, t_k, static=cache, dynamic_tokens=d_k), ref, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(fast(x, 0.5, static=cache), net(x, 0.5, static=cache), rtol=1e-5, atol=1e-6)
    assert len(fast._traces) == 2


def test_gated_dynamic_context_starts_as_the_static_only_network_and_learns_to_open():
    """gate = 0: the dynamic tokens change nothing and the static attention is not diluted by them (the
    output equals the network given only the static tokens); a non-zero gate lets them in; the gate gets a
    gradient at 0, so training can open it."""
    net = tiny(gated_dynamic_context=True)
    x, tau, s, d = inputs()
    alone = net(x, tau, static_tokens=s)
    with_dyn = net(x, tau, static_tokens=s, dynamic_tokens=d)
    torch.testing.assert_close(with_dyn, alone, rtol=0, atol=1e-6)
    net.mid_attn.attn.out.bias.data.normal_()  # make the attention's output non-trivial
    loss = net(x, tau, static_tokens=s, dynamic_tokens=d).pow(2).sum()
    loss.backward()
    assert float(net.mid_attn.gate.grad.abs()) > 0
    with torch.no_grad():
        net.mid_attn.gate.fill_(0.5)
    assert not torch.allclose(net(x, tau, static_tokens=s, dynamic_tokens=d), net(x, tau, static_tokens=s))
    joint = tiny()  # the default: one softmax over both groups, so the dynamic tokens always matter
    assert not torch.allclose(joint(x, tau, static_tokens=s, dynamic_tokens=d), joint(x, tau, static_tokens=s))


def test_gates_can_start_open_and_the_option_needs_the_gated_attention():
    """`dynamic_gate_init` sets every gate (the prediction is used from the first step, tanh 2 = 0.96); the
    static-only output then differs; without the gated attention there is no gate to set, which is an error."""
    net = tiny(gated_dynamic_context=True, dynamic_gate_init=2.0)
    gates = [m.gate for m in net.modules() if isinstance(m, CrossAttnBlock1D)]
    assert gates and all(float(g.detach()) == 2.0 for g in gates)
    x, tau, s, d = inputs()
    assert not torch.allclose(net(x, tau, static_tokens=s, dynamic_tokens=d), net(x, tau, static_tokens=s))
    with pytest.raises(ValueError, match="dynamic_gate_init needs gated_dynamic_context"):
        tiny(dynamic_gate_init=1.0)
    with pytest.raises(ValueError, match="finite"):
        tiny(gated_dynamic_context=True, dynamic_gate_init=float("nan"))


def test_a_gate_scale_multiplies_how_far_adam_moves_a_gate_and_keeps_its_start():
    """dynamic_gate_scale s: the gate starts at tanh(dynamic_gate_init) whatever s, and one Adam step (which moves a
    parameter by ~lr whatever its gradient) moves the gate's weight s times as far."""
    x, tau, s, d = inputs()
    moved = {}
    for scale in (1.0, 10.0):
        net = tiny(gated_dynamic_context=True, dynamic_gate_scale=scale, dynamic_gate_init=0.5)
        net.train()
        assert net.prediction_gates() == pytest.approx([math.tanh(0.5)] * len(net.prediction_gates()))
        gates = [m.gate for m in net.modules() if isinstance(m, CrossAttnBlock1D)]
        opt = torch.optim.Adam(gates, lr=1e-3)
        net(x, tau, static_tokens=s, dynamic_tokens=d).pow(2).sum().backward()
        opt.step()
        moved[scale] = abs(net.prediction_gates()[0] - math.tanh(0.5))
    assert moved[10.0] == pytest.approx(10 * moved[1.0], rel=0.05)
    with pytest.raises(ValueError, match="dynamic_gate_scale needs gated_dynamic_context"):
        tiny(dynamic_gate_scale=3.0)
    with pytest.raises(ValueError, match="positive"):
        tiny(gated_dynamic_context=True, dynamic_gate_scale=0.0)
