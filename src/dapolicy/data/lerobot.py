"""LeRobotDataset v3 folders <-> the episode store (`dap import lerobot`, `dap export lerobot`).

The v3 layout (LeRobot's `CODEBASE_VERSION = "v3.0"`), as read and written here:

    meta/info.json        fps, features {key: {dtype, shape, names, info}}, data_path / video_path templates
    meta/stats.json       per-feature min/max/mean/std/count/quantiles (images: per channel, in [0, 1])
    meta/tasks.parquet    task text (the pandas index "task") -> task_index
    meta/episodes/chunk-XXX/file-YYY.parquet   one row per episode: episode_index, tasks, length,
                          data/{chunk,file}_index, dataset_{from,to}_index,
                          videos/<key>/{chunk_index,file_index,from_timestamp,to_timestamp}
    data/chunk-XXX/file-YYY.parquet            one row per frame: vector features (lists of floats),
                          timestamp, frame_index, episode_index, index, task_index (many episodes per file)
    videos/<key>/chunk-XXX/file-YYY.mp4        one stream per camera; an episode's frame j is the frame
                          at from_timestamp + timestamp[j] (many episodes back to back per file)

Import maps `observation.images.*` (dtype video, or image = PNG bytes in the parquet) to cameras,
`observation.state` to proprio and `action` to action (all overridable). Export writes the same layout plus
`meta/dap.json` (the store's env spec) and per-episode columns `source`, `success`, `seed`, `dap_meta` (the
full episode meta as JSON), so export -> import gives back the same store. Needs the `lerobot` extra
(pyarrow, av).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from dapolicy.data.foreign import (
    DatasetFormatError,
    ImportConfig,
    ImportResult,
    check_vectors,
    default_success,
    fit_square,
    map_frames,
    parse_cameras,
    resolve_image_size,
    source_of,
    write_store,
)
from dapolicy.data.store import Episode, EpisodeStore
from dapolicy.spec import EnvSpec

CODEBASE_VERSION = "v3.0"
IMAGE_PREFIX = "observation.images."
STATE_KEY = "observation.state"
ACTION_KEY = "action"
DATA_PATH = "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
VIDEO_PATH = "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4"
EPISODES_PATH = "meta/episodes/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
DAP_FILE = "meta/dap.json"
DAP_FORMAT = "dapolicy-lerobot-export"
CHUNKS_SIZE = 1000  # files per chunk folder, as LeRobot
QUANTILES = (0.01, 0.10, 0.50, 0.90, 0.99)
OPTIONAL_COLUMNS = ("frame_index", "timestamp")  # without them: file order, and frame_index / fps

#: export codecs: name -> (encoder, pixel format, options). "lossless" and "ffv1" decode bit-exactly.
CODECS: dict[str, tuple[str, str, dict[str, str]]] = {
    "lossless": ("libx264rgb", "rgb24", {"qp": "0", "preset": "veryfast"}),  # H.264 High 4:4:4, RGB, qp 0
    "ffv1": ("ffv1", "bgr0", {}),  # lossless, every frame a keyframe
    "h264": ("libx264", "yuv420p", {"crf": "18", "preset": "veryfast"}),  # lossy, widely decodable
    "av1": ("libsvtav1", "yuv420p", {"crf": "30", "preset": "8"}),  # lossy, LeRobot's default encoding
}


def _deps() -> tuple[Any, Any, Any]:
    """(pyarrow, pyarrow.parquet, av) or one clear ImportError naming the extra."""
    try:
        import av
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as e:
        raise ImportError(f"LeRobot datasets need the optional extra: pip install 'dapolicy[lerobot]' ({e})") from None
    return pa, pq, av


# ================================================================================================ reading


def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise DatasetFormatError(f"missing {path}: not a LeRobotDataset v3 folder")
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DatasetFormatError(f"{path} is unreadable or not valid JSON ({e})") from None


def _read_parquet(path: Path, columns: Sequence[str] | None = None) -> Any:
    pa, pq, _ = _deps()
    if not path.is_file():
        raise DatasetFormatError(f"missing {path} (referenced by the episode index)")
    try:
        return pq.read_table(path, columns=list(columns) if columns is not None else None)
    except (pa.ArrowException, OSError, ValueError) as e:
        raise DatasetFormatError(f"{path} is not a readable parquet file ({type(e).__name__}: {e})") from None


def _parquet_columns(path: Path) -> list[str]:
    pa, pq, _ = _deps()
    if not path.is_file():
        raise DatasetFormatError(f"missing {path} (referenced by the episode index)")
    try:
        return list(pq.read_schema(path).names)
    except (pa.ArrowException, OSError, ValueError) as e:
        raise DatasetFormatError(f"{path} is not a readable parquet file ({type(e).__name__}: {e})") from None


def column_array(col: Any, name: str, where: str) -> np.ndarray:
    """[n, D] numpy array of an arrow column of numbers or of equal-length (nested) lists of numbers."""
    pa, _, _ = _deps()
    import pyarrow.compute as pc

    arr = col.combine_chunks() if hasattr(col, "combine_chunks") else col
    n = len(arr)
    if arr.null_count:
        raise DatasetFormatError(f"{where}: {name!r} has {arr.null_count} missing values")
    while pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type) or pa.types.is_fixed_size_list(arr.type):
        if not pa.types.is_fixed_size_list(arr.type) and len(arr):
            lengths = pc.unique(pc.list_value_length(arr)).to_pylist()
            if len(lengths) != 1:
                raise DatasetFormatError(f"{where}: {name!r} rows have different lengths {sorted(lengths)}")
        arr = arr.flatten()
    if not (pa.types.is_integer(arr.type) or pa.types.is_floating(arr.type) or pa.types.is_boolean(arr.type)):
        raise DatasetFormatError(f"{where}: {name!r} holds {arr.type}, expected numbers")
    return np.asarray(arr.to_numpy(zero_copy_only=False)).reshape(n, -1)


class _VideoFile:
    """Frames of one mp4 by timestamp, read forward (episodes lie back to back); seeks only if asked to go back.

    tol: largest distance between an asked timestamp and the frame that answers it; a frame missing from the
    video (truncated or dropped) leaves a gap of a whole frame period and is reported, not papered over.
    """

    def __init__(self, path: Path, tol: float) -> None:
        from av.video.reformatter import VideoReformatter

        self.path, self.tol = path, tol
        self._container: Any = None
        self._rgb = VideoReformatter()  # reused: ~10x faster than a fresh conversion context per frame
        self._open(0.0)

    def _open(self, start: float) -> None:
        _, _, av = _deps()
        self.close()
        if not self.path.is_file():
            raise DatasetFormatError(f"missing video {self.path} (referenced by the episode index)")
        try:
            self._container = av.open(str(self.path))
            stream = self._container.streams.video[0]
            if start > 0:
                self._container.seek(int(start / stream.time_base), stream=stream, backward=True, any_frame=False)
            self._frames = self._container.decode(stream)
        except (av.error.FFmpegError, IndexError, OSError) as e:
            raise DatasetFormatError(f"{self.path}: unreadable video ({type(e).__name__}: {e})") from None
        self._next: Any = None
        self._pos = -1.0  # timestamp of the last frame handed out

    def _peek(self) -> Any:
        _, _, av = _deps()
        while self._next is None:
            try:
                frame = next(self._frames)
            except StopIteration:
                return None
            except (av.error.FFmpegError, OSError) as e:
                raise DatasetFormatError(f"{self.path}: corrupt video data ({type(e).__name__}: {e})") from None
            if frame.pts is not None:
                self._next = frame
        return self._next

    def frames_at(self, times: np.ndarray, transform: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
        """transform(rgb uint8 [H, W, 3]) of the frame at each timestamp (seconds, increasing)."""
        if len(times) and times[0] < self._pos + self.tol:
            self._open(float(times[0]))
        out = []
        for q in times:
            while True:
                frame = self._peek()
                if frame is None:
                    raise DatasetFormatError(f"{self.path}: video ends before t={q:.4f}s (last frame at "
                                             f"{self._pos:.4f}s): truncated video or wrong timestamps")
                t = float(frame.time)
                if t < q - self.tol:
                    self._next = None
                    continue
                if t > q + self.tol:
                    raise DatasetFormatError(f"{self.path}: no frame at t={q:.4f}s (next one at {t:.4f}s): the "
                                             f"video misses frames or disagrees with the data's timestamps")
                out.append(transform(self._rgb.reformat(frame, format="rgb24").to_ndarray()))
                self._next, self._pos = None, t
                break
        return np.stack(out) if out else np.zeros((0, 1, 1, 3), np.uint8)

    def close(self) -> None:
        if self._container is not None:
            self._container.close()
            self._container = None


class LeRobotFolder:
    """A LeRobotDataset v3 folder opened for reading: info, the episode index, tasks, frames by episode."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise DatasetFormatError(f"no LeRobot dataset at {self.root}: not a folder")
        info = _read_json(self.root / "meta" / "info.json")
        version = str(info.get("codebase_version", "?"))
        if not version.startswith("v3"):
            raise DatasetFormatError(f"{self.root} is a LeRobotDataset {version} folder; this reads v3.0 (convert "
                                     f"older ones with LeRobot's convert_dataset_v21_to_v30)")
        for key in ("fps", "features"):
            if key not in info:
                raise DatasetFormatError(f"{self.root}/meta/info.json has no {key!r}")
        self.info, self.fps, self.features = info, float(info["fps"]), dict(info["features"])
        self.data_path = info.get("data_path", DATA_PATH)
        self.video_path = info.get("video_path", VIDEO_PATH)
        self.episodes = self._read_episodes()
        self.tasks = self._read_tasks()
        dap = self.root / DAP_FILE
        self.dap = _read_json(dap) if dap.is_file() else None
        self._table_path: Path | None = None

    def _read_episodes(self) -> list[dict[str, Any]]:
        pa, _, _ = _deps()
        folder = self.root / "meta" / "episodes"
        files = sorted(folder.rglob("*.parquet")) if folder.is_dir() else []
        if not files:
            raise DatasetFormatError(f"no episode index in {folder} (meta/episodes/chunk-*/file-*.parquet)")
        tables = [_read_parquet(f) for f in files]
        tables = [t.select([c for c in t.column_names if not c.startswith("stats/")]) for t in tables]
        try:
            table = pa.concat_tables(tables, promote_options="permissive")
        except pa.ArrowException as e:
            raise DatasetFormatError(f"the episode index files in {folder} disagree ({e})") from None
        for key in ("episode_index", "length", "data/chunk_index", "data/file_index"):
            if key not in table.column_names:
                raise DatasetFormatError(f"the episode index in {folder} has no column {key!r}")
        rows = sorted(table.to_pylist(), key=lambda r: r["episode_index"])
        for r in rows:
            if not isinstance(r["length"], int) or r["length"] < 1:
                raise DatasetFormatError(f"episode {r['episode_index']}: invalid length {r['length']!r}")
        return rows

    def _read_tasks(self) -> dict[int, str]:
        path = self.root / "meta" / "tasks.parquet"
        if not path.is_file():
            return {}
        table = _read_parquet(path)
        text = next((c for c in ("task", "__index_level_0__") if c in table.column_names), None)
        if text is None or "task_index" not in table.column_names:
            return {}
        return dict(zip(table.column("task_index").to_pylist(), table.column(text).to_pylist()))

    # -- features

    def image_keys(self) -> list[str]:
        return [k for k, ft in self.features.items() if ft.get("dtype") in ("video", "image")]

    def vector_dim(self, key: str) -> int:
        ft = self.features.get(key)
        if ft is None:
            vectors = [k for k, f in self.features.items() if f.get("dtype") not in ("video", "image", "string")]
            raise DatasetFormatError(f"{self.root}: no feature {key!r} (numeric features: {vectors})")
        if ft.get("dtype") in ("video", "image", "string", "language"):
            raise DatasetFormatError(f"{self.root}: feature {key!r} is {ft.get('dtype')}, not a vector")
        return int(np.prod(ft.get("shape") or [1]))

    def frame_shape(self, key: str) -> tuple[int, int]:
        """(height, width) of an image feature, from info.json (shape [H, W, C], or names saying otherwise)."""
        ft = self.features[key]
        shape, names = list(ft.get("shape", [])), ft.get("names") or []
        if len(shape) != 3:
            raise DatasetFormatError(f"{self.root}: image feature {key!r} has shape {shape}, expected [H, W, 3]")
        if list(names)[:1] == ["channels"]:
            return int(shape[1]), int(shape[2])
        return int(shape[0]), int(shape[1])

    # -- frames

    def rows(self, ep: dict[str, Any], columns: Sequence[str]) -> Any:
        """Arrow table of the episode's frames (columns asked for), ordered by frame_index; checks the count."""
        pa, _, _ = _deps()
        path = self.root / self.data_path.format(chunk_index=ep["data/chunk_index"], file_index=ep["data/file_index"])
        wanted = list(dict.fromkeys(["episode_index", *OPTIONAL_COLUMNS, *columns]))
        if self._table_path != path:
            names = _parquet_columns(path)
            missing = [c for c in wanted if c not in names and c not in OPTIONAL_COLUMNS]
            if missing:
                raise DatasetFormatError(f"{path} has no column(s) {missing} (columns: {names})")
            self._table = _read_parquet(path, columns=[c for c in wanted if c in names])
            self._table_path, self._episode_of = path, column_array(
                self._table.column("episode_index"), "episode_index", str(path))[:, 0]
        idx = np.flatnonzero(self._episode_of == ep["episode_index"])
        if "frame_index" in self._table.column_names:
            frame = column_array(self._table.column("frame_index"), "frame_index", str(path))[idx, 0]
            idx = idx[np.argsort(frame, kind="stable")]
        if len(idx) != ep["length"]:
            raise DatasetFormatError(f"episode {ep['episode_index']}: {path} holds {len(idx)} frames, the episode "
                                     f"index says {ep['length']} (truncated or mismatched data file)")
        return self._table.take(pa.array(idx))

    def video_file(self, ep: dict[str, Any], key: str) -> Path:
        try:
            chunk, file = ep[f"videos/{key}/chunk_index"], ep[f"videos/{key}/file_index"]
        except KeyError:
            raise DatasetFormatError(f"episode {ep['episode_index']}: the episode index has no "
                                     f"videos/{key}/chunk_index or file_index") from None
        return self.root / self.video_path.format(video_key=key, chunk_index=chunk, file_index=file)


