import math

import pytest
import torch
from torch import nn

from dapolicy.training.ema import EMA
from dapolicy.training.schedule import warmup_cosine


def test_warmup_then_cosine_to_zero() -> None:
    lrs = [warmup_cosine(s, 1000, 3e-4, 100) for s in range(1000)]
    assert lrs[0] == pytest.approx(3e-6) and lrs[99] == pytest.approx(3e-4)
    assert all(a <= b for a, b in zip(lrs[:100], lrs[1:100]))  # warm-up rises
    assert all(a >= b for a, b in zip(lrs[100:], lrs[101:]))  # then decays
    assert lrs[550] == pytest.approx(1.5e-4, rel=1e-2)  # cosine midpoint
    assert warmup_cosine(1000, 1000, 3e-4, 100) == pytest.approx(0.0, abs=1e-12)
    assert warmup_cosine(1000, 1000, 3e-4, 100, min_ratio=0.1) == pytest.approx(3e-5)
    assert warmup_cosine(0, 1, 1.0, 0) == 1.0  # degenerate budgets do not divide by zero


def test_ema_decay_schedule() -> None:
    ema = EMA(nn.Linear(2, 2), power=0.75, max_decay=0.9999)
    assert ema.decay() == 0.0  # first update copies the weights
    ema.updates = 10
    assert ema.decay() == pytest.approx(1 - 11 ** -0.75)
    ema.updates = 10**9
    assert ema.decay() == 0.9999


def test_ema_update_tracks_average_and_swaps() -> None:
    torch.manual_seed(0)
    net = nn.Linear(3, 2)
    ema = EMA(net, power=0.0)  # decay 0: the shadow equals the latest weights
    with torch.no_grad():
        net.weight.add_(1.0)
    ema.update()
    assert torch.equal(ema.shadow["weight"], net.weight)
    ema = EMA(net, power=1.0, min_decay=0.5, max_decay=0.5)
    before = net.weight.detach().clone()
    with torch.no_grad():
        net.weight.add_(2.0)
    ema.update()
    assert torch.allclose(ema.shadow["weight"], before + 1.0)
    raw = net.weight.detach().clone()
    with ema.swapped_in():
        assert torch.allclose(net.weight, before + 1.0)
    assert torch.equal(net.weight, raw)
    state = ema.state_dict()
    other = EMA(nn.Linear(3, 2))
    other.load_state_dict(state)
    assert other.updates == 1 and torch.equal(other.shadow["weight"], ema.shadow["weight"])
    with pytest.raises(ValueError):
        EMA(nn.Linear(3, 3, bias=False)).load_state_dict(state)
    assert math.isfinite(ema.decay())
