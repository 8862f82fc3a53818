"""`dap render-ood`: one PNG showing what each out-of-distribution suite does to the observations.

Rows: none / light / distractor / novel_object by default, or the `--ood` list (strengths too: `--ood
light:0,light:1,light:2` shows one perturbation growing; `blind` the grey control); columns: seeds x cameras.
Each cell is the first frame after `reset(seed)` (optionally after a few expert steps), so a cell shows exactly
what an evaluation episode with that seed starts from.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np

from dapolicy.atomic import atomic_write_bytes
from dapolicy.envs.perturbations import OOD_KINDS, OODConfig

if TYPE_CHECKING:
    from PIL.Image import Image

ROWS: tuple[str, ...] = ("none", *OOD_KINDS)
_LABEL_WIDTH = 112
_HEADER_HEIGHT = 28
_GAP = 2


def row_label(ood: str) -> str:
    """A row's name: the kind, with its strength for a perturbation (so a strength sweep reads as one)."""
    config = OODConfig.parse(ood)
    return f"{config.kind}@{config.strength:g}" if config.kind in OOD_KINDS else config.kind


def capture(env_name: str, kind: str, seeds: Sequence[int], image_size: int = 64,
            cameras: tuple[str, ...] | None = None, steps: int = 0) -> tuple[tuple[str, ...], list[list[np.ndarray]]]:
    """Frames of one OOD spec ("light", "light:1.5", "blind", ...): for each seed, one uint8 [S,S,3] image per
    camera (after `steps` expert steps), as the policy would see them."""
    from dapolicy.envs.base import make_env

    config = OODConfig.parse(kind)
    env = config.wrap(make_env(env_name, image_size=image_size, cameras=cameras, ood=config.for_env()))
    try:
        frames = []
        for seed in seeds:
            obs = env.reset(int(seed))
            for _ in range(steps):
                obs, result = env.step(env.expert_action())
                if result.done:
                    break
            frames.append([np.asarray(obs["images"][c]) for c in env.spec.cameras])
        return env.spec.cameras, frames
    finally:
        env.close()


def render_grid(env_name: str, seeds: Sequence[int], image_size: int = 64, cameras: tuple[str, ...] | None = None,
                scale: int | None = None, steps: int = 0, kinds: Sequence[str] = ROWS) -> "Image":
    """The labelled grid image (rows = OOD specs, columns = seed x camera)."""
    from PIL import Image as PILImage
    from PIL import ImageDraw

    scale = scale or max(1, 128 // image_size)
    cell = image_size * scale
    rows = [capture(env_name, k, seeds, image_size, cameras, steps) for k in kinds]
    cams = rows[0][0]
    n_cols = len(seeds) * len(cams)
    width = _LABEL_WIDTH + n_cols * (cell + _GAP)
    height = _HEADER_HEIGHT + len(kinds) * (cell + _GAP)
    grid = PILImage.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for si, seed in enumerate(seeds):
        for ci, cam in enumerate(cams):
            x = _LABEL_WIDTH + (si * len(cams) + ci) * (cell + _GAP)
            draw.text((x + 2, 2), f"seed {seed}", fill=(0, 0, 0))
            draw.text((x + 2, 14), cam[:max(4, cell // 6)], fill=(90, 90, 90))
    for ri, (kind, (_, frames)) in enumerate(zip(kinds, rows)):
        y = _HEADER_HEIGHT + ri * (cell + _GAP)
        draw.text((4, y + cell // 2 - 6), row_label(kind), fill=(0, 0, 0))
        for si, per_cam in enumerate(frames):
            for ci, img in enumerate(per_cam):
                x = _LABEL_WIDTH + (si * len(cams) + ci) * (cell + _GAP)
                tile = PILImage.fromarray(img).resize((cell, cell), PILImage.NEAREST)
                grid.paste(tile, (x, y))
    return grid


def render_ood(env_name: str, out: str | Path, n_seeds: int = 4, image_size: int = 64, seed_start: int = 0,
               cameras: tuple[str, ...] | None = None, scale: int | None = None, steps: int = 0,
               kinds: Sequence[str] = ROWS) -> Path:
    """Write the grid to `out` (PNG, written to a temp name and renamed so a partial file never appears)."""
    out = Path(out)
    kinds = [OODConfig.parse(k).spec for k in kinds]  # every row's spelling is checked before any rendering
    grid = render_grid(env_name, list(range(seed_start, seed_start + n_seeds)), image_size, cameras, scale, steps,
                       kinds)
    atomic_write_bytes(out, lambda f: grid.save(f, format="PNG"))
    return out


def configure_parser(p: argparse.ArgumentParser) -> None:
    from dapolicy.cli_options import add_out, add_seed, positive_int

    p.add_argument("env", help='task: "pusht" or "metaworld/<task-v3>"')
    add_out(p, "output PNG file", required=True)
    p.add_argument("--seeds", type=positive_int, default=4, help="number of seeds (columns per camera, default 4)")
    add_seed(p, 0, "first seed (default 0; --seed-start: the older spelling)", "--seed-start")
    p.add_argument("--image-size", type=positive_int, default=64, help="image side in pixels (default 64)")
    p.add_argument("--cameras", default=None, help="comma-separated camera names (default: the env's)")
    p.add_argument("--scale", type=positive_int, default=None,
                   help="integer upscaling of each cell (default: to ~128 px)")
    p.add_argument("--steps", type=int, default=0, help="expert steps before the frame is taken (default 0)")
    p.add_argument("--ood", default=",".join(ROWS),
                   help="comma-separated rows, each kind[:strength], e.g. light:0,light:1,light:2 or blind "
                        f"(default {','.join(ROWS)})")


def run(args: argparse.Namespace) -> int:
    if args.steps < 0:
        raise ValueError(f"--steps must be >= 0, got {args.steps}")
    cameras = tuple(c.strip() for c in args.cameras.split(",") if c.strip()) if args.cameras else None
    kinds = [k.strip() for k in args.ood.split(",") if k.strip()]
    if not kinds:
        raise ValueError("--ood names no rows (write e.g. none,light,distractor)")
    try:
        kinds = [OODConfig.parse(k).spec for k in kinds]
    except ValueError as err:
        raise ValueError(f"--ood: {err}") from None
    path = render_ood(args.env, args.out, args.seeds, args.image_size, args.seed, cameras, args.scale,
                      args.steps, kinds)
    print(f"wrote {path}")
    return 0