def _decode_png_column(col: Any, key: str, where: str, transform: Callable) -> np.ndarray:
    from PIL import Image

    frames = []
    for j, item in enumerate(col.to_pylist()):
        data = item.get("bytes") if isinstance(item, dict) else item
        try:
            frames.append(transform(np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))))
        except Exception as e:  # PIL raises many types for damaged images
            raise DatasetFormatError(f"{where}: image {key!r} of frame {j} is unreadable ({e})") from None
    return np.stack(frames)


def _field(ep: dict[str, Any], rows: Any, name: str, where: str, any_frame: bool = False) -> Any:
    """A per-episode value: the episode index's column, else a per-frame data column that must be constant over
    the episode (any_frame: true if any frame's value is, e.g. a per-frame success flag)."""
    if name in ep:
        return ep[name]
    if name in rows.column_names:
        values = rows.column(name).to_pylist()
        if any_frame:
            return any(bool(v) for v in values)
        if len(set(map(str, values))) != 1:
            raise DatasetFormatError(f"{where}: field {name!r} changes within the episode")
        return values[0]
    raise DatasetFormatError(f"{where}: no field {name!r} in the episode index or the data")


def _episode_meta(ep: dict[str, Any], rows: Any, cfg: ImportConfig) -> dict[str, Any]:
    """Store meta: a DAP export's own meta back (dap_meta column), else source/seed/success made up from the
    options, with the source episode index as seed; explicit options override either."""
    where = f"episode {ep['episode_index']}"
    exported = ep.get("dap_meta")
    if isinstance(exported, str) and exported:
        try:
            meta = json.loads(exported)
        except ValueError as e:
            raise DatasetFormatError(f"{where}: dap_meta is not valid JSON ({e})") from None
    else:
        tasks = [t for t in (ep.get("tasks") or []) if isinstance(t, str)]
        meta = {"source": "expert", "seed": int(ep["episode_index"]), "success": None, "origin": "lerobot",
                "episode_index": int(ep["episode_index"]), **({"tasks": tasks} if tasks else {})}
    if cfg.source_field:
        meta["source"] = source_of(_field(ep, rows, cfg.source_field, where), cfg.source or "expert",
                                   cfg.source_field, where)
    elif cfg.source:
        meta["source"] = cfg.source
    if cfg.success_field:
        meta["success"] = bool(_field(ep, rows, cfg.success_field, where, any_frame=True))
    elif meta["success"] is None:
        meta["success"] = bool(ep["success"]) if isinstance(ep.get("success"), bool) \
            else default_success(meta["source"])
    return meta


