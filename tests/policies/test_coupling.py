"""Algorithm 1 in isolation, driven by analytic velocity fields."""

import pytest
import torch

from dapolicy.flow import extrapolate
from dapolicy.policies.coupling import CouplingTrace, coupled_generation


def _fields(calls):
    target_a = torch.full((2, 4, 1), 3.0)

    def policy_velocity(a, tau, z_hat):
        calls.append(("pi", tau, None if z_hat is None else z_hat.clone()))
        shift = 0.0 if z_hat is None else z_hat.mean()
        return (target_a + shift - a) / (1 - tau)

    def dynamics_velocity(z, tau, a_hat):
        calls.append(("f", tau, None if a_hat is None else a_hat.clone()))
        goal = torch.zeros_like(z) if a_hat is None else a_hat.mean() * torch.ones_like(z)
        return (goal - z) / (1 - tau)

    return policy_velocity, dynamics_velocity


@pytest.mark.parametrize("mode", ["jacobi", "gauss_seidel", "predict_then_act", "off"])
def test_modes_run_batched_and_condition_as_specified(mode):
    calls = []
    pi, f = _fields(calls)
    trace = CouplingTrace()
    a, z = coupled_generation(f, pi, torch.randn(2, 3), torch.randn(2, 4, 1), steps=5, mode=mode, trace=trace)
    assert a.shape == (2, 4, 1)
    assert len(trace.a_hat) == 5
    pi_calls = [c for c in calls if c[0] == "pi"]
    f_calls = [c for c in calls if c[0] == "f"]
    assert len(pi_calls) == 5
    if mode == "off":
        assert z is None and not f_calls
        assert all(c[2] is None for c in pi_calls)
    elif mode == "predict_then_act":
        assert len(f_calls) == 5 and all(c[2] is None for c in f_calls)
        assert all(c[2] is not None for c in pi_calls)
    else:
        assert len(f_calls) == 5
        # First policy call has no prediction yet; later ones see the dynamics' previous estimate.
        assert pi_calls[0][2] is None and all(c[2] is not None for c in pi_calls[1:])
        if mode == "jacobi":
            assert f_calls[0][2] is None  # the first dynamics call is action-agnostic
        else:
            assert f_calls[0][2] is not None  # gauss-seidel: sees the fresh action estimate
    # The last extrapolation equals the returned sample (it is the final Euler update).
    assert torch.allclose(trace.a_hat[-1], a, atol=1e-5)


def test_coupling_actually_feeds_estimates_across():
    """With the field above, the dynamics' estimate follows the actions and shifts them: coupled output
    differs from the plain policy's, so the coupling is not a no-op."""
    pi, f = _fields([])
    torch.manual_seed(0)
    a0, z0 = torch.randn(2, 4, 1), torch.randn(2, 3)
    a_off, _ = coupled_generation(f, pi, z0, a0, 5, "off")
    a_jac, z_jac = coupled_generation(f, pi, z0, a0, 5, "jacobi")
    assert torch.allclose(a_off, torch.full_like(a_off, 3.0), atol=1e-4)
    assert not torch.allclose(a_jac, a_off)
    assert z_jac is not None and z_jac.shape == z0.shape


def test_unknown_mode_raises():
    pi, f = _fields([])
    with pytest.raises(ValueError, match="unknown coupling mode"):
        coupled_generation(f, pi, torch.zeros(1, 2), torch.zeros(1, 4, 1), 3, "sideways")


def test_extrapolate_matches_trace_definition():
    x, v = torch.randn(3, 2), torch.randn(3, 2)
    assert torch.allclose(extrapolate(x, v, 0.25), x + 0.75 * v)
