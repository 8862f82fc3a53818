"""What every importer of a foreign dataset shares: options, the error type, image fitting, episode sources,
and writing into an episode store all-or-nothing.

Why one place: the LeRobot and Diffusion-Policy importers must map options, reject bad input and publish
episodes the same way, so a user who learns one learns both.
"""

from __future__ import annotations

import os
import re
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from dapolicy.atomic import fsync_dir
from dapolicy.data.store import COLLECT_STORE_NAME, INDEX_FILE, SOURCES, Episode, EpisodeStore
from dapolicy.spec import EnvSpec

#: image size of an import when neither --image-size, an existing store (--append) nor a DAP export says one
DEFAULT_IMAGE_SIZE = 64
CROPS = ("center", "pad")


class DatasetFormatError(ValueError):
    """A foreign dataset is missing keys, has wrong shapes or values (NaN), or holds unreadable files."""


@dataclass
class ImportConfig:
    """How an importer maps a foreign dataset onto the episode store (the `dap import` options).

    cameras: "NAME=KEY" or "KEY" entries choosing the image arrays and the store's camera names
        (empty: every image array of the dataset, named after the key's last part).
    proprio: keys concatenated (in order, flattened) into proprio [T, P] (empty: the format's default).
    action: key of the action array [T, A] (None: the format's default).
    image_size: side of the square store images (None: the existing store's with `append`, a DAP export's,
        else DEFAULT_IMAGE_SIZE).
    crop: how non-square frames become square before resizing: "center" crops the long side to the short one
        (keeps the middle), "pad" pads the short side with black (keeps everything).
    source: store source of every episode: "expert", "random" (random-action data) or "noisy_expert"
        (None: a DAP export's own per-episode sources, else "expert").
    source_field: per-episode field giving the source instead: a string in SOURCES, or a bool/int that is
        true for random-action episodes (false: `source`).
    success_field: per-episode bool field for meta["success"] (None: "success" if the dataset has it, else
        True for demonstrations and False for random episodes).
    name: env name written into the store's spec (None: a DAP export's, else "<format>/<folder name>").
    append: add to the existing store at the output instead of creating a new one.
    progress: show a progress bar.
    """

    cameras: tuple[str, ...] = ()
    proprio: tuple[str, ...] = ()
    action: str | None = None
    image_size: int | None = None
    crop: str = "center"
    source: str | None = None
    source_field: str | None = None
    success_field: str | None = None
    name: str | None = None
    append: bool = False
    progress: bool = False

    def check(self) -> None:
        if self.crop not in CROPS:
            raise DatasetFormatError(f"crop must be one of {CROPS}, got {self.crop!r}")
        if self.source is not None and self.source not in SOURCES:
            raise DatasetFormatError(f"source must be one of {SOURCES}, got {self.source!r}")
        if self.image_size is not None and self.image_size < 1:
            raise DatasetFormatError(f"image size must be a positive number of pixels, got {self.image_size}")


@dataclass
class ImportResult:
    """What an import wrote: the store, the new episodes' indices in it, their frames, and the time taken."""

    store_path: Path
    episodes: list[int]
    frames: int
    seconds: float

    @property
    def frames_per_s(self) -> float:
        return self.frames / max(self.seconds, 1e-9)


def _camera_name(key: str, prefix: str) -> str:
    """observation.images.top -> top (the prefix), observation.image -> image, data/img -> img."""
    return key[len(prefix):] if prefix and key.startswith(prefix) else re.split(r"[./]", key)[-1]


def parse_cameras(entries: Sequence[str], available: Sequence[str], prefix: str = "") -> dict[str, str]:
    """{camera name: dataset key} from "NAME=KEY" / "KEY" entries (empty: all `available`, named by their key
    without `prefix`); DatasetFormatError naming an unknown key."""
    if not entries:
        out = {_camera_name(k, prefix): k for k in available}
        if len(out) != len(available):
            raise DatasetFormatError(f"image keys {list(available)} give clashing camera names: name them with "
                                     f"--camera NAME=KEY")
        return out
    out: dict[str, str] = {}
    for entry in entries:
        name, _, key = entry.partition("=") if "=" in entry else ("", "", entry)
        key = key.strip()
        if key not in available:
            raise DatasetFormatError(f"camera key {key!r} is not an image array of this dataset "
                                     f"(image arrays: {list(available) or 'none'})")
        name = name.strip() or _camera_name(key, prefix)
        if name in out:
            raise DatasetFormatError(f"camera name {name!r} is given twice")
        out[name] = key
    return out


def fit_square(frame: np.ndarray, size: int, crop: str = "center") -> np.ndarray:
    """uint8 [H, W, 3] -> [size, size, 3]: centre-crop or pad to a square, then resize (antialiased bilinear).
    A frame that is already size x size is returned unchanged (bit-exact round trips)."""
    h, w = frame.shape[:2]
    if h == w == size:
        return frame
    if h != w:
        if crop == "center":
            m = min(h, w)
            top, left = (h - m) // 2, (w - m) // 2
            frame = frame[top:top + m, left:left + m]
        else:
            m = max(h, w)
            square = np.zeros((m, m, 3), np.uint8)
            top, left = (m - h) // 2, (m - w) // 2
            square[top:top + h, left:left + w] = frame
            frame = square
    if frame.shape[0] == size:
        return np.ascontiguousarray(frame)
    from PIL import Image

    return np.asarray(Image.fromarray(np.ascontiguousarray(frame)).resize((size, size), Image.Resampling.BILINEAR))


