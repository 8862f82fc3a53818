"""Learning-rate schedule: linear warm-up, then cosine decay to a floor at the stage's last step.

A pure function of the step (no scheduler object with hidden state), so a resumed run sets exactly the
same rate at every step as an uninterrupted one.
"""

from __future__ import annotations

import math

import torch


def warmup_cosine(step: int, total: int, peak: float, warmup: int, min_ratio: float = 0.0) -> float:
    """Rate used for optimizer step `step` (0-based) of `total`: warm-up to `peak`, cosine to `min_ratio*peak`."""
    if warmup > 0 and step < warmup:
        return peak * (step + 1) / warmup
    span = max(total - warmup, 1)
    progress = min(max(step - warmup, 0) / span, 1.0)
    floor = peak * min_ratio
    return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
