"""Episode videos: compose per-step frames (real cameras, and DAP's predicted next frames) and write them.

The simulated cameras are 32-96 px, far too small to judge by eye, so frames are upscaled with nearest
neighbour (no blur that would hide what the model actually produced). Videos are GIFs through Pillow,
which is always installed; MP4 is written only when imageio's ffmpeg plugin is present.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

LABEL_HEIGHT = 12
_GAP = 2


def has_ffmpeg() -> bool:
    """True when imageio can encode MP4 (the optional `imageio-ffmpeg` package is installed)."""
    return importlib.util.find_spec("imageio_ffmpeg") is not None


def video_suffix(prefer: str = "auto") -> str:
    """File suffix for videos: '.mp4' when asked for (or 'auto') and ffmpeg is available, else '.gif'."""
    if prefer == "gif":
        return ".gif"
    if prefer in ("auto", "mp4") and has_ffmpeg():
        return ".mp4"
    return ".gif"


def upscale(image: np.ndarray, size: int) -> np.ndarray:
    """Nearest-neighbour resize of an uint8 [h, w, 3] image so that its height is `size`."""
    h, w = image.shape[:2]
    if h == size:
        return image
    new_w = max(1, round(w * size / h))
    return np.asarray(Image.fromarray(image).resize((new_w, size), Image.NEAREST))


def _labelled_row(images: Sequence[np.ndarray], size: int, label: str) -> np.ndarray:
    """Images side by side (upscaled to height `size`), with a text label strip above them."""
    tiles = [upscale(np.asarray(im, dtype=np.uint8), size) for im in images]
    gap = np.zeros((size, _GAP, 3), np.uint8)
    parts: list[np.ndarray] = []
    for i, t in enumerate(tiles):
        parts.extend([gap, t] if i else [t])
    row = np.concatenate(parts, axis=1)
    strip = Image.new("RGB", (row.shape[1], LABEL_HEIGHT), (0, 0, 0))
    ImageDraw.Draw(strip).text((2, 0), label, fill=(255, 255, 255))
    return np.concatenate([np.asarray(strip), row], axis=0)


def compose_frame(real: Sequence[np.ndarray], predicted: Sequence[np.ndarray] | None = None,
                  size: int = 192, real_label: str = "real", predicted_label: str = "predicted") -> np.ndarray:
    """One video frame: the real camera images in a row and, if given, the predicted frames in a second row.

    real / predicted: uint8 [S, S, 3] images, cameras in spec order. Returns uint8 [H, W, 3].
    """
    top = _labelled_row(real, size, real_label)
    if predicted is None or len(predicted) == 0:
        return top
    bottom = _labelled_row(predicted, size, predicted_label)
    width = max(top.shape[1], bottom.shape[1])
    rows = [np.pad(r, ((0, 0), (0, width - r.shape[1]), (0, 0))) for r in (top, bottom)]
    return np.concatenate([rows[0], np.zeros((_GAP, width, 3), np.uint8), rows[1]], axis=0)


def write_video(frames: Sequence[np.ndarray], path: str | Path, fps: float = 10.0) -> Path:
    """Write uint8 [H, W, 3] frames to `path` (.gif through Pillow, .mp4 through imageio-ffmpeg).

    A .mp4 path without ffmpeg falls back to a .gif next to it; the path actually written is returned.
    """
    path = Path(path)
    if not frames:
        raise ValueError("no frames to write")
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".mp4" and has_ffmpeg():
        import imageio.v2 as imageio

        # macro_block_size=1 keeps odd frame sizes instead of resizing them with a warning.
        imageio.mimwrite(path, [np.asarray(f, np.uint8) for f in frames], fps=fps, macro_block_size=1)
        return path
    path = path.with_suffix(".gif")
    images = [Image.fromarray(np.asarray(f, np.uint8)) for f in frames]
    duration_ms = max(20, int(round(1000.0 / fps)))
    images[0].save(path, save_all=True, append_images=images[1:], duration=duration_ms, loop=0,
                   optimize=False)
    return path