def _spec(folder: LeRobotFolder, cfg: ImportConfig, cams: dict[str, str], proprio: Sequence[str], action: str,
          size: int) -> EnvSpec:
    dap = (folder.dap or {}).get("spec") if (folder.dap or {}).get("format") == DAP_FORMAT else None
    a_dim = folder.vector_dim(action)
    low: tuple[float, ...] = ()
    high: tuple[float, ...] = ()
    stats_path = folder.root / "meta" / "stats.json"
    if dap is not None:
        low, high = tuple(dap.get("action_low", ())), tuple(dap.get("action_high", ()))
    elif stats_path.is_file():
        st = (_read_json(stats_path) or {}).get(action, {})
        lo, hi = np.asarray(st.get("min", []), np.float64).ravel(), np.asarray(st.get("max", []), np.float64).ravel()
        if len(lo) == len(hi) == a_dim:
            low, high = tuple(map(float, lo)), tuple(map(float, hi))
    name = cfg.name or (dap or {}).get("name") or f"lerobot/{folder.info.get('robot_type') or folder.root.name}"
    max_steps = int((dap or {}).get("max_steps") or max(ep["length"] for ep in folder.episodes))
    return EnvSpec(name=name, cameras=tuple(cams), image_size=size, action_dim=a_dim,
                   proprio_dim=sum(folder.vector_dim(k) for k in proprio), max_steps=max_steps,
                   action_low=low, action_high=high)


