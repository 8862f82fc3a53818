"""`dap robustness`: success vs perturbation strength, one line per run, from the evaluator's own rollouts.

    dap robustness runs/dap runs/dp --ood light --strengths 0,0.5,1,1.5,2 --episodes 50 --out light.png

A single strength says little: one method may lose at 1.0 what another loses at 1.5. The curve shows where a
policy breaks, and (docs/ood.md) is how the default strength of each suite is chosen. Every point is one
`evaluate(run, ood="kind:s")` call (same seeds at every strength, and a seed's perturbation only grows with s),
written to RUN/eval/<kind>@<s>.json like any evaluation; this module only loops and draws. The figure has 95%
Wilson whiskers; a JSON with every point is written next to the PNG.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dapolicy.envs.perturbations import OOD_KINDS, OODConfig

DEFAULT_STRENGTHS: tuple[float, ...] = (0.0, 0.5, 1.0, 1.5, 2.0)


def parse_strengths(text: str) -> list[float]:
    """"0,0.5,1" -> [0.0, 0.5, 1.0]; each must be a finite number >= 0 (the message names the bad one)."""
    values: list[float] = []
    for token in (t.strip() for t in str(text).split(",")):
        if not token:
            continue
        try:
            value = float(token)
        except ValueError:
            raise ValueError(f"strength {token!r} in --strengths {text!r} is not a number") from None
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"strength {token!r} in --strengths {text!r} must be a finite number >= 0")
        values.append(value)
    if not values:
        raise ValueError(f"--strengths {text!r} names no strength (write e.g. 0,0.5,1,1.5,2)")
    return sorted(set(values))


def perturbation_kind(text: str) -> str:
    """The kind a curve sweeps: a perturbation (light, distractor, novel_object), without a strength."""
    config = OODConfig.parse(text)
    if config.kind not in OOD_KINDS:
        raise ValueError(f"--ood {text!r}: a robustness curve sweeps the strength of a perturbation "
                         f"({', '.join(OOD_KINDS)}); {config.kind!r} has none")
    if ":" in text:
        raise ValueError(f"--ood {text!r}: give the kind alone; the strengths come from --strengths")
    return config.kind


def run_label(run: str | Path, method: str) -> str:
    """"<method> <folder>": the run folder's name (the run's, for a path to its model/ folder)."""
    from dapolicy.policies.registry import MODEL_SUBDIR

    path = Path(run).resolve()
    folder = path.parent.name if path.name == MODEL_SUBDIR and not (path / MODEL_SUBDIR).is_dir() else path.name
    return f"{method} {folder}"


def robustness(runs: Sequence[str | Path], kind: str, strengths: Sequence[float], episodes: int,
               out: str | Path, seed: int | None = None, env: str | None = None, max_steps: int | None = None,
               device: str | None = "cpu", policies: Sequence[Any] | None = None, env_factory: Any = None,
               progress: bool = True, threads: int | None = None, workers: int = 1) -> dict[str, Any]:
    """Evaluate every run at every strength of `kind`, then write `out` (PNG) and `out` with .json.

    policies: already loaded policies, one per run (tests); env_factory: replaces `make_env` (tests).
    threads: torch CPU threads meanwhile (None = torch's setting; restored afterwards).
    workers: processes running episodes side by side (`dap eval --workers`); > 1 needs run folders, not policies.
    Returns the JSON's content: per run, one point per strength (success, Wilson 95% interval, score).
    """
    from dapolicy.atomic import write_json_atomic
    from dapolicy.evaluate import VALIDATION_SEED, evaluate, load_policy
    from dapolicy.policies.registry import check_run_finished, resolve_model_dir
    from dapolicy.runtime import torch_threads

    kind = perturbation_kind(kind)
    strengths = sorted({float(s) for s in strengths})  # a curve: increasing, each strength once
    if not strengths:
        raise ValueError("give at least one strength")
    if not runs:
        raise ValueError("give at least one run folder")
    if episodes < 1:
        raise ValueError(f"episodes must be >= 1, got {episodes}")
    if policies is not None and len(policies) != len(runs):
        raise ValueError(f"got {len(policies)} policies for {len(runs)} runs")
    seed = VALIDATION_SEED if seed is None else int(seed)
    out = Path(out)
    curves = []
    with torch_threads(threads):
        if policies is None:  # a missing or unfinished run fails before minutes of rollouts of the others
            for run in runs:
                resolve_model_dir(run)
                check_run_finished(run)
        for i, run in enumerate(runs):
            policy = policies[i] if policies is not None else load_policy(run, device)
            points = []
            for s in strengths:
                ood = f"{kind}:{s:g}"
                result = evaluate(run, episodes=episodes, ood=ood, seed=seed, env=env, videos=0,
                                  max_steps=max_steps, name=f"{kind}@{s:g}", policy=policy if workers == 1 else None,
                                  env_factory=env_factory, progress=progress, device=device, workers=workers)
                points.append({"strength": s, "n_success": result["n_success"], "n_episodes": result["n_episodes"],
                               "success_rate": result["success_rate"], "ci95": result["ci95"],
                               "mean_score": result["mean_score"]})
            curves.append({"run": str(run), "label": run_label(run, policy.method), "method": policy.method,
                           "env": result["env"], "points": points})
    report = {"ood": kind, "strengths": strengths, "episodes": episodes, "seed": seed,
              "episode_seeds": [seed, seed + episodes - 1], "runs": curves}
    plot_curves(report, out)
    write_json_atomic(out.with_suffix(".json"), report)
    return report


def plot_curves(report: dict[str, Any], path: Path) -> Path:
    """Success rate vs strength, one line per run, with 95% Wilson whiskers (written atomically)."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dapolicy.atomic import atomic_write_bytes

    fig, ax = plt.subplots(figsize=(5.6, 3.8))
    n_runs = len(report["runs"])
    span = (max(report["strengths"]) - min(report["strengths"])) or 1.0
    for i, curve in enumerate(report["runs"]):
        # a small sideways shift per run keeps overlapping whiskers apart
        shift = (i - (n_runs - 1) / 2) * 0.012 * span
        xs = [p["strength"] + shift for p in curve["points"]]
        ys = [p["success_rate"] for p in curve["points"]]
        low = [p["success_rate"] - p["ci95"][0] for p in curve["points"]]
        high = [p["ci95"][1] - p["success_rate"] for p in curve["points"]]
        ax.errorbar(xs, ys, yerr=[low, high], marker="o", capsize=3, label=curve["label"])
    ax.set_xlabel(f"{report['ood']} strength (0 = in distribution, 1 = reference ranges)")
    ax.set_ylabel("success rate")
    ax.set_ylim(-0.03, 1.03)
    ax.set_title(f"robustness to {report['ood']} ({report['episodes']} episodes per point, 95% Wilson)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, lambda f: f.write(buffer.getvalue()))
    return path


# ----------------------------------------------------------------------------------------------- CLI
def configure_parser(parser: argparse.ArgumentParser) -> None:
    from dapolicy import cli_options as opt

    parser.add_argument("runs", nargs="+", metavar="RUN", help="run folders (with model/) or model folders")
    parser.add_argument("--ood", required=True, help=f"the perturbation to sweep: {', '.join(OOD_KINDS)}")
    parser.add_argument("--strengths", default=",".join(f"{s:g}" for s in DEFAULT_STRENGTHS),
                        help="comma-separated strengths (default 0,0.5,1,1.5,2; 0 = in distribution)")
    parser.add_argument("--episodes", type=opt.positive_int, default=50, help="seeded episodes per point (default 50)")
    opt.add_seed(parser, None, "episode i uses env seed SEED+i (default 300000, the validation range: a curve "
                               "chooses strengths, and choices are made on validation seeds)")
    parser.add_argument("--env", default=None, help="task name (default: the one each model was trained on)")
    parser.add_argument("--max-steps", type=opt.positive_int, default=None,
                        help="episode step limit (default: the task's)")
    opt.add_device(parser)
    opt.add_threads(parser, opt.EVAL_THREADS, opt.EVAL_THREADS_HELP)
    opt.add_workers(parser)
    opt.add_quiet(parser)
    opt.add_out(parser, "output PNG (a JSON with the numbers goes next to it)", required=True)


def run(args: argparse.Namespace) -> int:
    try:
        kind = perturbation_kind(args.ood)
        strengths = parse_strengths(args.strengths)
        if args.episodes < 1:
            raise ValueError(f"--episodes must be >= 1, got {args.episodes}")
    except ValueError as err:
        print(f"dap robustness: error: {err}", file=sys.stderr)
        return 2
    report = robustness(args.runs, kind, strengths, args.episodes, args.out, seed=args.seed, env=args.env,
                        max_steps=args.max_steps, device=args.device, progress=not args.quiet, threads=args.threads,
                        workers=args.workers)
    for curve in report["runs"]:
        cells = "  ".join(f"{p['strength']:g}: {p['success_rate']:.0%}" for p in curve["points"])
        print(f"{curve['label']}: {cells}")
    out = Path(args.out)
    print(f"wrote {out} and {out.with_suffix('.json')}")
    return 0
