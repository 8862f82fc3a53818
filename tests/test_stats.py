"""Wilson interval against published values; latency summary; PSNR."""

from __future__ import annotations

import math

import numpy as np
import pytest

from dapolicy.stats import latency_summary, psnr, wilson_interval


@pytest.mark.parametrize("k, n, low, high", [
    # Reference values of the 95% Wilson score interval (z = 1.96), e.g. Newcombe (1998), Table I.
    (81, 263, 0.2553, 0.3662),
    (15, 148, 0.0624, 0.1605),
    (0, 20, 0.0, 0.1611),
    (1, 29, 0.0061, 0.1718),
    (8, 10, 0.4902, 0.9433),
    (10, 10, 0.7225, 1.0),
    (0, 10, 0.0, 0.2775),
])
def test_wilson_known_values(k, n, low, high):
    lo, hi = wilson_interval(k, n)
    assert lo == pytest.approx(low, abs=1e-4)
    assert hi == pytest.approx(high, abs=1e-4)


def test_wilson_edge_cases_and_containment():
    assert wilson_interval(0, 0) == (0.0, 1.0)
    for n in (1, 3, 50):
        for k in range(n + 1):
            lo, hi = wilson_interval(k, n)
            assert 0.0 <= lo <= k / n <= hi <= 1.0
    # Wider z gives a wider interval; symmetric around 1/2 for k = n/2.
    assert wilson_interval(5, 10, z=2.58)[0] < wilson_interval(5, 10)[0]
    lo, hi = wilson_interval(25, 50)
    assert lo + hi == pytest.approx(1.0)
    with pytest.raises(ValueError):
        wilson_interval(3, 2)


def test_latency_summary():
    s = latency_summary([10.0, 20.0, 30.0, 40.0, 1000.0])
    assert s["p50"] == 30.0 and s["n"] == 5
    assert 40.0 < s["p90"] < 1000.0
    assert s["mean"] == pytest.approx(220.0)
    assert latency_summary([])["p50"] is None


def test_psnr():
    a = np.zeros((4, 8, 8, 3), np.uint8)
    b = np.full((4, 8, 8, 3), 255, np.uint8)
    assert psnr(a, b) == pytest.approx(0.0)
    c = a.copy()
    c[..., 0] = 10  # mse = 100 / 3
    assert psnr(a, c) == pytest.approx(10 * math.log10(255**2 / (100 / 3)))
    per_image = psnr(a, c, axes=(-3, -2, -1))
    assert per_image.shape == (4,)
    assert math.isinf(psnr(a, a))
