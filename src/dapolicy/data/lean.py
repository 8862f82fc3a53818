"""Memory-lean reading of an episode store: images as a read-only memory map instead of RAM.

Why: `EpisodeStore.load()` decompresses every image into memory, so a store larger than RAM cannot be trained
on. Zarr chunks are compressed (one random frame costs a whole chunk's decompression), so the lean path
decompresses each selected episode once, streaming, into an uncompressed frame file and maps it:

    STORE/.lean/images-<selection>.u8     uint8 [N, C, S, S, 3], the selected episodes concatenated
    STORE/.lean/images-<selection>.json   what it holds: store identity, spec, episode keys and lengths

`np.memmap` is an `np.ndarray`, so `WindowSampler.gather` (numpy fancy indexing) and every other consumer of
`EpisodeData.images` work unchanged, and the OS pages frames in and out as batches touch them.

The cache is derived data. Published episodes never change, so when the store grows the file is extended in
place; a cache that does not match the store (other spec, other episodes, a recreated store) is rebuilt.
It can be deleted at any time. `python -m dapolicy.data.lean` measures gather throughput, lean vs in RAM.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from dapolicy.atomic import fsync_dir, write_json_atomic

try:
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

LEAN_DIR = ".lean"
FORMAT = "dapolicy-lean-images"
VERSION = 1


def _selection_name(selection: Any) -> str:
    """A stable file name for a load() filter (sources, success_only, episodes): the same filter on a grown
    store names the same cache, which is then extended instead of rebuilt."""
    sources, success_only, episodes = selection
    if sources is not None:
        sources = sorted({sources} if isinstance(sources, str) else {str(s) for s in sources})
    key = json.dumps([sources, bool(success_only), None if episodes is None else [int(i) for i in episodes]])
    return "images-" + hashlib.sha256(key.encode()).hexdigest()[:16]


def _store_identity(store: Any) -> str:
    """Identifies this store instance (its root zarr.json is written once, at creation): a store deleted and
    created again at the same path gets a new identity, so a cache kept outside it is not reused by mistake."""
    st = os.stat(store.path / "zarr.json")
    return f"{st.st_dev}:{st.st_ino}:{st.st_mtime_ns}"


@contextmanager
def _locked(directory: Path) -> Iterator[None]:
    if fcntl is None:  # pragma: no cover
        yield
        return
    with open(directory / ".lock", "a+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _read_sidecar(path: Path) -> dict[str, Any] | None:
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) and meta.get("format") == FORMAT and meta.get("version") == VERSION else None


def _write_frames(store: Any, ids: Sequence[int], f: Any) -> None:
    """Append the frames of store episodes `ids` to the open binary file `f` as [T, C, S, S, 3] blocks."""
    cams = store.spec.cameras
    for i in ids:
        per_cam = [store._read_array(i, f"images/{cam}") for cam in cams]  # checksummed reads
        f.write(np.ascontiguousarray(np.stack(per_cam, axis=1)).tobytes())


def lean_images(store: Any, ids: Sequence[int], selection: Any = (None, False, None),
                lean_dir: str | os.PathLike | None = None) -> np.ndarray:
    """uint8 [N, C, S, S, 3] of the store episodes `ids` (concatenated, in order) as a read-only memory map.

    selection: the load() filter that produced `ids` (names the cache file); lean_dir: the cache folder
    (default STORE/.lean; pass another one for a read-only store). Builds or extends the cache as needed.
    """
    from dapolicy.data.store import StoreError

    spec = store.spec
    frame_shape = (len(spec.cameras), spec.image_size, spec.image_size, 3)
    frame_bytes = int(np.prod(frame_shape))
    entries = [store._entry(int(i)) for i in ids]
    keys, lengths = [e["key"] for e in entries], [int(e["length"]) for e in entries]
    n = int(sum(lengths))
    if n == 0:
        return np.zeros((0, *frame_shape), np.uint8)
    folder = Path(lean_dir) if lean_dir is not None else store.path / LEAN_DIR
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = tempfile.TemporaryFile(dir=folder)
        probe.close()
    except OSError as e:
        raise StoreError(f"cannot write the lean image cache in {folder} ({e}); "
                         "pass lean_dir= a writable folder") from e
    name = _selection_name(selection)
    data_path, side_path = folder / f"{name}.u8", folder / f"{name}.json"
    want = {"format": FORMAT, "version": VERSION, "store": _store_identity(store), "spec": spec.to_dict(),
            "frame_shape": list(frame_shape)}
    with _locked(folder):
        have = _read_sidecar(side_path)
        done = 0
        if have is not None and all(have.get(k) == v for k, v in want.items()):
            k = len(have.get("keys", []))
            size_ok = data_path.is_file() and data_path.stat().st_size >= int(have.get("frames", -1)) * frame_bytes
            if have.get("keys") == keys[:k] and have.get("lengths") == lengths[:k] and size_ok:
                done = k
        if done < len(keys):
            _build(store, ids, done, have, data_path, side_path, want, keys, lengths, frame_bytes)
    return np.memmap(data_path, dtype=np.uint8, mode="r", shape=(n, *frame_shape))


def _build(store: Any, ids: Sequence[int], done: int, have: dict[str, Any] | None, data_path: Path,
           side_path: Path, want: dict[str, Any], keys: list[str], lengths: list[int], frame_bytes: int) -> None:
    """Extend the cache by episodes ids[done:] (done > 0) or rebuild it from scratch (done == 0)."""
    if done > 0 and have is not None:
        with open(data_path, "r+b") as f:
            f.truncate(int(have["frames"]) * frame_bytes)  # drop the tail of an extension a kill interrupted
            f.seek(0, os.SEEK_END)
            _write_frames(store, ids[done:], f)
            f.flush()
            os.fsync(f.fileno())
    else:
        tmp = data_path.with_name(f".{data_path.name}.{uuid.uuid4().hex}.tmp")
        try:
            with open(tmp, "wb") as f:
                _write_frames(store, ids, f)
                f.flush()
                os.fsync(f.fileno())
            side_path.unlink(missing_ok=True)  # never a sidecar describing a file it does not belong to
            os.replace(tmp, data_path)
            fsync_dir(data_path.parent)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    write_json_atomic(side_path, {**want, "keys": keys, "lengths": lengths, "frames": int(sum(lengths))})


# ------------------------------------------------------------------------------------------------- benchmark


def _drop_page_cache(path: Path) -> bool:
    """Ask the OS to forget this one file's cached pages (cold-read measurement); False where unsupported."""
    if not hasattr(os, "posix_fadvise"):
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    return True