def import_lerobot(src: str | os.PathLike, out: str | os.PathLike, cfg: ImportConfig | None = None) -> ImportResult:
    """Import a LeRobotDataset v3 folder into the episode store at `out` (new, or appended to with cfg.append).

    Streams one episode at a time (memory: one episode); all-or-nothing (see `foreign.write_store`).
    """
    cfg = cfg or ImportConfig()
    cfg.check()
    folder = LeRobotFolder(src)
    cams = parse_cameras(cfg.cameras, folder.image_keys(), IMAGE_PREFIX)
    if not cams:
        raise DatasetFormatError(f"{folder.root}: no image or video features (features: {list(folder.features)})")
    proprio = list(cfg.proprio) or [STATE_KEY]
    action = cfg.action or ACTION_KEY
    dap_spec = (folder.dap or {}).get("spec") or {}
    size = resolve_image_size(cfg, out, dap_spec.get("image_size"))
    spec = _spec(folder, cfg, cams, proprio, action, size)
    columns = [*proprio, action]
    columns += [k for k in cams.values() if folder.features[k].get("dtype") == "image"]
    names = set(folder.episodes[0])
    columns += [f for f in (cfg.source_field, cfg.success_field) if f and f not in names]
    for key in cams.values():
        folder.frame_shape(key)
    return write_store(out, spec, _episodes(folder, cfg, cams, proprio, action, size, columns), append=cfg.append,
                       total=len(folder.episodes), progress=cfg.progress)


