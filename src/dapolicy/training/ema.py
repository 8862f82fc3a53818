"""Exponential moving average of a module's weights, Diffusion-Policy style.

decay(n) = 1 - (1 + n / inv_gamma) ** -power, clamped to [min_decay, max_decay], n = updates so far.
Early on the decay is small, so the average tracks the fast-moving raw weights instead of remembering the
random initialisation; later it approaches max_decay. Buffers (e.g. GroupNorm has none, BatchNorm would)
are copied, not averaged. Shadow tensors live on the module's device and are saved in checkpoints.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn


class EMA:
    """EMA shadow of `module`'s floating-point parameters and buffers."""

    def __init__(self, module: nn.Module, power: float = 0.75, max_decay: float = 0.9999,
                 min_decay: float = 0.0, inv_gamma: float = 1.0) -> None:
        self.module = module
        self.power, self.max_decay, self.min_decay, self.inv_gamma = power, max_decay, min_decay, inv_gamma
        self.updates = 0
        self.shadow: dict[str, torch.Tensor] = {k: v.detach().clone() for k, v in module.state_dict().items()}

    def decay(self) -> float:
        """Decay applied at the next update."""
        if self.power <= 0:
            return 0.0
        value = 1.0 - (1.0 + self.updates / self.inv_gamma) ** -self.power
        return min(max(value, self.min_decay), self.max_decay)

    @torch.no_grad()
    def update(self) -> None:
        d = self.decay()
        params = dict(self.module.named_parameters())
        for name, value in self.module.state_dict().items():
            shadow = self.shadow[name]
            if name in params and params[name].requires_grad and value.is_floating_point():
                shadow.mul_(d).add_(value.detach(), alpha=1.0 - d)
            else:
                shadow.copy_(value)
        self.updates += 1

    @torch.no_grad()
    def copy_to(self, module: nn.Module | None = None) -> None:
        """Load the averaged weights into `module` (default: the tracked one)."""
        (module or self.module).load_state_dict(self.shadow)

    @contextmanager
    def swapped_in(self) -> Iterator[None]:
        """Temporarily run the tracked module with EMA weights (e.g. for validation), then restore."""
        backup = {k: v.detach().clone() for k, v in self.module.state_dict().items()}
        self.copy_to()
        try:
            yield
        finally:
            self.module.load_state_dict(backup)

    def state_dict(self) -> dict:
        return {"updates": self.updates, "shadow": self.shadow,
                "hparams": [self.power, self.max_decay, self.min_decay, self.inv_gamma]}

    def load_state_dict(self, state: dict) -> None:
        self.updates = int(state["updates"])
        missing = set(self.shadow) ^ set(state["shadow"])
        if missing:
            raise ValueError(f"EMA state does not match the module (keys differ: {sorted(missing)[:5]})")
        for k, v in state["shadow"].items():
            self.shadow[k].copy_(v)