def _gather_rate(sampler: Any, arrays: dict[str, Any], batch_size: int, seconds: float, seed: int) -> float:
    rng = np.random.default_rng(seed)
    n = len(sampler)
    windows, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        sampler.gather(arrays, rng.integers(0, n, batch_size))
        windows += batch_size
    return windows / (time.perf_counter() - start)


def benchmark_lean(root: str | os.PathLike, n_episodes: int = 40, episode_length: int = 100, image_size: int = 64,
                   cameras: int = 2, batch_size: int = 64, n_obs: int = 2, horizon: int = 16,
                   next_obs_offset: int = 8, seconds: float = 2.0, seed: int = 0) -> dict[str, float]:
    """Windows/s of `WindowSampler.gather` on a synthetic store at `root`, in RAM vs lean (warm and cold page
    cache), plus load times and the peak memory each load allocates (tracemalloc, which sees numpy)."""
    import tracemalloc

    from dapolicy.data.sampler import WindowSampler
    from dapolicy.data.store import Episode, EpisodeStore
    from dapolicy.spec import EnvSpec

    spec = EnvSpec(name="synthetic", cameras=tuple(f"cam{c}" for c in range(cameras)), image_size=image_size,
                   action_dim=4, proprio_dim=9, max_steps=episode_length)
    rng = np.random.default_rng(seed)
    store = EpisodeStore.create(Path(root), spec)
    store.append_episodes(Episode(
        images={c: rng.integers(0, 256, (episode_length, image_size, image_size, 3), dtype=np.uint8)
                for c in spec.cameras},
        proprio=rng.standard_normal((episode_length, 9)).astype(np.float32),
        action=rng.standard_normal((episode_length, 4)).astype(np.float32),
        meta={"source": "expert", "seed": i, "success": True}) for i in range(n_episodes))
    out: dict[str, float] = {"frames": float(store.num_frames)}
    loaded = {}
    for mode, lazy in (("ram", False), ("lean_build", True), ("lean", True)):
        tracemalloc.start()
        t0 = time.perf_counter()
        loaded[mode] = store.load(lazy=lazy)
        out[f"{mode}_load_s"] = time.perf_counter() - t0
        out[f"{mode}_load_peak_mb"] = tracemalloc.get_traced_memory()[1] / 2**20
        tracemalloc.stop()
    sampler = WindowSampler(loaded["ram"].episode_ends, n_obs, horizon, next_obs_offset)
    for mode in ("ram", "lean"):
        arrays = loaded[mode].arrays()
        sampler.gather(arrays, rng.integers(0, len(sampler), batch_size))  # warm-up
        out[f"{mode}_windows_per_s"] = _gather_rate(sampler, arrays, batch_size, seconds, seed)
    images = loaded["lean"].images
    if isinstance(images, np.memmap) and _drop_page_cache(Path(images.filename)):
        out["lean_cold_windows_per_s"] = _gather_rate(sampler, loaded["lean"].arrays(), batch_size,
                                                      min(seconds, 0.5), seed + 1)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m dapolicy.data.lean", description=benchmark_lean.__doc__)
    p.add_argument("--episodes", type=int, default=40)
    p.add_argument("--length", type=int, default=100)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--cameras", type=int, default=2)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--seconds", type=float, default=2.0)
    p.add_argument("--dir", default=None, help="where to build the synthetic store (default: a temp folder)")
    a = p.parse_args(argv)
    with tempfile.TemporaryDirectory(dir=a.dir) as tmp:
        r = benchmark_lean(Path(tmp) / "store", a.episodes, a.length, a.image_size, a.cameras, a.batch,
                           seconds=a.seconds)
    print(f"{int(r['frames'])} frames, {a.cameras} cameras of {a.image_size} px, batch {a.batch} "
          f"(T_o=2, H=16, k=8)")
    print(f"in RAM: {r['ram_windows_per_s']:,.0f} windows/s; load {r['ram_load_s']:.2f}s, "
          f"peak {r['ram_load_peak_mb']:.0f} MiB")
    cold = r.get("lean_cold_windows_per_s")
    print(f"lean  : {r['lean_windows_per_s']:,.0f} windows/s (page cache warm)"
          + (f", {cold:,.0f} windows/s (cold)" if cold else "")
          + f"; first load (builds the cache) {r['lean_build_load_s']:.2f}s, peak {r['lean_build_load_peak_mb']:.0f}"
          f" MiB; later loads {r['lean_load_s']:.3f}s, peak {r['lean_load_peak_mb']:.1f} MiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