def source_of(value: Any, default: str, field_name: str, where: str) -> str:
    """Store source from a per-episode field value: a source name, or a bool/int true for random data."""
    if isinstance(value, bytes):
        value = value.decode()
    if isinstance(value, str):
        if value not in SOURCES:
            raise DatasetFormatError(f"{where}: field {field_name!r} is {value!r}, expected one of {SOURCES} "
                                     f"(or a bool that is true for random-action episodes)")
        return value
    if isinstance(value, (bool, int, np.bool_, np.integer)):
        return "random" if bool(value) else default
    raise DatasetFormatError(f"{where}: field {field_name!r} has unusable value {value!r} for a source")


def default_success(source: str) -> bool:
    """Demonstrations count as successful (the policy trains on successful expert episodes); random do not."""
    return source != "random"


def check_vectors(name: str, arr: np.ndarray, where: str) -> np.ndarray:
    """float32 [T, D] from a numeric array; DatasetFormatError on NaN/inf, naming the first bad frame."""
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)
            or arr.dtype == np.bool_):
        raise DatasetFormatError(f"{where}: {name!r} has dtype {arr.dtype}, expected numbers")
    arr = arr.reshape(len(arr), -1).astype(np.float32)
    bad = ~np.isfinite(arr)
    if bad.any():
        t, d = np.argwhere(bad)[0]
        raise DatasetFormatError(f"{where}: {name!r} has NaN or inf (first at frame {t}, dim {d})")
    return arr


def resolve_image_size(cfg: ImportConfig, out: str | os.PathLike, hinted: int | None = None) -> int:
    """--image-size, else the existing store's (append), else the dataset's hint (a DAP export), else 64."""
    if cfg.image_size is not None:
        return int(cfg.image_size)
    if cfg.append:
        return EpisodeStore.open(out).spec.image_size
    return int(hinted) if hinted else DEFAULT_IMAGE_SIZE


def _check_compatible(store: EpisodeStore, spec: EnvSpec) -> None:
    have, new = store.spec, spec
    diffs = [f"{k}: store {getattr(have, k)!r}, import {getattr(new, k)!r}"
             for k in ("cameras", "image_size", "proprio_dim", "action_dim") if getattr(have, k) != getattr(new, k)]
    if diffs:
        raise DatasetFormatError(f"cannot append to {store.path}: the data does not match the store ("
                                 + "; ".join(diffs) + ")")


def write_store(out: str | os.PathLike, spec: EnvSpec, episodes: Iterable[Episode], append: bool = False,
                total: int | None = None, progress: bool = False) -> ImportResult:
    """Publish `episodes` into the store at `out` all-or-nothing.

    New store: built as a hidden sibling, renamed to OUT/episodes.zarr (the `dap collect` layout) when
    complete. append: added to the existing store at `out` in one atomic publish. Bad input part-way through
    leaves the output as it was.
    """
    out = Path(out)
    t0 = time.perf_counter()
    frames = [0]

    def counted(eps: Iterable[Episode]) -> Iterator[Episode]:
        from tqdm.auto import tqdm

        for ep in tqdm(eps, total=total, desc="import", unit="ep", disable=not progress, leave=False):
            frames[0] += len(ep)
            yield ep

    if append:
        store = EpisodeStore.open(out)
        _check_compatible(store, spec)
        ids = store.append_episodes(counted(episodes))
        return ImportResult(store.path, ids, frames[0], time.perf_counter() - t0)
    target = out / COLLECT_STORE_NAME
    if (out / INDEX_FILE).exists() or target.exists():
        raise FileExistsError(f"{out} already holds an episode store: pass --append to add to it")
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".{COLLECT_STORE_NAME}.import-{uuid.uuid4().hex[:8]}"
    try:
        store = EpisodeStore.create(tmp, spec)
        ids = store.append_episodes(counted(episodes))
        if not ids:
            raise DatasetFormatError("the dataset holds no episodes")
        os.rename(tmp, target)
        fsync_dir(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ImportResult(target, ids, frames[0], time.perf_counter() - t0)


def map_frames(frames: np.ndarray, size: int, crop: str, where: str) -> np.ndarray:
    """uint8 [T, H, W, 3] (or [T, 3, H, W]) -> [T, size, size, 3]; DatasetFormatError for other layouts."""
    if frames.ndim == 4 and frames.shape[-1] != 3 and frames.shape[1] == 3:
        frames = frames.transpose(0, 2, 3, 1)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise DatasetFormatError(f"{where}: expected images [T, H, W, 3], got shape {tuple(frames.shape)}")
    if frames.dtype != np.uint8:
        raise DatasetFormatError(f"{where}: expected uint8 images, got {frames.dtype}")
    if frames.shape[1] == frames.shape[2] == size:
        return np.ascontiguousarray(frames)
    return np.stack([fit_square(f, size, crop) for f in frames])
