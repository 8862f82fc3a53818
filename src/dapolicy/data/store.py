"""On-disk episode store: one zarr v3 group per episode, published by an atomic JSON index.

Layout of a store at PATH:

    PATH/zarr.json               root group (attributes: format, version, env spec) - for zarr tooling
    PATH/index.json              THE source of truth: spec + the list of published episodes
    PATH/episodes/ep_000000/     zarr group: images/<camera> uint8 [T,S,S,3], proprio f32 [T,P], action f32 [T,A]
    PATH/.staging/               episodes being written (never read)
    PATH/.lock                   advisory lock held by a writer while it appends

Why an index: an append writes the episode's arrays under `.staging`, renames the finished group into
`episodes/`, and only then rewrites `index.json` through `os.replace`. A process killed at any point therefore
leaves the previous index intact; the half-written episode is invisible to readers and removed by the next
append. Every chunk carries a CRC32C checksum, so a damaged chunk is reported instead of read as garbage.

A directory written by `dap collect` holds the store in `DIR/episodes.zarr`; `EpisodeStore.open(DIR)` finds it.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from dapolicy.atomic import to_jsonable, write_json_atomic
from dapolicy.spec import EnvSpec

try:  # POSIX advisory locking; without it (Windows) appends are simply not protected against a second writer
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

FORMAT = "dapolicy-episode-store"
VERSION = 1
INDEX_FILE = "index.json"
EPISODES_DIR = "episodes"
STAGING_DIR = ".staging"
LOCK_FILE = ".lock"
#: name of the store inside a `dap collect` output directory
COLLECT_STORE_NAME = "episodes.zarr"
SOURCES: tuple[str, ...] = ("expert", "random", "noisy_expert")
#: target size of one compressed image chunk before compression (frames are chunked along time only)
_IMAGE_CHUNK_BYTES = 1 << 20


class StoreError(ValueError):
    """The store on disk is missing, corrupt, or does not match what the caller expects."""


@dataclass
class Episode:
    """One episode in memory. `action[t]` is the action taken after observing frame t.

    images: camera -> uint8 [T, S, S, 3]; proprio: float32 [T, P]; action: float32 [T, A].
    meta: at least source ("expert" | "random" | "noisy_expert"), seed (int) and success (bool); the store
    adds `length`. Any other JSON-serialisable entries are kept.
    """

    images: dict[str, np.ndarray]
    proprio: np.ndarray
    action: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(len(self.action))


@dataclass
class EpisodeData:
    """Selected episodes concatenated in memory, in the layout the sampler and the trainers use.

    images: uint8 [N, C, S, S, 3] (cameras in spec order); proprio: float32 [N, P]; action: float32 [N, A];
    episode_ends: int64 [E], exclusive ends of each episode in the concatenated frames;
    meta: one dict per episode (store meta plus `store_index`, the episode's position in the store).
    """

    images: np.ndarray
    proprio: np.ndarray
    action: np.ndarray
    episode_ends: np.ndarray
    meta: list[dict[str, Any]]
    spec: EnvSpec | None = None

    @property
    def num_frames(self) -> int:
        return int(len(self.action))

    @property
    def num_episodes(self) -> int:
        return int(len(self.episode_ends))

    def episode_slice(self, i: int) -> slice:
        """Frames of the i-th selected episode."""
        start = int(self.episode_ends[i - 1]) if i > 0 else 0
        return slice(start, int(self.episode_ends[i]))

    def arrays(self) -> dict[str, np.ndarray]:
        """The per-frame arrays, keyed as `WindowSampler.gather` expects."""
        return {"images": self.images, "proprio": self.proprio, "action": self.action}


# ----------------------------------------------------------------------------------------------- helpers


_to_json = to_jsonable


def _atomic_write_json(path: Path, payload: Any) -> None:
    write_json_atomic(path, payload, indent=1)


def _remove_if_empty(path: Path) -> None:
    try:
        path.rmdir()
    except OSError:
        pass


def _array_specs(spec: EnvSpec) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Per-frame shape and dtype of every array an episode holds, keyed by its path inside the episode group."""
    s = spec.image_size
    out: dict[str, tuple[tuple[int, ...], np.dtype]] = {
        f"images/{cam}": ((s, s, 3), np.dtype(np.uint8)) for cam in spec.cameras
    }
    out["proprio"] = ((spec.proprio_dim,), np.dtype(np.float32))
    out["action"] = ((spec.action_dim,), np.dtype(np.float32))
    return out


def _chunk_frames(frame_shape: tuple[int, ...], dtype: np.dtype, length: int) -> int:
    frame_bytes = max(1, int(np.prod(frame_shape)) * dtype.itemsize)
    return max(1, min(length, _IMAGE_CHUNK_BYTES // frame_bytes))


def _compressors(dtype: np.dtype) -> list[Any]:
    from zarr.codecs import BloscCodec, Crc32cCodec

    shuffle = "noshuffle" if dtype.itemsize == 1 else "bitshuffle"
    return [BloscCodec(cname="zstd", clevel=3, shuffle=shuffle), Crc32cCodec()]


def _validate_episode(ep: Episode, spec: EnvSpec) -> dict[str, np.ndarray]:
    """Check an episode against the spec; return its arrays keyed by store path, in storage dtype."""
    if not isinstance(ep.images, dict):
        raise ValueError(f"episode.images must be a dict camera -> uint8 [T,S,S,3], got {type(ep.images).__name__}")
    missing = [c for c in spec.cameras if c not in ep.images]
    extra = [c for c in ep.images if c not in spec.cameras]
    if missing or extra:
        raise ValueError(f"episode.images has cameras {sorted(ep.images)}, the store expects {list(spec.cameras)}"
                         f" (missing {missing}, unexpected {extra})")
    s = spec.image_size
    arrays: dict[str, np.ndarray] = {}
    for cam in spec.cameras:
        img = np.asarray(ep.images[cam])
        if img.dtype != np.uint8 or img.ndim != 4 or img.shape[1:] != (s, s, 3):
            raise ValueError(f"images[{cam!r}]: expected uint8 array of shape [T, {s}, {s}, 3], "
                             f"got {img.dtype} {tuple(img.shape)}")
        arrays[f"images/{cam}"] = img
    for key, dim in (("proprio", spec.proprio_dim), ("action", spec.action_dim)):
        arr = np.asarray(getattr(ep, key))
        if arr.ndim != 2 or arr.shape[1] != dim or not (np.issubdtype(arr.dtype, np.floating)
                                                        or np.issubdtype(arr.dtype, np.integer)):
            raise ValueError(f"{key}: expected a float array of shape [T, {dim}], got {arr.dtype} {tuple(arr.shape)}")
        arr = arr.astype(np.float32, copy=False)
        if not np.isfinite(arr).all():
            bad = np.argwhere(~np.isfinite(arr))[0]
            raise ValueError(f"{key}: contains NaN or inf (first at frame {bad[0]}, dim {bad[1]})")
        arrays[key] = arr
    lengths = {k: len(v) for k, v in arrays.items()}
    if len(set(lengths.values())) != 1:
        raise ValueError(f"episode arrays differ in length (frames): {lengths}")
    if lengths["action"] == 0:
        raise ValueError("episode has no frames")
    return arrays


def _validate_meta(meta: dict[str, Any]) -> dict[str, Any]:
    meta = _to_json(dict(meta))
    if meta.get("source") not in SOURCES:
        raise ValueError(f"meta['source'] must be one of {SOURCES}, got {meta.get('source')!r}")
    if not isinstance(meta.get("seed"), int) or isinstance(meta.get("seed"), bool):
        raise ValueError(f"meta['seed'] must be an int, got {meta.get('seed')!r}")
    if not isinstance(meta.get("success"), bool):
        raise ValueError(f"meta['success'] must be a bool, got {meta.get('success')!r}")
    try:
        json.dumps(meta)
    except (TypeError, ValueError) as e:
        raise ValueError(f"meta is not JSON-serialisable: {e}") from None
    return meta


def resolve_store_path(path: str | os.PathLike) -> Path:
    """The store directory for `path`: the path itself, or `path/episodes.zarr` (a `dap collect` folder)."""
    p = Path(path)
    if not (p / INDEX_FILE).exists() and (p / COLLECT_STORE_NAME).is_dir():
        return p / COLLECT_STORE_NAME
    return p


# ------------------------------------------------------------------------------------------------- store


class EpisodeStore:
    """Append-only episode store. Build with `create` or `open`; see the module docstring for the layout."""

    def __init__(self, path: Path, index: dict[str, Any]) -> None:
        self.path = Path(path)
        self._index = index
        self.spec = EnvSpec.from_dict(index["spec"])

    # -- construction

    @classmethod
    def create(cls, path: str | os.PathLike, spec: EnvSpec) -> "EpisodeStore":
        """Create an empty store. `path` must not exist or be an empty directory."""
        import zarr

        path = Path(path)
        if path.exists() and (not path.is_dir() or any(path.iterdir())):
            raise FileExistsError(f"cannot create an episode store at {path}: it exists and is not empty")
        path.mkdir(parents=True, exist_ok=True)
        (path / EPISODES_DIR).mkdir()
        spec_dict = _to_json(spec.to_dict())
        zarr.create_group(zarr.storage.LocalStore(str(path)),
                          attributes={"format": FORMAT, "version": VERSION, "spec": spec_dict})
        index = {"format": FORMAT, "version": VERSION, "spec": spec_dict, "episodes": []}
        _atomic_write_json(path / INDEX_FILE, index)  # the index's presence marks a complete, empty store
        return cls(path, index)

    @classmethod
    def open(cls, path: str | os.PathLike, spec: EnvSpec | None = None, verify: bool = False) -> "EpisodeStore":
        """Open an existing store (or a `dap collect` directory holding one) and check its consistency.

        spec: if given, the stored spec must equal it. verify: also decompress every chunk (slow, thorough);
        without it the check covers the index, array metadata, shapes and chunk files' presence.
        Raises StoreError naming the first problem found.
        """
        path = resolve_store_path(path)
        if not path.is_dir():
            raise StoreError(f"no episode store at {path} (expected a `dap collect` or `dap import` output folder)")
        index = _read_index(path)
        store = cls(path, index)
        if spec is not None and _to_json(spec.to_dict()) != index["spec"]:
            raise StoreError(f"wrong spec: store at {path} holds {index['spec']}, expected {_to_json(spec.to_dict())}")
        for i in range(len(store)):
            store._check_episode(i, read_data=verify)
        return store

    # -- queries

    def __len__(self) -> int:
        return len(self._index["episodes"])

    def __repr__(self) -> str:
        return (f"EpisodeStore({str(self.path)!r}, env={self.spec.name!r}, episodes={len(self)}, "
                f"frames={self.num_frames})")

    @property
    def meta(self) -> list[dict[str, Any]]:
        """One dict per episode (copies): source, seed, success, length and any extra entries."""
        return [dict(e["meta"]) for e in self._index["episodes"]]

    @property
    def num_frames(self) -> int:
        return int(sum(e["length"] for e in self._index["episodes"]))

    def select(self, sources: Iterable[str] | None = None, success_only: bool = False) -> list[int]:
        """Indices of the episodes of the given sources (None = all), optionally successful ones only."""
        if isinstance(sources, str):
            sources = (sources,)
        wanted = None if sources is None else set(sources)
        if wanted is not None and not wanted <= set(SOURCES):
            raise ValueError(f"unknown source(s) {sorted(wanted - set(SOURCES))}: expected {SOURCES}")
        return [i for i, m in enumerate(self.meta)
                if (wanted is None or m["source"] in wanted) and (m["success"] or not success_only)]

    # -- writing

    def append_episode(self, episode: Episode) -> int:
        """Validate and append one episode atomically; returns its index.

        A crash before the index is replaced loses only this episode; the store stays readable.
        """
        arrays = _validate_episode(episode, self.spec)
        meta = _validate_meta(episode.meta)
        meta["length"] = len(arrays["action"])
        with self._writer_lock():
            self._index = _read_index(self.path)  # another process may have appended since we opened
            self._clean_leftovers()
            key = f"ep_{len(self):06d}"
            staging = self.path / STAGING_DIR / f"{key}.{uuid.uuid4().hex}"
            self._write_group(staging, arrays, meta)
            target = self.path / EPISODES_DIR / key
            if target.exists():  # an unpublished leftover of a crashed append
                shutil.rmtree(target)
            os.rename(staging, target)
            _remove_if_empty(staging.parent)
            index = dict(self._index)
            index["episodes"] = [*self._index["episodes"], {"key": key, "length": meta["length"], "meta": meta}]
            _atomic_write_json(self.path / INDEX_FILE, index)
            self._index = index
        return len(self) - 1

    def append_episodes(self, episodes: Iterable[Episode]) -> list[int]:
        """Validate and append many episodes as ONE publish: either all of them become visible or none does.

        Why: an import of a foreign dataset that turns out to be bad part-way through must not leave a
        half-imported store. Episodes are consumed one at a time (an iterator keeps memory at one episode);
        each is staged on disk, and the index is rewritten once at the end. Returns the new indices.
        """
        with self._writer_lock():
            self._index = _read_index(self.path)
            self._clean_leftovers()
            first = len(self)
            staging = self.path / STAGING_DIR / f"batch.{uuid.uuid4().hex}"
            entries: list[dict[str, Any]] = []
            published: list[Path] = []
            try:
                for j, episode in enumerate(episodes):
                    arrays = _validate_episode(episode, self.spec)
                    meta = _validate_meta(episode.meta)
                    meta["length"] = len(arrays["action"])
                    key = f"ep_{first + j:06d}"
                    self._write_group(staging / key, arrays, meta)
                    entries.append({"key": key, "length": meta["length"], "meta": meta})
                for entry in entries:
                    target = self.path / EPISODES_DIR / entry["key"]
                    os.rename(staging / entry["key"], target)
                    published.append(target)
                index = dict(self._index)
                index["episodes"] = [*self._index["episodes"], *entries]
                _atomic_write_json(self.path / INDEX_FILE, index)
                self._index = index
            except BaseException:
                for target in published:  # unpublished (the index was not replaced): remove them again
                    shutil.rmtree(target, ignore_errors=True)
                raise
            finally:
                shutil.rmtree(staging, ignore_errors=True)
                _remove_if_empty(staging.parent)
        return list(range(first, first + len(entries)))

    def _write_group(self, where: Path, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
        import zarr

        where.mkdir(parents=True)
        group = zarr.create_group(zarr.storage.LocalStore(str(where)), attributes={"meta": meta})
        for name, arr in arrays.items():
            group.create_array(name, data=arr, chunks=(_chunk_frames(arr.shape[1:], arr.dtype, len(arr)),
                                                       *arr.shape[1:]),
                               compressors=_compressors(arr.dtype), config={"write_empty_chunks": True})

    def _clean_leftovers(self) -> None:
        """Remove staging directories and unpublished episode groups left by crashed appends (lock held)."""
        shutil.rmtree(self.path / STAGING_DIR, ignore_errors=True)
        published = {e["key"] for e in self._index["episodes"]}
        episodes_dir = self.path / EPISODES_DIR
        episodes_dir.mkdir(exist_ok=True)
        for child in episodes_dir.iterdir():
            if child.name not in published:
                shutil.rmtree(child, ignore_errors=True) if child.is_dir() else child.unlink()

    @contextmanager
    def _writer_lock(self) -> Iterator[None]:
        if fcntl is None:  # pragma: no cover
            yield
            return
        with open(self.path / LOCK_FILE, "a+") as f:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)

    # -- reading

    def read_episode(self, i: int) -> Episode:
        """Read one episode (all cameras) into memory."""
        entry = self._entry(i)
        data = {name: self._read_array(i, name) for name in _array_specs(self.spec)}
        return Episode(images={cam: data[f"images/{cam}"] for cam in self.spec.cameras},
                       proprio=data["proprio"], action=data["action"], meta=dict(entry["meta"]))

    def load(self, sources: Iterable[str] | None = None, success_only: bool = False,
             episodes: Sequence[int] | None = None, lazy: bool = False,
             lean_dir: str | os.PathLike | None = None) -> EpisodeData:
        """Concatenate the selected episodes in memory (images as [N, C, S, S, 3]).

        sources: e.g. ("expert",) for the policy, None (all) for the dynamics model and the VAE.
        episodes: restrict to these store indices (in this order), intersected with the filter above.
        lazy: images become a read-only `np.memmap` of an uncompressed frame cache instead of RAM, for stores
        larger than memory (see `dapolicy.data.lean`); lean_dir: where that cache lives (default STORE/.lean).
        """
        ids = self.select(sources, success_only)
        if episodes is not None:
            allowed = set(ids)
            ids = [int(i) for i in episodes if int(i) in allowed]
        lengths = [self._index["episodes"][i]["length"] for i in ids]
        ends = np.cumsum(np.asarray(lengths, dtype=np.int64)) if ids else np.zeros(0, np.int64)
        n, s, c = int(ends[-1]) if ids else 0, self.spec.image_size, len(self.spec.cameras)
        if lazy:
            from dapolicy.data.lean import lean_images

            images = lean_images(self, ids, (sources, success_only, episodes), lean_dir)
        else:
            images = np.empty((n, c, s, s, 3), np.uint8)
        proprio = np.empty((n, self.spec.proprio_dim), np.float32)
        action = np.empty((n, self.spec.action_dim), np.float32)
        metas = []
        for j, i in enumerate(ids):
            sl = slice(int(ends[j]) - lengths[j], int(ends[j]))
            for ci, cam in enumerate(self.spec.cameras if not lazy else ()):
                images[sl, ci] = self._read_array(i, f"images/{cam}")
            proprio[sl] = self._read_array(i, "proprio")
            action[sl] = self._read_array(i, "action")
            metas.append({**self._index["episodes"][i]["meta"], "store_index": i})
        return EpisodeData(images=images, proprio=proprio, action=action, episode_ends=ends, meta=metas,
                           spec=self.spec)

    def verify(self) -> None:
        """Decompress every chunk of every episode; StoreError on the first damaged one."""
        for i in range(len(self)):
            self._check_episode(i, read_data=True)

    # -- internals

    def _entry(self, i: int) -> dict[str, Any]:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"episode {i} out of range: the store holds {n} episodes")
        return self._index["episodes"][i % n]

    def _open_array(self, i: int, name: str) -> Any:
        import zarr

        key = self._entry(i)["key"]
        where = self.path / EPISODES_DIR / key
        try:
            return zarr.open_array(zarr.storage.LocalStore(str(where), read_only=True), path=name, mode="r")
        except Exception as e:  # zarr raises several types for missing/garbled metadata
            raise StoreError(f"episode {i} ({key}): array {name!r} is missing or unreadable "
                             f"({type(e).__name__}: {e})") from e

    def _read_array(self, i: int, name: str) -> np.ndarray:
        arr = self._open_array(i, name)
        try:
            return np.asarray(arr[...])
        except Exception as e:
            raise StoreError(f"episode {i} ({self._entry(i)['key']}): array {name!r} has an unreadable chunk "
                             f"({type(e).__name__}: {e})") from e

    def _check_episode(self, i: int, read_data: bool) -> None:
        """Metadata, shape, dtype and chunk-file checks for one episode (plus a full read if asked)."""
        entry = self._entry(i)
        key, length = entry["key"], entry["length"]
        where = self.path / EPISODES_DIR / key
        if not where.is_dir():
            raise StoreError(f"index refers to missing episode {i} ({key}): no directory {where}")
        for name, (frame_shape, dtype) in _array_specs(self.spec).items():
            arr = self._open_array(i, name)
            if tuple(arr.shape) != (length, *frame_shape) or np.dtype(arr.dtype) != dtype:
                raise StoreError(f"episode {i} ({key}): array {name!r} has {np.dtype(arr.dtype)} "
                                 f"{tuple(arr.shape)}, expected {dtype} {(length, *frame_shape)} "
                                 f"(array length mismatch or wrong spec)")
            n_chunks = math.ceil(length / arr.chunks[0])
            rest = "/".join("0" for _ in frame_shape)
            for c in range(n_chunks):
                if not (where / name / "c" / str(c) / rest).is_file():
                    raise StoreError(f"episode {i} ({key}): array {name!r} is missing chunk {c} of {n_chunks}")
            if read_data:
                self._read_array(i, name)


def _read_index(path: Path) -> dict[str, Any]:
    """Load and sanity-check `index.json`; StoreError if it is missing or malformed."""
    index_path = path / INDEX_FILE
    if not index_path.is_file():
        raise StoreError(f"missing {INDEX_FILE} in {path}: not an episode store, or its creation was interrupted")
    try:
        index = json.loads(index_path.read_text())
    except (OSError, ValueError) as e:
        raise StoreError(f"{index_path} is unreadable or not valid JSON: {e}") from e
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        raise StoreError(f"{index_path} is not a {FORMAT} index")
    if index.get("version") != VERSION:
        raise StoreError(f"{index_path} has version {index.get('version')}, this library reads version {VERSION}")
    try:
        EnvSpec.from_dict(index["spec"])
    except (KeyError, TypeError) as e:
        raise StoreError(f"{index_path} has a missing or invalid env spec: {e}") from e
    episodes = index.get("episodes")
    if not isinstance(episodes, list):
        raise StoreError(f"{index_path} has no episode list")
    for i, e in enumerate(episodes):
        if not (isinstance(e, dict) and isinstance(e.get("key"), str) and isinstance(e.get("length"), int)
                and e["length"] > 0 and isinstance(e.get("meta"), dict)):
            raise StoreError(f"{index_path}: entry {i} is malformed: {e!r}")
    return index
