"""The DDPM/DDIM noise scheduler of the Diffusion-Policy baselines (DP-C, DP-T): the diffusion counterpart of
`flow.py`, and the only place that convention lives.

Discrete times t = 0 .. T-1 (t = 0 is nearly clean, T-1 is nearly pure noise), squared-cosine betas
(Nichol & Dhariwal 2021, diffusers' "squaredcos_cap_v2", beta capped at 0.999), epsilon prediction:
    forward       x_t = sqrt(abar_t) * x0 + sqrt(1 - abar_t) * eps
    x0 estimate   x0_hat = (x_t - sqrt(1 - abar_t) * eps_hat) / sqrt(abar_t)   (clipped to [-1, 1])
    DDPM step     the posterior q(x_prev | x_t, x0_hat), mean + fixed-small variance (ancestral sampling)
    DDIM step     x_prev = sqrt(abar_prev) * x0_hat + sqrt(1 - abar_prev) * eps_hat   (eta = 0, deterministic)
Both steps go from any t to any earlier prev, so either sampler runs on any number of steps <= T, visiting
times T // steps apart: diffusers' "leading" spacing as Diffusion Policy used, or "trailing" (from T-1).
After the last step abar_prev = 1 ("set_alpha_to_one"), so the sampler returns the clean estimate.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

DIFFUSION_MODES: tuple[str, ...] = ("ddim", "ddpm")
SPACINGS: tuple[str, ...] = ("leading", "trailing")
MAX_BETA = 0.999

EpsilonFn = Callable[[Tensor, Tensor], Tensor]  # (x_t [B, ...], t [B] long) -> predicted noise


@dataclass
class DiffusionConfig:
    """Training and sampling of a denoising-diffusion policy.

    train_steps: T, diffusion steps of the forward process (Diffusion Policy: 100).
    sampler: the default generation mode, "ddim" (deterministic, few steps) or "ddpm" (ancestral).
    inference_steps: DDIM steps when none are given (Diffusion Policy: 10 for DDIM). DDPM defaults to all T.
    spacing: which T // steps-strided times the sampler visits: "leading" (k * stride, as Diffusion Policy)
        or "trailing" (ending at T-1, so few-step sampling starts from pure noise).
    clip_sample: clip the x0 estimate to [-1, 1] at every step (actions are normalised to that range).
    """

    train_steps: int = 100
    sampler: str = "ddim"
    inference_steps: int = 10
    spacing: str = "leading"
    clip_sample: bool = True

    def __post_init__(self) -> None:
        if self.train_steps < 1:
            raise ValueError(f"diffusion train_steps must be >= 1, got {self.train_steps}")
        if self.sampler not in DIFFUSION_MODES:
            raise ValueError(f"diffusion sampler must be one of {DIFFUSION_MODES}, got {self.sampler!r}")
        if not 1 <= self.inference_steps <= self.train_steps:
            raise ValueError(f"diffusion inference_steps must be in [1, train_steps={self.train_steps}], "
                             f"got {self.inference_steps}")
        if self.spacing not in SPACINGS:
            raise ValueError(f"diffusion spacing must be one of {SPACINGS}, got {self.spacing!r}")


def squared_cosine_betas(train_steps: int) -> Tensor:
    """beta_t = 1 - abar((t+1)/T) / abar(t/T), abar(s) = cos((s + 0.008) / 1.008 * pi / 2)^2, capped at 0.999.

    float64 on the CPU (explicitly, so a model built under `torch.device("meta")` still has real tables).
    """
    def abar(s: float) -> float:
        return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = [min(1.0 - abar((i + 1) / train_steps) / abar(i / train_steps), MAX_BETA) for i in range(train_steps)]
    return torch.tensor(betas, dtype=torch.float64, device="cpu")


def _per_sample(values: Tensor, like: Tensor) -> Tensor:
    """[B] -> [B, 1, ...] broadcastable against `like`, in its dtype and device."""
    return values.to(like.device, like.dtype).reshape(-1, *([1] * (like.dim() - 1)))


class NoiseScheduler:
    """Squared-cosine DDPM forward process with DDPM and DDIM reverse steps (no parameters, nothing to save)."""

    def __init__(self, config: DiffusionConfig) -> None:
        self.config = config
        self.betas = squared_cosine_betas(config.train_steps)
        self.alphas_cumprod = torch.cumprod(1.0 - self.betas, dim=0)
        self._abar_cache: dict[str, Tensor] = {}

    @property
    def train_steps(self) -> int:
        return self.config.train_steps

    # ------------------------------------------------------------------ training
    def sample_timesteps(self, batch_size: int, device: torch.device | str = "cpu",
                         generator: torch.Generator | None = None) -> Tensor:
        """Training times t ~ U{0, ..., T-1}, long [B]."""
        return torch.randint(0, self.train_steps, (batch_size,), device=device, generator=generator)

    def add_noise(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, per-sample t (long [B])."""
        if t.dim() != 1 or t.shape[0] != x0.shape[0]:
            raise ValueError(f"t must be [B]={x0.shape[0]} diffusion steps, got {tuple(t.shape)}")
        self._check_range(t)
        abar = self._abar_on(t.device)[t]
        return _per_sample(abar.sqrt(), x0) * x0 + _per_sample((1.0 - abar).sqrt(), x0) * noise

    def _abar_on(self, device: torch.device) -> Tensor:
        """alphas_cumprod on `device`, copied once per device rather than at every training step."""
        key = str(device)
        if key not in self._abar_cache:
            self._abar_cache[key] = self.alphas_cumprod.to(device)
        return self._abar_cache[key]

    # ------------------------------------------------------------------ sampling
    def timesteps(self, steps: int) -> list[int]:
        """The `steps` times the sampler visits, descending, stride T // steps."""
        if not 1 <= steps <= self.train_steps:
            raise ValueError(f"sampling steps must be in [1, {self.train_steps}] (the diffusion train_steps), "
                             f"got {steps}")
        stride = self.train_steps // steps
        if self.config.spacing == "trailing":
            return [self.train_steps - 1 - k * stride for k in range(steps)]
        return [k * stride for k in reversed(range(steps))]

    def _abar(self, t: int) -> float:
        return float(self.alphas_cumprod[t]) if t >= 0 else 1.0

    def predict_x0(self, x: Tensor, eps: Tensor, t: int) -> Tensor:
        """The clean estimate implied by a noise prediction (clipped with `clip_sample`)."""
        abar = self._abar(t)
        x0 = (x - math.sqrt(1.0 - abar) * eps) / math.sqrt(abar)
        return x0.clamp(-1.0, 1.0) if self.config.clip_sample else x0

    def ddim_step(self, eps: Tensor, t: int, prev_t: int, x: Tensor) -> Tensor:
        """Deterministic DDIM (eta = 0) from time t to prev_t (< 0 = the end: returns the clean estimate)."""
        x0 = self.predict_x0(x, eps, t)
        abar_prev = self._abar(prev_t)
        return math.sqrt(abar_prev) * x0 + math.sqrt(1.0 - abar_prev) * eps

    def ddpm_step(self, eps: Tensor, t: int, prev_t: int, x: Tensor, noise: Tensor | None = None) -> Tensor:
        """Ancestral DDPM from t to prev_t: posterior mean given x0_hat, + sqrt(variance) * noise if prev_t >= 0.

        noise: the standard normal draw (None = no noise, i.e. the posterior mean).
        """
        abar, abar_prev = self._abar(t), self._abar(prev_t)
        alpha = abar / abar_prev  # of the (possibly strided) step
        beta = 1.0 - alpha
        x0 = self.predict_x0(x, eps, t)
        coef_x0 = math.sqrt(abar_prev) * beta / (1.0 - abar)
        coef_x = math.sqrt(alpha) * (1.0 - abar_prev) / (1.0 - abar)
        mean = coef_x0 * x0 + coef_x * x
        if prev_t < 0 or noise is None:
            return mean
        variance = max((1.0 - abar_prev) / (1.0 - abar) * beta, 1e-20)
        return mean + math.sqrt(variance) * noise

    def sample(self, eps_fn: EpsilonFn, x: Tensor, steps: int | None = None, mode: str | None = None,
               generator: torch.Generator | None = None) -> Tensor:
        """Run the reverse process from x = x_T ~ N(0, I) with `mode` ("ddim" / "ddpm", None = the config's).

        steps: None = inference_steps for DDIM, all T for DDPM. eps_fn(x_t, t [B] long) -> predicted noise.
        """
        mode = mode or self.config.sampler
        if mode not in DIFFUSION_MODES:
            raise ValueError(f"diffusion mode must be one of {DIFFUSION_MODES}, got {mode!r}")
        if steps is None:
            steps = self.config.inference_steps if mode == "ddim" else self.train_steps
        times = self.timesteps(steps)
        for t, prev_t in zip(times, [*times[1:], -1]):
            eps = eps_fn(x, torch.full((x.shape[0],), t, dtype=torch.long, device=x.device))
            if mode == "ddim":
                x = self.ddim_step(eps, t, prev_t, x)
            else:
                noise = None if prev_t < 0 else torch.randn(x.shape, generator=generator, device=x.device,
                                                            dtype=x.dtype)
                x = self.ddpm_step(eps, t, prev_t, x, noise)
        return x

    def _check_range(self, t: Tensor) -> None:
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= self.train_steps):
            raise ValueError(f"diffusion steps must be in [0, {self.train_steps}), "
                             f"got values in [{int(t.min())}, {int(t.max())}]")
