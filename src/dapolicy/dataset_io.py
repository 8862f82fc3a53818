"""`dap import` and `dap export`: bring your own data into the episode store, and take it out to LeRobot.

    dap import lerobot path/to/dataset --out data/mine --image-size 64          # a LeRobotDataset v3 folder
    dap import diffusion-policy pusht_replay.zarr --out data/pusht --camera img  # a Diffusion-Policy zarr
    dap import lerobot path/to/random_play --out data/mine --append --source random
    dap export lerobot data/mine --out exported --fps 10                         # LeRobot can train on it

One module serves both commands: the sub-command's name (the parser's prog) picks its options. Bad input is
reported in one line and the output is left as it was (see docs/your-data.md).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from dapolicy.cli_options import add_out, add_quiet
from dapolicy.data.store import SOURCES

IMPORT_FORMATS = ("lerobot", "diffusion-policy")
EXPORT_FORMATS = ("lerobot",)
CODEC_NAMES = ("lossless", "ffv1", "h264", "av1")  # dapolicy.data.lerobot.CODECS (not imported: pyarrow/av)


def _csv(text: str | None) -> tuple[str, ...]:
    return tuple(t.strip() for t in (text or "").split(",") if t.strip())


def _configure_import(p: argparse.ArgumentParser) -> None:
    p.add_argument("format", choices=IMPORT_FORMATS, help="layout of SRC")
    p.add_argument("src", metavar="SRC", help="the dataset folder (or a .zarr.zip replay buffer)")
    add_out(p, "output folder: the store is written to OUT/episodes.zarr (with --append: an existing store or "
               "`dap collect` folder)", required=True)
    p.add_argument("--append", action="store_true", help="add the episodes to the existing store at --out")
    p.add_argument("--image-size", type=int, default=None,
                   help="side of the square store images (default: the existing store's with --append, a DAP "
                        "export's own, else 64)")
    p.add_argument("--crop", choices=("center", "pad"), default="center",
                   help="non-square frames: crop the long side around the centre (default) or pad with black")
    p.add_argument("--camera", action="append", default=[], metavar="[NAME=]KEY",
                   help="an image array to import as camera NAME (repeat; default: every image array, e.g. "
                        "observation.images.top -> camera 'top')")
    p.add_argument("--proprio", default=None, metavar="KEY[,KEY...]",
                   help="arrays concatenated into proprio (default: observation.state / state)")
    p.add_argument("--action", default=None, metavar="KEY", help="action array (default: action)")
    p.add_argument("--source", choices=SOURCES, default=None,
                   help="source of every imported episode (default: expert; a DAP export keeps its own)")
    p.add_argument("--source-field", default=None, metavar="NAME",
                   help="per-episode field holding the source (a source name, or true for random episodes)")
    p.add_argument("--success-field", default=None, metavar="NAME",
                   help="per-episode (or per-frame: any) success flag (default: 'success' if present, else "
                        "true for demonstrations, false for random episodes)")
    p.add_argument("--name", default=None, help="env name recorded in the store's spec")
    add_quiet(p)


def _configure_export(p: argparse.ArgumentParser) -> None:
    p.add_argument("format", choices=EXPORT_FORMATS, help="layout to write")
    p.add_argument("store", metavar="STORE", help="an episode store or a `dap collect` / `dap import` folder")
    add_out(p, "output folder (must not exist, or be empty)", required=True)
    p.add_argument("--fps", type=int, default=10, help="frame rate recorded in the dataset (default 10)")
    p.add_argument("--codec", choices=CODEC_NAMES, default="lossless",
                   help="video codec: lossless (default, bit-exact H.264 RGB), ffv1 (bit-exact), h264 or av1 "
                        "(lossy, smaller; av1 is LeRobot's default)")
    p.add_argument("--gop", type=int, default=2, help="keyframe interval (default 2, as LeRobot)")
    p.add_argument("--task", default=None, help="task text for episodes without one (default: the env name)")
    p.add_argument("--robot-type", default=None, help="info.json robot_type (default: the env name)")
    p.add_argument("--sources", default=None, metavar="SRC[,SRC...]", help="export only these sources")
    p.add_argument("--frames-per-file", type=int, default=50_000,
                   help="start new data/video files after this many frames")
    add_quiet(p)


def configure_parser(p: argparse.ArgumentParser) -> None:
    """Options of `dap import` or `dap export`, whichever sub-command `p` is."""
    command = "export" if p.prog.split()[-1] == "export" else "import"
    p.set_defaults(_io_command=command)
    (_configure_export if command == "export" else _configure_import)(p)


def _import(args: argparse.Namespace) -> str:
    from dapolicy.data.foreign import ImportConfig

    cfg = ImportConfig(cameras=tuple(args.camera), proprio=_csv(args.proprio), action=args.action,
                       image_size=args.image_size, crop=args.crop, source=args.source,
                       source_field=args.source_field, success_field=args.success_field, name=args.name,
                       append=args.append, progress=not args.quiet)
    if args.format == "lerobot":
        from dapolicy.data.lerobot import import_lerobot as do_import
    else:
        from dapolicy.data.replay_buffer import import_replay_buffer as do_import
    r = do_import(args.src, args.out, cfg)
    from dapolicy.data.store import EpisodeStore

    spec = EpisodeStore.open(r.store_path).spec
    return (f"imported {len(r.episodes)} episodes, {r.frames} frames in {r.seconds:.1f}s "
            f"({r.frames_per_s:,.0f} frames/s) into {r.store_path} (cameras {', '.join(spec.cameras)}; "
            f"{spec.image_size} px; proprio {spec.proprio_dim}, action {spec.action_dim})")


def _export(args: argparse.Namespace) -> str:
    from dapolicy.data.lerobot import ExportConfig, export_lerobot

    cfg = ExportConfig(fps=args.fps, codec=args.codec, gop=args.gop, task=args.task, robot_type=args.robot_type,
                       sources=_csv(args.sources) or None, frames_per_file=args.frames_per_file,
                       progress=not args.quiet)
    r = export_lerobot(args.store, args.out, cfg)
    return f"exported {r.episodes} episodes, {r.frames} frames in {r.seconds:.1f}s to {r.path} (LeRobotDataset v3.0)"


def run(args: argparse.Namespace) -> int:
    command: Any = getattr(args, "_io_command", "import")
    try:
        print(_export(args) if command == "export" else _import(args))
    except (FileExistsError, ValueError, ImportError, OSError) as e:
        message = " ".join(str(e).split()) or type(e).__name__
        print(f"dap {command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\ndap {command}: interrupted; the output was left as it was", file=sys.stderr)
        return 130
    return 0