def _episodes(folder: LeRobotFolder, cfg: ImportConfig, cams: dict[str, str], proprio: Sequence[str], action: str,
              size: int, columns: Sequence[str]) -> Iterator[Episode]:
    videos: dict[str, _VideoFile] = {}

    def transform(frame: np.ndarray) -> np.ndarray:
        return fit_square(frame, size, cfg.crop)

    try:
        for ep in folder.episodes:
            where = f"episode {ep['episode_index']}"
            rows = folder.rows(ep, columns)
            n = rows.num_rows
            state = np.concatenate([check_vectors(k, column_array(rows.column(k), k, where), where)
                                    for k in proprio], axis=1)
            act = check_vectors(action, column_array(rows.column(action), action, where), where)
            if "timestamp" in rows.column_names:
                ts = column_array(rows.column("timestamp"), "timestamp", where)[:, 0].astype(np.float64)
            else:
                ts = np.arange(n) / folder.fps
            images = {}
            for name, key in cams.items():
                if folder.features[key].get("dtype") == "image":
                    images[name] = _decode_png_column(rows.column(key), key, where, transform)
                    continue
                path = folder.video_file(ep, key)
                if key not in videos or videos[key].path != path:
                    if key in videos:
                        videos[key].close()
                    videos[key] = _VideoFile(path, tol=0.4 / folder.fps)
                start = float(ep.get(f"videos/{key}/from_timestamp") or 0.0)
                images[name] = map_frames(videos[key].frames_at(start + ts, transform), size, cfg.crop, where)
            yield Episode(images=images, proprio=state, action=act, meta=_episode_meta(ep, rows, cfg))
    finally:
        for v in videos.values():
            v.close()


# ================================================================================================ writing


@dataclass
class ExportConfig:
    """How `export_lerobot` writes a store as a LeRobotDataset v3 folder.

    fps: frame rate for info.json, timestamps and videos (the store keeps none; LeRobot needs one).
    codec: a CODECS name: "lossless" (default; H.264 RGB at qp 0, bit-exact), "ffv1" (bit-exact, intra only),
        "h264" or "av1" (lossy, smaller; "av1" is LeRobot's own default encoding).
    gop: keyframe interval (LeRobot's default 2 keeps random access by timestamp cheap).
    task: task text of episodes whose meta has no "task" (None: the store's env name).
    robot_type: info.json robot_type (None: the store's env name).
    sources: export only episodes of these sources (None: all).
    frames_per_file: start new data and video files after this many frames (LeRobot shards files too).
    progress: show a progress bar.
    """

    fps: int = 10
    codec: str = "lossless"
    gop: int = 2
    task: str | None = None
    robot_type: str | None = None
    sources: tuple[str, ...] | None = None
    frames_per_file: int = 50_000
    progress: bool = False


