"""Data layer: the on-disk episode store and the windowed sampler (see docs/architecture.md).

Names are resolved lazily so `python -m dapolicy.data.sampler` runs cleanly and importing the package is cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "SOURCES": "dapolicy.data.store",
    "Episode": "dapolicy.data.store",
    "EpisodeData": "dapolicy.data.store",
    "EpisodeStore": "dapolicy.data.store",
    "StoreError": "dapolicy.data.store",
    "WindowIndices": "dapolicy.data.sampler",
    "WindowSampler": "dapolicy.data.sampler",
    "benchmark_sampler": "dapolicy.data.sampler",
    "lean_images": "dapolicy.data.lean",
    "ImportConfig": "dapolicy.data.foreign",
    "DatasetFormatError": "dapolicy.data.foreign",
    "import_lerobot": "dapolicy.data.lerobot",
    "export_lerobot": "dapolicy.data.lerobot",
    "import_replay_buffer": "dapolicy.data.replay_buffer",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'dapolicy.data' has no attribute {name!r}")
