"""The layout of a training run folder, and the small state file that says which stages are finished.

RUN/
  config.json          resolved policy + train configuration, data path, env spec, method
  state.json           {"stages_done": [...], "summaries": {stage: {...}}}
  metrics.jsonl        one record per log interval / validation / stage end
  plots/loss_<stage>.png
  checkpoints/last.pt  resume point (model, EMA, optimizer, schedule, step, stage, RNG states)
  checkpoints/best.pt  lowest validation loss of the most recent stage
  cache/latents.npy    frozen-VAE latents of every frame (+ latents.json, the key that validates them)
  model/               `save_pretrained` output with EMA weights, rewritten after every stage
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dapolicy.training.checkpoint import atomic_write_json


@dataclass(frozen=True)
class RunDir:
    root: Path

    @property
    def config(self) -> Path:
        return self.root / "config.json"

    @property
    def state_file(self) -> Path:
        return self.root / "state.json"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def plots(self) -> Path:
        return self.root / "plots"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def last(self) -> Path:
        return self.checkpoints / "last.pt"

    @property
    def best(self) -> Path:
        return self.checkpoints / "best.pt"

    @property
    def cache(self) -> Path:
        return self.root / "cache"

    @property
    def model(self) -> Path:
        return self.root / "model"

    def read_state(self) -> dict[str, Any]:
        if self.state_file.exists():
            return json.loads(self.state_file.read_text())
        return {"stages_done": [], "summaries": {}}

    def write_state(self, state: dict[str, Any]) -> None:
        atomic_write_json(self.state_file, state)

    def read_config(self) -> dict[str, Any] | None:
        return json.loads(self.config.read_text()) if self.config.exists() else None

    def recover_model(self) -> None:
        """Undo a model swap that was killed half-way (RUN/model moved aside, the new one not yet in place)."""
        old = self.model.with_name(f".{self.model.name}.old")
        if not self.model.exists() and old.is_dir():
            old.rename(self.model)

    def has_model(self) -> bool:
        return self.model.is_dir() and any(self.model.iterdir())