@dataclass
class ExportResult:
    """What an export wrote."""

    path: Path
    episodes: int
    frames: int
    seconds: float


class _VideoWriter:
    """One mp4 stream; frame k of the file is shown at k / fps."""

    def __init__(self, path: Path, size: int, fps: int, codec: str, gop: int) -> None:
        _, _, av = _deps()
        encoder, pix_fmt, options = CODECS[codec]
        if encoder == "libsvtav1":
            os.environ.setdefault("SVT_LOG", "1")  # SVT-AV1 prints its configuration banner otherwise
        path.parent.mkdir(parents=True, exist_ok=True)
        self.fps, self.count = fps, 0
        self.container = av.open(str(path), "w")
        try:
            self.stream = self.container.add_stream(encoder, rate=fps, options={**options, "g": str(gop)})
            self.stream.width = self.stream.height = size
            self.stream.pix_fmt = pix_fmt
        except (ValueError, av.error.FFmpegError) as e:
            self.container.close()
            raise DatasetFormatError(f"PyAV {av.__version__} cannot write codec {codec!r} ({encoder}) into mp4 "
                                     f"({e}); ffv1 needs av>=16, or use --codec lossless") from None
        except BaseException:
            self.container.close()
            raise

    def write(self, frames: np.ndarray) -> None:
        _, _, av = _deps()
        for f in frames:
            vf = av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")
            vf.pts, vf.time_base = self.count, Fraction(1, self.fps)
            self.count += 1
            for packet in self.stream.encode(vf):
                self.container.mux(packet)

    def close(self) -> None:
        for packet in self.stream.encode():
            self.container.mux(packet)
        self.container.close()


def _stats(values: np.ndarray, image: bool = False) -> dict[str, Any]:
    """LeRobot's stats entry: per dim (vectors) or per channel [3, 1, 1] in [0, 1] (images)."""
    if image:
        x = values.reshape(-1, 3).astype(np.float64) / 255.0
        shape: tuple[int, ...] = (3, 1, 1)
    else:
        x = values.reshape(len(values), -1).astype(np.float64)
        shape = (x.shape[1],)
    out = {"min": x.min(0), "max": x.max(0), "mean": x.mean(0), "std": x.std(0)}
    out.update({f"q{round(q * 100):02d}": np.quantile(x, q, axis=0) for q in QUANTILES})
    out = {k: v.reshape(shape).tolist() for k, v in out.items()}
    out["count"] = [int(len(values))]
    return out


def _tasks_table(tasks: list[str]) -> Any:
    """meta/tasks.parquet as LeRobot writes it with pandas: column task_index, the index "task" holds the text."""
    pa, _, _ = _deps()
    pandas_meta = {"index_columns": ["task"], "column_indexes": [
        {"name": None, "field_name": None, "pandas_type": "unicode", "numpy_type": "object",
         "metadata": {"encoding": "UTF-8"}}], "columns": [
        {"name": "task_index", "field_name": "task_index", "pandas_type": "int64", "numpy_type": "int64",
         "metadata": None},
        {"name": "task", "field_name": "task", "pandas_type": "unicode", "numpy_type": "object", "metadata": None}],
        "creator": {"library": "pyarrow", "version": pa.__version__}, "pandas_version": "2.2.3"}
    schema = pa.schema([("task_index", pa.int64()), ("task", pa.string())],
                       metadata={b"pandas": json.dumps(pandas_meta).encode()})
    return pa.table({"task_index": list(range(len(tasks))), "task": tasks}, schema=schema)


