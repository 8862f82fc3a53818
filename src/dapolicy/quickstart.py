"""`dap quickstart`: the whole workflow on the embedded default task, ending in a readable report.

collect (expert + random data) -> train (VAE, dynamics model, policy) -> evaluate (in distribution and the
three OOD suites, same seeds) -> diagnose (Fig. 2) -> `DIR/report.md`.

Every phase is resumable: re-running the command continues where a previous run stopped (collection and
training resume from their stores/checkpoints; finished phases are skipped).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from dapolicy.atomic import read_json, write_json_atomic


@dataclass
class QuickstartConfig:
    """The default task and budgets, sized to finish within 20 minutes on an idle 2-core CPU.

    env: the task. Meta-World drawer-open with two 64-px cameras: the drawer's position changes from episode
        to episode and the proprio holds only the gripper, so the policy must use its cameras (a blind FM
        policy succeeded in 0/30 validation episodes, the sighted one in 27/30; docs/results.md).
    expert_episodes / random_episodes: demonstrations for the policy; random + noisy-expert episodes that
        teach the dynamics model what off-distribution actions do.
    config: named model size (see `dap info`). method: a registered method (DAP by default).
    steps: optimizer steps per training stage.
    batch_size: windows per step for every stage (None = the method's presets).
    eval_episodes: seeded test episodes per evaluation suite (in distribution and each OOD suite).
    ood: the suites to evaluate.
    threads: torch threads (None = every core: the quickstart assumes the machine is otherwise idle; use 1 when
        other jobs load it, since torch's threads stall badly under CPU contention).
    workers: evaluation processes running episodes side by side (None = one per core, at most 4; the
        simulator renders on one core), each with threads / workers torch threads. Same results as 1.
    device: where training, evaluation and diagnosis run ("auto": a GPU if visible, else cpu).
    """

    env: str = "metaworld/drawer-open-v3"
    expert_episodes: int = 50
    random_episodes: int = 20
    image_size: int = 64
    config: str = "small"
    method: str = "dap"
    steps: str = "vae=600,dynamics=600,policy=1500"
    batch_size: int | None = None
    eval_episodes: int = 30
    ood: tuple[str, ...] = ("none", "light", "distractor", "novel_object")
    seed: int = 0
    threads: int | None = None
    workers: int | None = None
    device: str = "auto"
    videos: int = 2
    timings: dict[str, float] = field(default_factory=dict)

    def identity(self) -> dict[str, Any]:
        """The settings that decide what the data and the run are (a rerun must agree on them)."""
        return {k: getattr(self, k) for k in ("env", "expert_episodes", "random_episodes", "image_size", "config",
                                              "method", "steps", "batch_size", "seed")}


SETTINGS_FILE = "settings.json"


def _check_out_dir(out: Path, cfg: QuickstartConfig, overwrite: bool) -> None:
    """Refuse to continue a quickstart folder made with other settings (its data and run would be reused)."""
    import shutil

    settings = out / SETTINGS_FILE
    if overwrite and out.exists():
        shutil.rmtree(out)
    if settings.is_file():
        stored = read_json(settings, "pass --overwrite to start over, or choose another --out")
        changed = {k: (stored.get(k), v) for k, v in cfg.identity().items() if stored.get(k) != v}
        if changed:
            listed = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changed.items())
            raise ValueError(f"{out} holds a quickstart with other settings ({listed}): choose another --out, "
                             f"or pass --overwrite to start over")
    elif out.exists() and any(out.iterdir()):
        raise ValueError(f"{out} exists and is not a quickstart folder: choose another --out, or --overwrite")
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(settings, cfg.identity())


def _check_steps(cfg: QuickstartConfig) -> None:
    """A bad --steps fails now, not after the minutes of collecting that come before training."""
    import torch

    from dapolicy.info import default_spec
    from dapolicy.policies.registry import make_policy
    from dapolicy.training.config import parse_steps

    with torch.device("meta"):  # the stage names only: no weights are allocated
        stages = make_policy(cfg.method, default_spec(cfg.image_size), size=cfg.config).stage_names
    parse_steps(cfg.steps, stages)


def _peak_memory_mb() -> float:
    """Peak resident memory of this process (the quickstart runs every phase in-process)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def run_quickstart(out: str | Path, cfg: QuickstartConfig | None = None, progress: bool = True,
                   overwrite: bool = False) -> dict[str, Any]:
    """Run every phase into `out` and return the summary written to `out/quickstart.json`.

    Rerunning continues a stopped quickstart; a folder made with other settings is refused (or, with
    `overwrite`, deleted first).
    """
    from dapolicy.cli_options import resolve_device
    from dapolicy.collect import collect
    from dapolicy.diagnose import diagnose
    from dapolicy.envs.base import make_env
    from dapolicy.evaluate import evaluate
    from dapolicy.policies.registry import SIZES, get_method
    from dapolicy.train import train

    cfg = cfg or QuickstartConfig()
    get_method(cfg.method)  # every setting is checked before minutes of collecting
    resolve_device(cfg.device)
    if cfg.config not in SIZES:
        raise ValueError(f"--config must be one of {', '.join(SIZES)}, got {cfg.config!r}")
    if cfg.eval_episodes < 1 or cfg.expert_episodes < 1:
        raise ValueError("--eval-episodes and --expert-episodes must be >= 1")
    _check_steps(cfg)
    make_env(cfg.env, image_size=cfg.image_size).close()
    threads = cfg.threads or os.cpu_count() or 1
    workers = cfg.workers or max(1, min(4, os.cpu_count() or 1))
    out = Path(out)
    data_dir, run_dir = out / "data", out / "run"
    _check_out_dir(out, cfg, overwrite)
    start = time.perf_counter()

    def phase(name: str, fn, *args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        print(f"\n== {name} ==", flush=True)
        result = fn(*args, **kwargs)
        cfg.timings[name] = round(time.perf_counter() - t0, 1)
        print(f"== {name} done in {cfg.timings[name]:.0f} s ==", flush=True)
        return result

    summary_file = data_dir / "summary.json"
    done_collecting = summary_file.is_file() and json.loads(summary_file.read_text()).get("complete", False)
    if not done_collecting:
        phase("collect", collect, cfg.env, data_dir, expert_episodes=cfg.expert_episodes,
              random_episodes=cfg.random_episodes, seed=cfg.seed, image_size=cfg.image_size,
              resume=data_dir.exists(), progress=progress)
    collect_summary = json.loads(summary_file.read_text())

    resume = (run_dir / "checkpoints").exists() or (run_dir / "model").exists()
    phase("train", train, data_dir, run_dir, method=cfg.method, config=cfg.config, steps=cfg.steps,
          seed=cfg.seed, resume=resume, batch_size=cfg.batch_size, threads=threads, progress=progress,
          device=cfg.device)

    results = {}
    for kind in cfg.ood:
        results[kind] = phase(f"eval {kind}", evaluate, run_dir, episodes=cfg.eval_episodes, ood=kind,
                              videos=cfg.videos, progress=progress, threads=max(1, threads // workers),
                              workers=workers, device=cfg.device)
    diag = phase("diagnose", diagnose, run_dir, windows=32, progress=progress, device=cfg.device)

    summary = {
        "config": asdict(cfg),
        "total_seconds": round(time.perf_counter() - start, 1),
        "peak_memory_mb": round(_peak_memory_mb(), 1),
        "expert_success_rate": collect_summary.get("expert_success_rate"),
        "frames": collect_summary.get("frames"),
        "eval": {k: {f: r[f] for f in ("success_rate", "ci95", "n_episodes", "mean_score", "latency_ms")}
                 for k, r in results.items()},
    }
    write_json_atomic(out / "quickstart.json", summary)
    (out / "report.md").write_text(render_report(out, summary, results, diag))
    print(f"\nReport: {out / 'report.md'}  ({summary['total_seconds'] / 60:.1f} min, "
          f"peak memory {summary['peak_memory_mb']:.0f} MB)")
    return summary


def _video_still(run_dir: Path, out: Path) -> str | None:
    """A PNG still from the first in-distribution video (GIF or MP4; videos don't render everywhere)."""
    videos = sorted((run_dir / "eval" / "videos").glob("none*"))
    if not videos:
        return None
    import imageio.v3 as iio
    from PIL import Image

    frames = iio.imread(videos[0], index=None)  # [T, H, W, 3], through Pillow (GIF) or ffmpeg (MP4)
    still = out / "video_frame.png"
    Image.fromarray(frames[min(20, len(frames) - 1)][..., :3]).convert("RGB").save(still)
    return still.name


def _prediction_summary(diag: dict[str, Any]) -> list[str]:
    """One table: what the predicted next frame is worth against copying the current frame, per camera; and how
    far the policy lets the prediction in (its attention gates), when it has them."""
    from dapolicy.diagnose import format_gates

    gates = diag.get("prediction_gates") or []
    gate_line = ([f"Prediction gates (tanh g per policy attention layer; near 0 = the policy keeps the prediction "
                  f"out): {format_gates(gates)}.", ""] if gates else [])
    if "final_psnr_vs_real" not in diag:
        return gate_line
    lines = ["| camera | predicted next frame | copy current frame | VAE reconstruction | gain from the true "
             "action | action sensitivity | change explained: all / the action's part (VAE ceiling) |",
             "|---|---|---|---|---|---|---|"]
    explained = diag.get("change_explained", {})
    for cam, final in diag["final_psnr_vs_real"].items():
        def get(key: str, fmt: str = ".1f", unit: str = " dB") -> str:
            value = diag.get(key, {}).get(cam)
            return "-" if value is None else f"{value:{fmt}}{unit}"
        change = (f"{explained['true'][cam]:+.2f}"
                  + (f" / {explained['action'][cam]:+.2f}" if "action" in explained else "")
                  + (f" ({explained['vae'][cam]:.2f})" if "vae" in explained else "")
                  if "true" in explained else "-")
        lines.append(f"| {cam} | {final:.1f} dB | {get('psnr_copy_current')} | {get('psnr_vae_recon')} | "
                     f"{get('action_psnr_gain_db', '+.2f')} | {get('action_sensitivity', '.2f', '')} | {change} |")
    return lines + ["", *gate_line, "(`docs/method.md` explains these references; `dap diagnose` writes them all.)",
                    ""]


def render_report(out: Path, summary: dict[str, Any], results: dict[str, Any], diag: dict[str, Any]) -> str:
    """report.md: success rates with Wilson intervals, latency, plots and a video frame."""
    from dapolicy.evaluate import format_table

    run_dir = out / "run"
    rows = [{"ood": k, "success_rate": r["success_rate"], "ci95": r["ci95"], "mean_score": r["mean_score"],
             "n_episodes": r["n_episodes"], "latency_p50_ms": (r.get("latency_ms") or {}).get("p50")}
            for k, r in results.items()]
    cfg = summary["config"]
    lines = [
        "# DAP quickstart report", "",
        f"Task `{cfg['env']}`, {cfg['expert_episodes']} expert + {cfg['random_episodes']} random episodes "
        f"({summary['frames']} frames; expert success {summary['expert_success_rate']:.0%}), "
        f"config `{cfg['config']}`, steps `{cfg['steps']}`.", "",
        "## Closed-loop success (same seeds for every suite)", "", format_table(rows), "",
        f"Total time {summary['total_seconds'] / 60:.1f} min; peak memory {summary['peak_memory_mb']:.0f} MB.",
        "Phase times (s): " + ", ".join(f"{k} {v:.0f}" for k, v in cfg["timings"].items()), "",
        "## Training losses", "",
    ]
    for plot in sorted((run_dir / "plots").glob("*.png")):
        lines.append(f"![{plot.stem}](run/plots/{plot.name})")
    lines += ["", "## Extrapolated estimates along the flow (Fig. 2)", "",
              "PSNR of the decoded extrapolated next frame and MSE of the extrapolated action vs tau:", ""]
    lines += _prediction_summary(diag)
    for name in ("diagnose.png", "strip.png"):
        if (run_dir / "diagnose" / name).is_file():
            lines.append(f"![{name}](run/diagnose/{name})")
    still = _video_still(run_dir, out)
    if still:
        lines += ["", "## A rollout (top: cameras; bottom: the predicted next frames)", "", f"![rollout]({still})",
                  "", "Videos: `run/eval/videos/`."]
    lines += ["", "Reproduce: `dap quickstart --out " + str(out) + "`; details in `quickstart.json`.", ""]
    return "\n".join(lines)


def configure_parser(p: argparse.ArgumentParser) -> None:
    from dapolicy.cli_options import add_device, add_out, add_quiet, add_seed, add_threads, positive_int
    from dapolicy.policies.registry import SIZES, method_names

    d = QuickstartConfig()
    add_out(p, "output folder (default runs/quickstart)", default="runs/quickstart")
    p.add_argument("--env", default=d.env, help=f"task (default {d.env})")
    p.add_argument("--expert-episodes", type=positive_int, default=d.expert_episodes,
                   help=f"scripted-expert demonstrations (default {d.expert_episodes})")
    p.add_argument("--random-episodes", type=int, default=d.random_episodes,
                   help=f"random + noisy-expert episodes for the dynamics model (default {d.random_episodes})")
    p.add_argument("--config", default=d.config, choices=SIZES, help="model size (default small)")
    p.add_argument("--method", default=d.method, choices=method_names(), help="method (default dap)")
    p.add_argument("--steps", default=d.steps, help=f"optimizer steps per stage (default {d.steps})")
    p.add_argument("--eval-episodes", type=positive_int, default=d.eval_episodes,
                   help=f"test episodes per evaluation suite (default {d.eval_episodes})")
    p.add_argument("--image-size", type=positive_int, default=d.image_size,
                   help=f"camera image side (default {d.image_size})")
    add_threads(p, None, "all cores: the quickstart assumes an idle machine; use 1 when other jobs load it")
    p.add_argument("--workers", type=positive_int, default=None, metavar="N",
                   help="evaluation processes running episodes side by side (default: one per core, at most 4)")
    add_device(p, "training, evaluation and diagnosis run")
    add_seed(p, d.seed, f"collection and training seed (default {d.seed})")
    p.add_argument("--overwrite", action="store_true", help="delete an existing --out folder and start over")
    add_quiet(p)


def run(args: argparse.Namespace) -> int:
    cfg = QuickstartConfig(env=args.env, expert_episodes=args.expert_episodes,
                           random_episodes=args.random_episodes, config=args.config, method=args.method,
                           steps=args.steps, eval_episodes=args.eval_episodes, image_size=args.image_size,
                           threads=args.threads, workers=args.workers, seed=args.seed, device=args.device)
    try:
        run_quickstart(args.out, cfg, progress=not args.quiet, overwrite=args.overwrite)
    except KeyboardInterrupt:
        print(f"\ndap quickstart: interrupted; finished phases are kept in {args.out}: continue with the same "
              f"command (dap quickstart --out {args.out} ...)", file=sys.stderr)
        return 130
    return 0
