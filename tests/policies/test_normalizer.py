import numpy as np
import pytest
import torch

from dapolicy.policies.normalizer import MinMaxNormalizer


def test_maps_range_to_unit_interval_and_back():
    data = np.array([[0.0, 10.0, 5.0], [2.0, 30.0, 5.0], [1.0, 20.0, 5.0]], dtype=np.float32)
    norm = MinMaxNormalizer(3).fit(data)
    y = norm.normalize(torch.as_tensor(data))
    assert torch.allclose(y[:, :2].min(0).values, torch.tensor([-1.0, -1.0]))
    assert torch.allclose(y[:, :2].max(0).values, torch.tensor([1.0, 1.0]))
    # A constant dimension maps to 0 instead of dividing by zero, and round-trips.
    assert torch.all(y[:, 2] == 0)
    assert torch.allclose(norm.unnormalize(y), torch.as_tensor(data), atol=1e-5)


def test_rejects_nan_naming_the_key():
    with pytest.raises(ValueError, match="'action'"):
        MinMaxNormalizer(2).fit(np.array([[0.0, np.nan]]), name="action")


def test_statistics_are_in_the_state_dict():
    norm = MinMaxNormalizer(2).fit(np.array([[0.0, 1.0], [4.0, 3.0]]))
    other = MinMaxNormalizer(2)
    other.load_state_dict(norm.state_dict())
    assert torch.equal(other.low, norm.low) and torch.equal(other.high, norm.high) and bool(other.fitted)