def export_lerobot(store_path: str | os.PathLike, out: str | os.PathLike,
                   cfg: ExportConfig | None = None) -> ExportResult:
    """Write the store's episodes as a LeRobotDataset v3 folder at `out` (which must not exist, or be empty).

    Built in a hidden sibling folder and renamed into place when complete: never a half-written dataset.
    """
    cfg = cfg or ExportConfig()
    _deps()
    if cfg.codec not in CODECS:
        raise DatasetFormatError(f"unknown codec {cfg.codec!r}: expected one of {list(CODECS)}")
    if cfg.fps < 1 or cfg.gop < 1 or cfg.frames_per_file < 1:
        raise DatasetFormatError(f"fps, gop and frames_per_file must be positive, got {cfg.fps}, {cfg.gop}, "
                                 f"{cfg.frames_per_file}")
    store = EpisodeStore.open(store_path)
    ids = store.select(cfg.sources)
    if not ids:
        raise DatasetFormatError(f"{store.path}: no episodes{f' of sources {cfg.sources}' if cfg.sources else ''}")
    if CODECS[cfg.codec][1] == "yuv420p" and store.spec.image_size % 2:
        raise DatasetFormatError(f"codec {cfg.codec!r} needs an even image size, the store has "
                                 f"{store.spec.image_size}: use --codec lossless or ffv1")
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} exists and is not empty")
    t0 = time.perf_counter()
    tmp = out.parent / f".{out.name}.export-{uuid.uuid4().hex[:8]}"
    try:
        frames = _write_folder(store, ids, tmp, cfg)
        if out.exists():
            out.rmdir()
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ExportResult(out, len(ids), frames, time.perf_counter() - t0)


def _write_folder(store: EpisodeStore, ids: Sequence[int], root: Path, cfg: ExportConfig) -> int:
    pa, pq, _ = _deps()
    spec = store.spec
    fps, size = int(cfg.fps), spec.image_size
    cam_keys = {cam: IMAGE_PREFIX + cam for cam in spec.cameras}
    total = sum(store.meta[i]["length"] for i in ids)
    sample_at = set(np.linspace(0, total - 1, num=min(total, 512)).astype(np.int64).tolist())
    samples: dict[str, list[np.ndarray]] = {k: [] for k in cam_keys.values()}
    vectors: dict[str, list[np.ndarray]] = {STATE_KEY: [], ACTION_KEY: []}
    tasks: dict[str, int] = {}
    episode_rows: list[dict[str, Any]] = []
    chunk = file = in_file = done = 0
    writer: Any = None
    videos: dict[str, _VideoWriter] = {}
    schema = pa.schema([(STATE_KEY, pa.list_(pa.float32(), spec.proprio_dim)),
                        (ACTION_KEY, pa.list_(pa.float32(), spec.action_dim)),
                        ("timestamp", pa.float32()), ("frame_index", pa.int64()), ("episode_index", pa.int64()),
                        ("index", pa.int64()), ("task_index", pa.int64())])

    def close_files() -> None:
        if writer is not None:
            writer.close()
        for v in videos.values():
            v.close()
        videos.clear()

    from tqdm.auto import tqdm

    root.mkdir(parents=True)
    try:
        for e, i in enumerate(tqdm(ids, desc="export", unit="ep", disable=not cfg.progress, leave=False)):
            ep = store.read_episode(i)
            n = len(ep)
            if writer is not None and in_file + n > cfg.frames_per_file:
                close_files()
                writer, in_file = None, 0
                chunk, file = (chunk + 1, 0) if file == CHUNKS_SIZE - 1 else (chunk, file + 1)
            if writer is None:
                path = root / DATA_PATH.format(chunk_index=chunk, file_index=file)
                path.parent.mkdir(parents=True, exist_ok=True)
                writer = pq.ParquetWriter(path, schema)
                videos.update({key: _VideoWriter(root / VIDEO_PATH.format(video_key=key, chunk_index=chunk,
                                                                           file_index=file), size, fps, cfg.codec,
                                                 cfg.gop) for key in cam_keys.values()})
            meta = {k: v for k, v in ep.meta.items() if k != "length"}
            task = str(meta.get("task") or cfg.task or spec.name)
            task_index = tasks.setdefault(task, len(tasks))
            writer.write_table(pa.table({
                STATE_KEY: pa.FixedSizeListArray.from_arrays(pa.array(ep.proprio.ravel()), spec.proprio_dim),
                ACTION_KEY: pa.FixedSizeListArray.from_arrays(pa.array(ep.action.ravel()), spec.action_dim),
                "timestamp": pa.array((np.arange(n) / fps).astype(np.float32)),
                "frame_index": pa.array(np.arange(n, dtype=np.int64)),
                "episode_index": pa.array(np.full(n, e, np.int64)),
                "index": pa.array(np.arange(done, done + n, dtype=np.int64)),
                "task_index": pa.array(np.full(n, task_index, np.int64))}, schema=schema))
            row: dict[str, Any] = {"episode_index": e, "tasks": [task], "length": n, "data/chunk_index": chunk,
                                   "data/file_index": file, "dataset_from_index": done, "dataset_to_index": done + n}
            picks = [t - done for t in range(done, done + n) if t in sample_at]
            for cam, key in cam_keys.items():
                videos[key].write(ep.images[cam])
                row.update({f"videos/{key}/chunk_index": chunk, f"videos/{key}/file_index": file,
                            f"videos/{key}/from_timestamp": in_file / fps,
                            f"videos/{key}/to_timestamp": (in_file + n) / fps})
                samples[key].extend(ep.images[cam][picks])
            row.update({"meta/episodes/chunk_index": 0, "meta/episodes/file_index": 0,
                        "source": meta["source"], "success": bool(meta["success"]), "seed": int(meta["seed"]),
                        "dap_meta": json.dumps(meta)})
            episode_rows.append(row)
            vectors[STATE_KEY].append(ep.proprio)
            vectors[ACTION_KEY].append(ep.action)
            in_file += n
            done += n
    finally:
        close_files()
    _write_meta(root, store, cfg, episode_rows, list(tasks), vectors, samples, cam_keys, done)
    return done


