"""The DDPM/DDIM noise scheduler of the Diffusion-Policy baselines: schedule, forward process, both reverse
samplers (exact with a perfect noise predictor; the right distribution with the exact one), and errors."""

import math

import pytest
import torch

from dapolicy.policies.diffusion import DiffusionConfig, NoiseScheduler, squared_cosine_betas


def _abar(s: float) -> float:
    return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2


def test_squared_cosine_schedule():
    sched = NoiseScheduler(DiffusionConfig())
    betas, abar = sched.betas, sched.alphas_cumprod
    assert betas.shape == abar.shape == (100,) and betas.dtype == torch.float64
    assert (betas > 0).all() and (betas <= 0.999).all() and betas[-1] == 0.999  # only the last one is capped
    assert (abar[1:] < abar[:-1]).all(), "alphas_cumprod must decrease strictly"
    assert abar[0] > 0.999 and abar[-1] < 1e-6
    # abar_t = abar((t+1)/T) / abar(0): the cosine curve itself, up to the capped last step
    expected = torch.tensor([_abar((t + 1) / 100) / _abar(0) for t in range(99)], dtype=torch.float64)
    assert torch.allclose(abar[:99], expected, rtol=1e-9)
    assert torch.equal(squared_cosine_betas(100), betas)


def test_add_noise_moments_and_shapes():
    sched = NoiseScheduler(DiffusionConfig())
    g = torch.Generator().manual_seed(0)
    x0 = torch.full((20000, 2), 0.5)
    noise = torch.randn(x0.shape, generator=g)
    for t in (0, 50, 99):
        xt = sched.add_noise(x0, noise, torch.full((20000,), t))
        a = float(sched.alphas_cumprod[t])
        assert abs(xt.mean().item() - 0.5 * math.sqrt(a)) < 0.02 and abs(xt.var().item() - (1 - a)) < 0.03
    with pytest.raises(ValueError, match=r"t must be \[B\]=3"):
        sched.add_noise(torch.zeros(3, 2), torch.zeros(3, 2), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"must be in \[0, 100\)"):
        sched.add_noise(torch.zeros(2, 2), torch.zeros(2, 2), torch.tensor([0, 100]))


def test_one_ddim_step_with_the_true_noise_moves_along_the_forward_process():
    sched = NoiseScheduler(DiffusionConfig())
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.rand(8, 16, 2, generator=g) * 2 - 1, torch.randn(8, 16, 2, generator=g)
    xt = sched.add_noise(x0, eps, torch.full((8,), 70))
    step = sched.ddim_step(eps, 70, 40, xt)
    assert torch.allclose(step, sched.add_noise(x0, eps, torch.full((8,), 40)), atol=1e-5)
    assert torch.allclose(sched.ddim_step(eps, 70, -1, xt), x0, atol=1e-4)  # the last step returns x0
    assert torch.allclose(sched.ddpm_step(eps, 70, -1, xt), x0, atol=1e-4)


@pytest.mark.parametrize("spacing", ["leading", "trailing"])
@pytest.mark.parametrize("steps", [1, 7, 10, 100])
def test_ddim_with_a_perfect_noise_predictor_returns_the_clean_sample(steps, spacing):
    sched = NoiseScheduler(DiffusionConfig(spacing=spacing))
    g = torch.Generator().manual_seed(2)
    x0 = torch.rand(4, 16, 2, generator=g) * 1.8 - 0.9

    def perfect(x, t):  # the noise that puts x on the forward path of x0 at time t
        a = sched.alphas_cumprod[t].float()[:, None, None]
        return (x - a.sqrt() * x0) / (1 - a).sqrt()

    out = sched.sample(perfect, torch.randn(x0.shape, generator=g), steps=steps, mode="ddim")
    assert torch.allclose(out, x0, atol=1e-3)  # float32: t = 99 divides by sqrt(abar) ~ 5e-4


def test_ddim_with_all_steps_and_ddpm_draw_the_data_mean_with_the_exact_noise_predictor():
    """Data N(mu, s^2): E[eps | x_t] is known in closed form, so each sampler's only error is its own."""
    sched = NoiseScheduler(DiffusionConfig(clip_sample=False))
    mu, s = torch.tensor([0.3, -0.6]), torch.tensor([0.2, 0.1])

    def exact(x, t):
        a = sched.alphas_cumprod[t].float()[:, None]
        return (1 - a).sqrt() * (x - a.sqrt() * mu) / (a * s**2 + 1 - a)

    g = torch.Generator().manual_seed(3)
    x_start = torch.randn(40000, 2, generator=g)
    ddim = sched.sample(exact, x_start, steps=100, mode="ddim")
    ddpm = sched.sample(exact, x_start, steps=100, mode="ddpm", generator=g)
    for name, out in (("ddim", ddim), ("ddpm", ddpm)):
        assert torch.allclose(out.mean(0), mu, atol=0.01), f"{name} mean {out.mean(0)} != {mu}"
        # Both shrink these narrow Gaussians a little at T = 100 (computed: 4-8% for DDIM's first-order
        # step, 7-13% for DDPM's fixed-small variance); a wrong coefficient is off by far more.
        assert torch.allclose(out.std(0), s, rtol=0.15), f"{name} std {out.std(0)} != {s}"
    assert torch.allclose(ddim.mean(0), ddpm.mean(0), atol=0.01)


def test_ddpm_is_reproducible_with_a_generator_and_ddim_is_deterministic():
    sched = NoiseScheduler(DiffusionConfig())
    x = torch.randn(3, 8, 2)

    def model(x, t):
        return 0.5 * x

    runs = [sched.sample(model, x, mode="ddpm", generator=torch.Generator().manual_seed(0)) for _ in range(2)]
    assert torch.equal(*runs)
    other = sched.sample(model, x, mode="ddpm", generator=torch.Generator().manual_seed(1))
    assert not torch.equal(runs[0], other)
    assert torch.equal(sched.sample(model, x, mode="ddim"), sched.sample(model, x, mode="ddim"))


def test_timesteps_and_errors():
    sched = NoiseScheduler(DiffusionConfig())
    assert sched.timesteps(10) == [90, 80, 70, 60, 50, 40, 30, 20, 10, 0]
    assert sched.timesteps(100) == list(range(99, -1, -1))
    assert NoiseScheduler(DiffusionConfig(spacing="trailing")).timesteps(10) == list(range(99, 0, -10))
    with pytest.raises(ValueError, match=r"sampling steps must be in \[1, 100\]"):
        sched.timesteps(101)
    with pytest.raises(ValueError, match="diffusion mode must be one of"):
        sched.sample(lambda x, t: x, torch.zeros(1, 2), mode="euler")
    with pytest.raises(ValueError, match="inference_steps must be in"):
        DiffusionConfig(inference_steps=200)
    with pytest.raises(ValueError, match="sampler must be one of"):
        DiffusionConfig(sampler="dpm")
    with pytest.raises(ValueError, match="spacing must be one of"):
        DiffusionConfig(spacing="linspace")
    with pytest.raises(ValueError, match="train_steps must be >= 1"):
        DiffusionConfig(train_steps=0)
