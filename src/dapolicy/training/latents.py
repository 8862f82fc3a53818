"""The latent cache: VAE latents of every frame, encoded once per trained VAE and kept in RUN/cache.

The dynamics and policy stages only need the frozen VAE's latents, so encoding each frame once instead of
every time it is sampled removes the VAE from the inner loop. The cache is keyed by the data
(frame count, episode ends, image shape) and by the VAE itself: a probe of frames is re-encoded and must
match the cached rows, which catches retrained weights and a changed latent scale alike.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dapolicy.training.checkpoint import atomic_write_bytes, atomic_write_json

PROBE_FRAMES = 8


def data_fingerprint(images: np.ndarray, episode_ends: np.ndarray) -> str:
    h = hashlib.sha256()
    h.update(str(images.shape).encode())
    h.update(np.asarray(episode_ends, dtype=np.int64).tobytes())
    h.update(np.ascontiguousarray(images[: min(len(images), 4)]).tobytes())
    return h.hexdigest()[:16]


def _probe_ids(n: int) -> np.ndarray:
    return np.unique(np.linspace(0, n - 1, num=min(n, PROBE_FRAMES)).astype(np.int64))


@torch.no_grad()
def encode_all(policy: Any, images: np.ndarray, batch: int, progress: bool = False) -> np.ndarray:
    """`policy.encode_latents` over all frames in chunks -> float32 [N, C, c, h, w]."""
    from tqdm.auto import tqdm

    chunks = []
    with torch.random.fork_rng():
        torch.manual_seed(0)  # deterministic even if the encoder samples the posterior
        for start in tqdm(range(0, len(images), batch), desc="encode latents", disable=not progress,
                          leave=False):
            chunk = images[start:start + batch]
            if not chunk.flags.writeable:  # a lean (memory-mapped, read-only) store: torch wants a writable copy
                chunk = np.array(chunk)
            z = policy.encode_latents(chunk)
            chunks.append(z.detach().float().cpu().numpy() if torch.is_tensor(z) else np.asarray(z, np.float32))
    return np.concatenate(chunks).astype(np.float32, copy=False)


def cached_latents(policy: Any, images: np.ndarray, episode_ends: np.ndarray, cache_dir: Path,
                   batch: int = 256, progress: bool = False, write: bool = True) -> np.ndarray:
    """Latents of all frames: loaded from `cache_dir` when still valid, else encoded (and saved when `write`:
    the processes of a data-parallel job other than rank 0 load the cache rank 0 wrote, never write it)."""
    cache_dir = Path(cache_dir)
    arr_path, meta_path = cache_dir / "latents.npy", cache_dir / "latents.json"
    fingerprint = data_fingerprint(images, episode_ends)
    if arr_path.exists() and meta_path.exists():
        try:
            meta = json.loads(meta_path.read_text())
            cached = np.load(arr_path)
            if meta.get("data") == fingerprint and len(cached) == len(images):
                probe = _probe_ids(len(images))
                fresh = encode_all(policy, images[probe], batch)
                if fresh.shape[1:] == cached.shape[1:] and np.allclose(fresh, cached[probe], atol=1e-5, rtol=1e-4):
                    return cached
        except (OSError, ValueError, json.JSONDecodeError):
            pass  # unreadable cache: rebuild it
    latents = encode_all(policy, images, batch, progress=progress)
    if not write:
        return latents
    atomic_write_bytes(arr_path, lambda f: np.save(f, latents))
    atomic_write_json(meta_path, {"data": fingerprint, "shape": list(latents.shape)})
    return latents
