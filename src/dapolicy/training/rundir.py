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

from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from dapolicy.atomic import read_json
from dapolicy.training.checkpoint import atomic_write_json, remove_stale_temp_files

try:
    import fcntl
except ImportError:  # pragma: no cover - no advisory locks (Windows): runs are simply not protected
    fcntl = None  # type: ignore[assignment]


class RunFolderError(ValueError):
    """The run folder's contents do not allow the requested call (missing stages, mismatched config, busy)."""


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
            return read_json(self.state_file, self._corrupt_fix)
        return {"stages_done": [], "summaries": {}}

    def write_state(self, state: dict[str, Any]) -> None:
        atomic_write_json(self.state_file, state)

    def read_config(self) -> dict[str, Any] | None:
        return read_json(self.config, self._corrupt_fix) if self.config.exists() else None

    @property
    def _corrupt_fix(self) -> str:
        """What to do about a corrupt run file: the run cannot be continued, only started over."""
        return f"start over with `dap train --out {self.root} --overwrite ...` or choose another --out"

    @contextmanager
    def lock(self) -> Iterator[None]:
        """Exclusive use of the run folder: a second `dap train` on the same folder fails fast instead of
        interleaving checkpoints. Also clears temp files that a killed run left behind."""
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".lock", "a+") as f:
            if fcntl is not None:
                try:
                    fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    raise RunFolderError(f"another `dap train` is using {self.root}") from None
            try:
                for d in (self.root, self.checkpoints, self.cache):
                    remove_stale_temp_files(d)
                yield
            finally:
                if fcntl is not None:
                    fcntl.flock(f.fileno(), fcntl.LOCK_UN)

    def recover_model(self) -> None:
        """Undo a model swap that was killed half-way (RUN/model moved aside, the new one not yet in place)."""
        old = self.model.with_name(f".{self.model.name}.old")
        if not self.model.exists() and old.is_dir():
            old.rename(self.model)

    def has_model(self) -> bool:
        return self.model.is_dir() and any(self.model.iterdir())
