"""The one flow-matching convention of the project (docs/method.md, "Flow matching").

No other module re-derives it.

tau in [0, 1]: tau = 0 is pure noise, tau = 1 is data.
    path          x_tau = (1 - tau) * eps + tau * x1,   eps ~ N(0, I)
    target        u = x1 - eps
    Euler step    x_{tau + dt} = x_tau + dt * v
    extrapolation x1_hat(tau) = x_tau + (1 - tau) * v(x_tau, tau)

For the optimal field v*(x, tau) = E[u | x_tau = x], the extrapolation is E[x1 | x_tau]: the posterior-mean
("clean") estimate that DAP hands from one model to the other at every step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

TauSchedule = Literal["uniform", "beta"]


@dataclass
class FlowConfig:
    """How training times are drawn and how sampling integrates.

    steps: K, the number of Euler steps at inference.
    tau_schedule: "uniform" draws tau ~ U(0, 1); "beta" draws tau from Beta(beta_a, beta_b), which with
        the defaults puts more weight on noisy times (as in pi0).
    """

    steps: int = 10
    tau_schedule: TauSchedule = "uniform"
    beta_a: float = 1.5
    beta_b: float = 1.0

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"flow steps must be >= 1, got {self.steps}")
        if self.tau_schedule not in ("uniform", "beta"):
            raise ValueError(f"tau_schedule must be 'uniform' or 'beta', got {self.tau_schedule!r}")


def _broadcast(tau: Tensor, like: Tensor) -> Tensor:
    """Reshape a per-sample tau [B] so it broadcasts against x [B, ...]."""
    return tau.reshape(tau.shape[0], *([1] * (like.dim() - 1))).to(like.dtype)


def sample_tau(batch_size: int, cfg: FlowConfig, device: torch.device | str = "cpu",
               generator: torch.Generator | None = None) -> Tensor:
    """Training times tau for one batch."""
    if cfg.tau_schedule == "uniform":
        return torch.rand(batch_size, device=device, generator=generator)
    # Beta(a, b) on the noise side: tau = 1 - Beta(a, b) sample (pi0 style); inverse-CDF-free via Gamma.
    beta = torch.distributions.Beta(torch.tensor(cfg.beta_a), torch.tensor(cfg.beta_b))
    return (1.0 - beta.sample((batch_size,))).to(device)


def interpolate(x1: Tensor, noise: Tensor, tau: Tensor) -> Tensor:
    """Point x_tau on the straight path from noise (tau = 0) to data (tau = 1)."""
    t = _broadcast(tau, x1)
    return (1.0 - t) * noise + t * x1


def velocity_target(x1: Tensor, noise: Tensor) -> Tensor:
    """Regression target u = x1 - eps of the velocity field."""
    return x1 - noise


def training_pair(x1: Tensor, tau: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Draw noise and return (x_tau, target velocity) for a batch of clean samples x1."""
    noise = torch.randn(x1.shape, device=x1.device, dtype=x1.dtype, generator=generator)
    return interpolate(x1, noise, tau), velocity_target(x1, noise)


def euler_step(x: Tensor, velocity: Tensor, dt: float) -> Tensor:
    """One explicit Euler step x + dt * v."""
    return x + dt * velocity


def extrapolate(x: Tensor, velocity: Tensor, tau: Tensor | float) -> Tensor:
    """Clean-sample estimate x1_hat = x_tau + (1 - tau) * v(x_tau, tau)."""
    if isinstance(tau, Tensor) and tau.dim() > 0:
        tau = _broadcast(tau, x)
    return x + (1.0 - tau) * velocity


def time_grid(steps: int) -> list[float]:
    """The K start times tau_k = k / K of the Euler steps."""
    return [k / steps for k in range(steps)]


def flow_loss(pred_velocity: Tensor, target: Tensor, mask: Tensor | None = None) -> Tensor:
    """Mean squared velocity error; `mask` (broadcastable, 1 = counts) excludes padded entries."""
    err = (pred_velocity - target) ** 2
    if mask is None:
        return err.mean()
    mask = mask.to(err.dtype).expand_as(err)
    return (err * mask).sum() / mask.sum().clamp_min(1.0)


def per_sample_flow_error(pred_velocity: Tensor, target: Tensor) -> Tensor:
    """Mean squared velocity error of each sample [B] (`flow_loss` before averaging over the batch)."""
    return ((pred_velocity - target) ** 2).flatten(1).mean(dim=1)
