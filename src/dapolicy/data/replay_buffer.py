"""Diffusion Policy's zarr replay buffer -> the episode store (`dap import diffusion-policy`).

The layout (Diffusion Policy's `ReplayBuffer`, zarr v2 or v3, a folder or a `.zarr.zip`):

    data/<key>           per-frame arrays, all of the same length N: images uint8 [N, H, W, 3] (e.g. `img`,
                         `camera0_rgb`), low-dimensional arrays [N, ...] (e.g. `state`, `action`,
                         `robot0_eef_pos`)
    meta/episode_ends    int [E]: exclusive end of each episode in the concatenated frames

Cameras default to every uint8 [N, H, W, 3] array under data/ (named by key), proprio to `state`, action to
`action`; `ImportConfig.cameras` / `proprio` / `action` map other keys (proprio may concatenate several).
A per-episode source or success can come from `meta/<field>` ([E]) or from `data/<field>` (per frame).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from dapolicy.data.foreign import (
    DatasetFormatError,
    ImportConfig,
    ImportResult,
    check_vectors,
    default_success,
    map_frames,
    parse_cameras,
    resolve_image_size,
    source_of,
    write_store,
)
from dapolicy.data.store import Episode
from dapolicy.spec import EnvSpec

DEFAULT_PROPRIO = ("state",)
DEFAULT_ACTION = "action"


class ReplayBuffer:
    """A Diffusion-Policy replay buffer opened read-only; arrays are read per episode (memory: one episode)."""

    def __init__(self, path: str | os.PathLike) -> None:
        import zarr

        self.path = Path(path)
        if not self.path.exists():
            raise DatasetFormatError(f"no replay buffer at {self.path}")
        try:
            store = zarr.storage.ZipStore(str(self.path), mode="r") if self.path.is_file() else str(self.path)
            self.root = zarr.open_group(store, mode="r")
            self.data = self.root["data"]
        except KeyError:
            raise DatasetFormatError(f"{self.path} has no data/ group: not a replay buffer") from None
        except Exception as e:  # zarr/zipfile raise many types for missing or garbled metadata
            raise DatasetFormatError(f"{self.path} is not a readable zarr replay buffer "
                                     f"({type(e).__name__}: {e})") from None
        self.ends = self._episode_ends()
        self._fields: dict[str, np.ndarray | None] = {}
        self.arrays = {k: self.data[k] for k in sorted(self.data.array_keys())}
        n = int(self.ends[-1])
        bad = {k: a.shape for k, a in self.arrays.items() if a.shape[:1] != (n,)}
        if bad:
            raise DatasetFormatError(f"{self.path}: meta/episode_ends says {n} frames, but these data arrays "
                                     f"differ in length: {bad}")

    def _episode_ends(self) -> np.ndarray:
        try:
            ends = np.asarray(self.root["meta"]["episode_ends"][...])
        except KeyError:
            raise DatasetFormatError(f"{self.path} has no meta/episode_ends") from None
        except Exception as e:
            raise DatasetFormatError(f"{self.path}: meta/episode_ends is unreadable ({type(e).__name__}: {e})") \
                from None
        if ends.ndim != 1 or not len(ends) or not np.issubdtype(ends.dtype, np.integer):
            raise DatasetFormatError(f"{self.path}: meta/episode_ends must be a non-empty int array [E], got "
                                     f"{ends.dtype} {ends.shape}")
        if ends[0] <= 0 or (np.diff(ends) <= 0).any():
            raise DatasetFormatError(f"{self.path}: meta/episode_ends must be strictly increasing and positive "
                                     f"(no empty episodes), got {ends.tolist()[:10]}")
        return ends.astype(np.int64)

    def image_keys(self) -> list[str]:
        return [k for k, a in self.arrays.items() if a.dtype == np.uint8 and a.ndim == 4
                and (a.shape[-1] == 3 or a.shape[1] == 3)]

    def read(self, key: str, start: int, stop: int) -> np.ndarray:
        if key not in self.arrays:
            raise DatasetFormatError(f"{self.path}: no array data/{key} (data arrays: {list(self.arrays)})")
        try:
            return np.asarray(self.arrays[key][start:stop])
        except Exception as e:  # a damaged chunk or a codec that is not installed
            raise DatasetFormatError(f"{self.path}: data/{key} frames {start}:{stop} are unreadable "
                                     f"({type(e).__name__}: {e})") from None

    def dim(self, key: str) -> int:
        if key not in self.arrays:
            raise DatasetFormatError(f"{self.path}: no array data/{key} (data arrays: {list(self.arrays)})")
        return int(np.prod(self.arrays[key].shape[1:]))

    def episode_field(self, name: str) -> np.ndarray | None:
        """meta/<name> ([E]) if present, else None."""
        if name not in self._fields:
            meta = self.root["meta"]
            values = np.asarray(meta[name][...]) if name in meta else None
            if values is not None and values.shape[:1] != self.ends.shape:
                raise DatasetFormatError(f"{self.path}: meta/{name} has shape {values.shape}, expected one value "
                                         f"per episode ({len(self.ends)})")
            self._fields[name] = values
        return self._fields[name]


def _value(buf: ReplayBuffer, name: str, e: int, s: int, t: int, where: str, any_frame: bool = False) -> Any:
    """A per-episode field: meta/<name>[e], else data/<name>[s:t] (constant over the episode, or any())."""
    per_episode = buf.episode_field(name)
    if per_episode is not None:
        return per_episode[e].item() if hasattr(per_episode[e], "item") else per_episode[e]
    if name not in buf.arrays:
        raise DatasetFormatError(f"{where}: no field {name!r} in meta/ or data/")
    values = buf.read(name, s, t).reshape(t - s, -1)
    if any_frame:
        return bool(values.any())
    if (values != values[:1]).any():
        raise DatasetFormatError(f"{where}: field data/{name} changes within the episode")
    return values[0, 0].item()


def import_replay_buffer(src: str | os.PathLike, out: str | os.PathLike,
                         cfg: ImportConfig | None = None) -> ImportResult:
    """Import a Diffusion-Policy zarr replay buffer into the episode store at `out` (new, or cfg.append)."""
    cfg = cfg or ImportConfig()
    cfg.check()
    buf = ReplayBuffer(src)
    cams = parse_cameras(cfg.cameras, buf.image_keys())
    if not cams:
        raise DatasetFormatError(f"{buf.path}: no image arrays uint8 [N, H, W, 3] under data/ "
                                 f"(data arrays: {list(buf.arrays)})")
    proprio = list(cfg.proprio) or list(DEFAULT_PROPRIO)
    action = cfg.action or DEFAULT_ACTION
    size = resolve_image_size(cfg, out)
    lengths = np.diff(np.concatenate([[0], buf.ends]))
    spec = EnvSpec(name=cfg.name or f"diffusion-policy/{buf.path.name.split('.')[0]}", cameras=tuple(cams),
                   image_size=size, action_dim=buf.dim(action), proprio_dim=sum(buf.dim(k) for k in proprio),
                   max_steps=int(lengths.max()))
    return write_store(out, spec, _episodes(buf, cfg, cams, proprio, action, size), append=cfg.append,
                       total=len(buf.ends), progress=cfg.progress)


def _episodes(buf: ReplayBuffer, cfg: ImportConfig, cams: dict[str, str], proprio: Sequence[str], action: str,
              size: int) -> Iterator[Episode]:
    starts = np.concatenate([[0], buf.ends[:-1]])
    success_field = cfg.success_field or ("success" if buf.episode_field("success") is not None else None)
    for e, (s, t) in enumerate(zip(starts.tolist(), buf.ends.tolist())):
        where = f"episode {e} (frames {s}:{t})"
        state = np.concatenate([check_vectors(k, buf.read(k, s, t), where) for k in proprio], axis=1)
        act = check_vectors(action, buf.read(action, s, t), where)
        images = {name: map_frames(buf.read(key, s, t), size, cfg.crop, f"{where}: data/{key}")
                  for name, key in cams.items()}
        source = cfg.source or "expert"
        if cfg.source_field:
            source = source_of(_value(buf, cfg.source_field, e, s, t, where), source, cfg.source_field, where)
        if success_field:
            success = bool(_value(buf, success_field, e, s, t, where, any_frame=True))
        else:
            success = default_success(source)
        yield Episode(images=images, proprio=state, action=act,
                      meta={"source": source, "seed": e, "success": success, "origin": "diffusion-policy",
                            "episode_index": e})
