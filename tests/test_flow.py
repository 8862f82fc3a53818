"""The flow convention: path, target, Euler, and the extrapolation identity DAP relies on."""

import torch

from dapolicy import flow


def test_path_endpoints_and_target():
    x1, eps = torch.randn(5, 3), torch.randn(5, 3)
    assert torch.allclose(flow.interpolate(x1, eps, torch.zeros(5)), eps)
    assert torch.allclose(flow.interpolate(x1, eps, torch.ones(5)), x1)
    # Following the target velocity from noise for a unit of time lands exactly on the data.
    assert torch.allclose(flow.euler_step(eps, flow.velocity_target(x1, eps), 1.0), x1)


def test_extrapolation_at_last_step_equals_euler_update():
    k = 10
    x, v = torch.randn(4, 16, 2), torch.randn(4, 16, 2)
    tau_last = flow.time_grid(k)[-1]
    assert abs(tau_last - (k - 1) / k) < 1e-12
    assert torch.allclose(flow.extrapolate(x, v, tau_last), flow.euler_step(x, v, 1.0 / k), atol=1e-6)


def test_extrapolating_the_optimal_field_gives_the_posterior_mean():
    """For x1 ~ N(mu, s^2) the optimal velocity is known in closed form; extrapolating it must give
    E[x1 | x_tau]. The posterior mean is also estimated by Monte Carlo (linear regression of x1 on x_tau),
    so a wrong path or target convention fails."""
    torch.manual_seed(0)
    mu, s = 1.5, 0.5
    n = 400_000
    x1 = mu + s * torch.randn(n, dtype=torch.float64)
    eps = torch.randn(n, dtype=torch.float64)
    for tau in (0.1, 0.5, 0.9):
        t = torch.full((n,), tau, dtype=torch.float64)
        x = flow.interpolate(x1, eps, t)
        var = (1 - tau) ** 2 + tau**2 * s**2
        resid = x - tau * mu
        e_x1 = mu + tau * s**2 / var * resid
        e_eps = (1 - tau) / var * resid
        v_opt = e_x1 - e_eps
        x1_hat = flow.extrapolate(x, v_opt, t)
        assert torch.allclose(x1_hat, e_x1, atol=1e-9)
        # Monte-Carlo posterior mean: least-squares fit x1 ~ a + b x_tau.
        design = torch.stack([torch.ones(n, dtype=torch.float64), x], dim=1)
        coef = torch.linalg.lstsq(design, x1[:, None]).solution.squeeze()
        probe = torch.tensor([-1.0, 0.0, 2.0], dtype=torch.float64)
        mc = coef[0] + coef[1] * probe
        closed = mu + tau * s**2 / var * (probe - tau * mu)
        assert torch.allclose(mc, closed, atol=0.01), (tau, mc, closed)


def test_flow_loss_mask_excludes_padding():
    pred, target = torch.zeros(2, 4, 1), torch.ones(2, 4, 1)
    target[:, 2:] = 100.0
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 0, 0]], dtype=torch.bool)[..., None]
    assert flow.flow_loss(pred, target, mask).item() == 1.0


def test_tau_schedules_in_range():
    for sched in ("uniform", "beta"):
        tau = flow.sample_tau(1000, flow.FlowConfig(tau_schedule=sched))
        assert tau.min() >= 0 and tau.max() <= 1
    beta = flow.sample_tau(20000, flow.FlowConfig(tau_schedule="beta"))
    assert beta.mean() < 0.5  # weighted towards the noisy end
