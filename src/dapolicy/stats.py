"""Small statistics used by evaluation and diagnostics.

Success rates over a few dozen seeded episodes swing by several points, so every rate we report carries a
95% Wilson score interval (docs/benchmark.md): unlike the normal approximation it stays inside [0, 1] and is
sensible at 0/n and n/n, which are common with small evaluations.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion `successes / n`.

    With n = 0 nothing is known, so the interval is the whole range (0, 1).
    """
    if n < 0 or successes < 0 or successes > n:
        raise ValueError(f"need 0 <= successes <= n, got successes={successes}, n={n}")
    if n == 0:
        return (0.0, 1.0)
    p = successes / n
    z2 = z * z
    denom = 1.0 + z2 / n
    centre = (p + z2 / (2 * n)) / denom
    half = z * math.sqrt(p * (1.0 - p) / n + z2 / (4 * n * n)) / denom
    # Clamp away round-off so that low <= p <= high holds exactly at p = 0 and p = 1.
    return (max(0.0, min(p, centre - half)), min(1.0, max(p, centre + half)))


def latency_summary(samples_ms: Sequence[float]) -> dict[str, float | int | None]:
    """p50 / p90 / mean of per-chunk latencies in milliseconds (None when nothing was measured).

    Percentiles rather than only the mean because a control loop cares about the slow chunks.
    """
    if len(samples_ms) == 0:
        return {"p50": None, "p90": None, "mean": None, "n": 0}
    a = np.asarray(samples_ms, dtype=np.float64)
    return {"p50": float(np.percentile(a, 50)), "p90": float(np.percentile(a, 90)),
            "mean": float(a.mean()), "n": int(a.size)}


def psnr(prediction: np.ndarray, target: np.ndarray, max_value: float = 255.0,
         axes: tuple[int, ...] | None = None) -> np.ndarray | float:
    """Peak signal-to-noise ratio in dB between images of the same shape.

    axes: the axes to average the squared error over (default: all, giving one number). For example
    axes=(-3, -2, -1) gives one PSNR per image of a [..., H, W, 3] stack. Identical images give +inf.
    """
    err = (np.asarray(prediction, dtype=np.float64) - np.asarray(target, dtype=np.float64)) ** 2
    mse = err.mean(axis=axes)
    with np.errstate(divide="ignore"):
        out = 10.0 * np.log10(max_value ** 2 / mse)
    return float(out) if np.ndim(out) == 0 else out