def _video_info(path: Path, fps: int) -> dict[str, Any]:
    _, _, av = _deps()
    with av.open(str(path)) as c:
        s = c.streams.video[0]
        return {"video.height": s.height, "video.width": s.width, "video.codec": s.codec_context.codec.name,
                "video.pix_fmt": s.pix_fmt, "is_depth_map": False, "video.fps": fps, "video.channels": 3,
                "has_audio": False}


def _write_meta(root: Path, store: EpisodeStore, cfg: ExportConfig, episode_rows: list[dict[str, Any]],
                tasks: list[str], vectors: dict[str, list[np.ndarray]], samples: dict[str, list[np.ndarray]],
                cam_keys: dict[str, str], frames: int) -> None:
    pa, pq, _ = _deps()
    spec, fps = store.spec, int(cfg.fps)
    path = root / EPISODES_PATH.format(chunk_index=0, file_index=0)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(episode_rows), path)
    pq.write_table(_tasks_table(tasks), root / "meta" / "tasks.parquet")
    features: dict[str, Any] = {}
    for key in cam_keys.values():
        first = root / VIDEO_PATH.format(video_key=key, chunk_index=0, file_index=0)
        features[key] = {"dtype": "video", "shape": [spec.image_size, spec.image_size, 3],
                         "names": ["height", "width", "channels"], "info": _video_info(first, fps)}
    features[STATE_KEY] = {"dtype": "float32", "shape": [spec.proprio_dim],
                           "names": [f"state_{i}" for i in range(spec.proprio_dim)]}
    features[ACTION_KEY] = {"dtype": "float32", "shape": [spec.action_dim],
                            "names": [f"action_{i}" for i in range(spec.action_dim)]}
    features.update({"timestamp": {"dtype": "float32", "shape": [1], "names": None},
                     **{k: {"dtype": "int64", "shape": [1], "names": None}
                        for k in ("frame_index", "episode_index", "index", "task_index")}})
    stats: dict[str, Any] = {key: _stats(np.stack(samples[key]), image=True) for key in cam_keys.values()}
    for key, parts in vectors.items():
        stats[key] = _stats(np.concatenate(parts))
    lengths = [r["length"] for r in episode_rows]
    stats["timestamp"] = _stats(np.concatenate([np.arange(n) / fps for n in lengths]))
    stats["frame_index"] = _stats(np.concatenate([np.arange(n) for n in lengths]))
    stats["episode_index"] = _stats(np.repeat(np.arange(len(lengths)), lengths))
    stats["index"] = _stats(np.arange(frames))
    stats["task_index"] = _stats(np.concatenate([np.full(r["length"], tasks.index(r["tasks"][0]))
                                                 for r in episode_rows]))
    info = {"codebase_version": CODEBASE_VERSION, "robot_type": cfg.robot_type or spec.name,
            "total_episodes": len(episode_rows), "total_frames": frames, "total_tasks": len(tasks),
            "chunks_size": CHUNKS_SIZE, "data_files_size_in_mb": 100, "video_files_size_in_mb": 200, "fps": fps,
            "splits": {"train": f"0:{len(episode_rows)}"}, "data_path": DATA_PATH, "video_path": VIDEO_PATH,
            "features": features}
    (root / "meta" / "info.json").write_text(json.dumps(info, indent=4) + "\n")
    (root / "meta" / "stats.json").write_text(json.dumps(stats, indent=4) + "\n")
    (root / DAP_FILE).write_text(json.dumps({"format": DAP_FORMAT, "version": 1, "spec": spec.to_dict(),
                                             "codec": cfg.codec, "fps": fps}, indent=2) + "\n")
