"""Coupled generation of the action chunk and the predicted next observation (DESIGN §1.5, Algorithm 1).

The two models are passed in as velocity functions, so this module holds only the algorithm:
    dynamics_velocity(Z, tau, A_hat | None) -> v_Z     (None = the action-agnostic / null condition)
    policy_velocity(A, tau, Z_hat | None)   -> v_A     (None = the null next-observation tokens)

This is the readable reference. `predict_chunk` samples with `policies/fast_sampler.py`, which computes the
same numbers with the per-call constants hoisted, the unused last dynamics call skipped and the two calls of a
Jacobi step run concurrently; tests/policies/test_fast_sampler.py holds the two to the same results.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from torch import Tensor

from dapolicy.flow import euler_step, extrapolate, time_grid

VelocityFn = Callable[[Tensor, float, "Tensor | None"], Tensor]

#: Generation modes of a coupled policy; the first is the default.
COUPLING_MODES: tuple[str, ...] = ("jacobi", "gauss_seidel", "predict_then_act", "off")


@dataclass
class CouplingTrace:
    """Per-step extrapolations, for diagnostics (Fig. 2): taus[k], z_hat[k], a_hat[k]."""

    taus: list[float] = field(default_factory=list)
    z_hat: list[Tensor] = field(default_factory=list)
    a_hat: list[Tensor] = field(default_factory=list)

    def record(self, tau: float, z_hat: Tensor | None, a_hat: Tensor) -> None:
        self.taus.append(tau)
        if z_hat is not None:
            self.z_hat.append(z_hat.detach())
        self.a_hat.append(a_hat.detach())

    def as_dict(self) -> dict:
        """{"tau": [K], "z_hat": [K, ...] or None, "a_hat": [K, ...]} on the CPU (normalised units)."""
        import torch

        return {"tau": list(self.taus), "z_hat": torch.stack(self.z_hat).cpu() if self.z_hat else None,
                "a_hat": torch.stack(self.a_hat).cpu()}


def coupled_generation(dynamics_velocity: VelocityFn, policy_velocity: VelocityFn, z_noise: Tensor,
                       a_noise: Tensor, steps: int, mode: str = "jacobi",
                       trace: CouplingTrace | None = None,
                       stop_after: int | None = None) -> tuple[Tensor, Tensor | None]:
    """Algorithm 1: generate (A, Z) together; each model conditions on the other's clean estimate.

    jacobi:       both models see the other's estimate from the previous step (parallelisable).
    gauss_seidel: the policy steps first; the dynamics model sees the fresh action estimate.
    predict_then_act: a full action-agnostic dynamics rollout first, then the policy on its result.
    off:          the plain flow policy (no dynamics calls, null next observation).
    stop_after: run only the first n of the K steps of Jacobi / Gauss-Seidel (the time grid stays K's), for a
        caller that needs only the early part of the trace (the training-time `rollout` source).
    Returns (actions, next latents); the latents are None in mode "off".
    """
    if mode == "off":
        return sample_policy(policy_velocity, a_noise, steps, None, trace), None
    if mode == "predict_then_act":
        z = z_noise
        for tau in time_grid(steps):
            z = euler_step(z, dynamics_velocity(z, tau, None), 1.0 / steps)
        return sample_policy(policy_velocity, a_noise, steps, z, trace), z
    if mode not in ("jacobi", "gauss_seidel"):
        raise ValueError(f"unknown coupling mode {mode!r}")

    z, a = z_noise, a_noise
    z_hat: Tensor | None = None
    a_hat: Tensor | None = None
    for tau in time_grid(steps)[:stop_after]:
        v_a = policy_velocity(a, tau, z_hat)
        if mode == "gauss_seidel":
            a_hat = extrapolate(a, v_a, tau)
        v_z = dynamics_velocity(z, tau, a_hat)
        z_hat, a_hat = extrapolate(z, v_z, tau), extrapolate(a, v_a, tau)
        z, a = euler_step(z, v_z, 1.0 / steps), euler_step(a, v_a, 1.0 / steps)
        if trace is not None:
            trace.record(tau, z_hat, a_hat)
    return a, z


def sample_policy(policy_velocity: VelocityFn, a: Tensor, steps: int, z_cond: Tensor | None,
                  trace: CouplingTrace | None = None) -> Tensor:
    """Plain Euler sampling of the policy with a fixed next-observation condition."""
    for tau in time_grid(steps):
        v_a = policy_velocity(a, tau, z_cond)
        if trace is not None:
            trace.record(tau, z_cond, extrapolate(a, v_a, tau))
        a = euler_step(a, v_a, 1.0 / steps)
    return a
