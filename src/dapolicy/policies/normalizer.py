"""Min-max normaliser to [-1, 1], fitted on data and saved inside the model's state dict.

Statistics are buffers, so `save_pretrained` carries them and a loaded model normalises exactly as in
training. A dimension that never varies (range ~ 0) maps to 0 instead of dividing by zero.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn


def check_finite(name: str, value: Tensor | np.ndarray) -> None:
    """Reject NaN / inf with an error that names the offending key."""
    finite = torch.isfinite(value).all() if isinstance(value, Tensor) else np.isfinite(value).all()
    if not bool(finite):
        raise ValueError(f"{name!r} contains NaN or inf values")


class MinMaxNormalizer(nn.Module):
    """Per-dimension affine map of [min, max] onto [-1, 1]."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.dim = dim
        self.eps = eps
        self.register_buffer("low", -torch.ones(dim))
        self.register_buffer("high", torch.ones(dim))
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))

    def fit(self, data: np.ndarray | Tensor, name: str = "data") -> "MinMaxNormalizer":
        x = torch.as_tensor(np.asarray(data), dtype=torch.float32).reshape(-1, self.dim)
        if x.shape[0] == 0:
            raise ValueError(f"cannot fit the {name!r} normaliser on zero samples")
        check_finite(name, x)
        self.low.copy_(x.min(dim=0).values)
        self.high.copy_(x.max(dim=0).values)
        self.fitted.fill_(True)
        return self

    def _scale_offset(self) -> tuple[Tensor, Tensor]:
        span = self.high - self.low
        constant = span < self.eps
        scale = torch.where(constant, torch.ones_like(span), 2.0 / span.clamp_min(self.eps))
        center = (self.high + self.low) / 2.0
        return scale, center

    def normalize(self, x: Tensor) -> Tensor:
        scale, center = self._scale_offset()
        return (x - center) * scale

    def unnormalize(self, y: Tensor) -> Tensor:
        scale, center = self._scale_offset()
        return y / scale + center
