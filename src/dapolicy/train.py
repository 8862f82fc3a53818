"""`dap train`: train a policy's stages (for DAP: VAE, dynamics model, then policy) into a run folder.

    dap train --data runs/data --out runs/dap --config small
    dap train --data runs/data --out runs/dap --resume                  # continue a killed run, bit-exact
    dap train --data runs/data --out runs/dap --stage policy --steps 3000   # retrain one stage
    dap train --data runs/data --out runs/fm --method fm --steps vae=900,policy=2200

Python: `train(data_dir, out_dir, method="dap", config="small") -> Path` (the run folder; its `model/`
loads with `DAPPolicy.from_pretrained`). The run folder layout is described in `training/rundir.py`.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from dapolicy import __version__
from dapolicy.training.config import STAGES, TrainConfig, auto_threads, parse_steps
from dapolicy.training.loop import TrainingDiverged
from dapolicy.training.rundir import RunDir, RunFolderError
from dapolicy.training.trainer import Trainer, TrainRequest, environment_info

__all__ = ["TrainConfig", "TrainingDiverged", "RunFolderError", "train", "configure_parser", "run"]

METHODS = ("dap", "fm")
CONFIGS = ("tiny", "small", "paper")


def _parse_stages(stage: str | Sequence[str] | None) -> tuple[str, ...] | None:
    """"all" / None -> None (every stage); "dynamics,policy" or a sequence -> those stages."""
    if stage is None:
        return None
    names = stage.split(",") if isinstance(stage, str) else list(stage)
    names = [n.strip() for n in names if n.strip()]
    if names in ([], ["all"]):
        return None
    bad = [n for n in names if n not in STAGES]
    if bad:
        raise ValueError(f"unknown stage(s) {bad}: expected 'all' or a comma list of {', '.join(STAGES)}")
    return tuple(names)


def _resolve_device(device: str | torch.device | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but no CUDA device is available")
    return device


def _default_factory(method: str, config: str) -> Callable[[Any], Any]:
    def build(spec: Any) -> Any:
        from dapolicy.policies import DAPPolicy, get_config

        return DAPPolicy(get_config(config, method=method), spec)

    return build


def _clear_run(run: RunDir) -> None:
    """Remove what a previous run wrote (only the files `dap train` owns)."""
    for p in (run.config, run.state_file, run.metrics):  # (the lock file stays: we hold it)
        p.unlink(missing_ok=True)
    for d in (run.plots, run.checkpoints, run.cache, run.model, run.root / "tensorboard"):
        shutil.rmtree(d, ignore_errors=True)


def train(data_dir: str | Path, out_dir: str | Path, method: str | None = None, config: str | None = None,
          stage: str | Sequence[str] | None = "all", steps: int | str | dict[str, int] | None = None,
          seed: int | None = None, resume: bool = False, *, batch_size: int | str | dict[str, int] | None = None,
          lr: float | None = None, device: str | torch.device | None = "auto", threads: int | None = None,
          logger: str | None = None, progress: bool | None = None, use_best: bool | None = None,
          amp: bool | None = None, stop_after: int | None = None, overwrite: bool = False,
          train_config: TrainConfig | None = None,
          policy_factory: Callable[[Any], Any] | None = None) -> Path:
    """Train a policy on the episode store in `data_dir`; returns the run folder `out_dir`.

    method, config: "dap" | "fm" and "tiny" | "small" | "paper" (default: those of the run being resumed or
        extended, else "dap" and "small"). seed: default 0 (or the stored one).
    stage: "all", one stage, or a list; a later stage alone loads the earlier stages from `out_dir/model`.
    steps: N for every selected stage, "vae=900,policy=2200", or a dict; merged over the preset budgets.
    resume: continue the run in `out_dir` from `checkpoints/last.pt` (finished stages are skipped). The
        result is bit-identical to an uninterrupted run with the same seed, device and thread count.
    stop_after: stop cleanly after this many optimizer steps in this call (checkpoint written), e.g. for a
        job scheduler's time slice; continue with resume=True.
    overwrite: start over in an `out_dir` that already holds a run (deletes its checkpoints and model).
    train_config: a full TrainConfig to start from instead of the preset; the keyword overrides still apply.
    policy_factory: build the policy from the EnvSpec (default: `DAPPolicy(get_config(config, method))`);
        any object with the policy contract of docs/architecture.md can be trained.
    Raises TrainingDiverged (loss became NaN/inf), RunFolderError, StoreError, ValueError.
    """
    from dapolicy.data.store import EpisodeStore

    store = EpisodeStore.open(data_dir)  # fails before anything is written to out_dir
    run = RunDir(Path(out_dir))
    with run.lock():  # one trainer per run folder
        stages = _parse_stages(stage)
        stored = _check_run_folder(run, method, config, seed, stages, resume, overwrite)
        method = method or (stored or {}).get("method", "dap")
        config = config or (stored or {}).get("config", "small")
        seed = seed if seed is not None else (stored or {}).get("seed", 0)
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        if config not in CONFIGS:
            raise ValueError(f"config must be one of {CONFIGS}, got {config!r}")
        base = train_config or (TrainConfig.from_dict(stored["train"]) if stored and "train" in stored
                                else TrainConfig.preset(config))
        cfg = _apply_overrides(base, stages or STAGES, steps=steps, batch_size=batch_size, lr=lr, threads=threads,
                               logger=logger, progress=progress, use_best=use_best, amp=amp)
        dev = _resolve_device(device)
        data_path = Path(data_dir).resolve()
        if stored is not None and stored.get("data") not in (None, str(data_path)):
            print(f"[dap train] note: {run.root} was trained on {stored['data']}, now {data_path}", file=sys.stderr)
        request = TrainRequest(data_dir=data_path, run=run, method=method, config=config, stages=stages, seed=seed,
                               resume=resume, device=dev, stop_after=stop_after)
        run_config = {"method": method, "config": config, "seed": seed, "data": str(data_path),
                      "train": cfg.to_dict(), "dapolicy_version": __version__, "environment": environment_info(dev)}
        trainer = Trainer(request, cfg, policy_factory or _default_factory(method, config), run_config, store)
        threads_before = torch.get_num_threads()
        torch.set_num_threads(cfg.threads)
        try:
            return trainer.run_all()
        finally:
            torch.set_num_threads(threads_before)  # a library call leaves the process as it found it


def _check_run_folder(run: RunDir, method: str | None, config: str | None, seed: int | None,
                      stages: tuple[str, ...] | None, resume: bool, overwrite: bool) -> dict[str, Any] | None:
    """Refuse calls that would mix two runs in one folder; return the stored run configuration (or None)."""
    stored, state = run.read_config(), run.read_state()
    if overwrite and resume:
        raise ValueError("--overwrite and --resume contradict each other")
    if overwrite and stored is not None:
        _clear_run(run)
        return None
    if stored is None:
        return None
    for name, given in (("method", method), ("config", config)):
        if given is not None and given != stored[name]:
            raise RunFolderError(f"{run.root} holds a run with {name}={stored[name]!r}, not {given!r}: "
                                 f"choose another --out, or --overwrite")
    if resume and seed is not None and seed != stored["seed"]:
        raise RunFolderError(f"{run.root} was trained with seed {stored['seed']}, not {seed}")
    if not resume and stages is None and (state["stages_done"] or run.last.exists()):
        raise RunFolderError(f"{run.root} already holds a training run: pass --resume to continue it, "
                             f"--overwrite to start over, or choose another --out")
    return stored


def _apply_overrides(cfg: TrainConfig, chosen: Sequence[str], steps: Any, batch_size: Any, lr: float | None,
                     **plain: Any) -> TrainConfig:
    """Command-line style overrides on a TrainConfig; per-stage ones touch only the `chosen` stages."""
    cfg = cfg.with_overrides(**plain)
    batches = parse_steps(batch_size, tuple(chosen), what="--batch-size")
    if any(n < 1 for n in batches.values()):
        raise ValueError(f"--batch-size must be >= 1, got {batch_size!r}")
    budgets = parse_steps(steps, tuple(chosen))
    cfg = cfg.with_overrides(stage_batch_size={**cfg.stage_batch_size, **batches}, steps={**cfg.steps, **budgets})
    if lr is not None:
        cfg = cfg.with_overrides(lr={**cfg.lr, **{s: float(lr) for s in chosen}})
    if cfg.threads == 0:  # resolved now and stored with the run, so a resume uses the same count
        cfg = cfg.with_overrides(threads=auto_threads())
    return cfg


# ---------------------------------------------------------------------------------------------------- CLI
def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, help="episode store (a `dap collect` output folder)")
    parser.add_argument("--out", required=True, help="run folder (config, metrics, plots, checkpoints, model)")
    parser.add_argument("--method", choices=METHODS, default=None, help="dap (default) or fm (no dynamics model)")
    parser.add_argument("--config", choices=CONFIGS, default=None, help="model size (default: small)")
    parser.add_argument("--stage", default="all",
                        help="all (default), or one/several of vae,dynamics,policy (comma separated); a later "
                             "stage alone loads the earlier ones from OUT/model")
    parser.add_argument("--steps", default=None,
                        help="optimizer steps: N for every selected stage, or vae=900,dynamics=1500,policy=2200")
    parser.add_argument("--seed", type=int, default=None, help="run seed (default 0)")
    parser.add_argument("--resume", action="store_true", help="continue the run in OUT from its last checkpoint")
    parser.add_argument("--overwrite", action="store_true", help="start over in an OUT that holds a run")
    parser.add_argument("--batch-size", default=None,
                        help="N for every selected stage, or vae=32,policy=64 (default 64; VAE 32 frames; tiny 8)")
    parser.add_argument("--lr", type=float, default=None, help="peak learning rate of the selected stages")
    parser.add_argument("--device", default="auto", help="auto (default), cpu, cuda or cuda:N")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: the cores the load average leaves free; stored with "
                             "the run so --resume uses the same count)")
    parser.add_argument("--logger", choices=("none", "tensorboard", "wandb"), default=None,
                        help="extra metrics sink besides metrics.jsonl (must be installed)")
    parser.add_argument("--use-best", action="store_true", default=None,
                        help="save the best-validation EMA weights instead of the last ones")
    parser.add_argument("--amp", action="store_true", default=None, help="bfloat16 autocast on CUDA")
    parser.add_argument("--stop-after", type=int, default=None,
                        help="stop cleanly after N optimizer steps in this call (continue with --resume)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", default=None,
                        help="no progress bars")


def run(args: argparse.Namespace) -> int:
    from dapolicy.data.store import StoreError

    try:
        out = train(args.data, args.out, method=args.method, config=args.config, stage=args.stage,
                    steps=args.steps, seed=args.seed, resume=args.resume, batch_size=args.batch_size,
                    lr=args.lr, device=args.device, threads=args.threads, logger=args.logger,
                    progress=args.progress, use_best=args.use_best, amp=args.amp, stop_after=args.stop_after,
                    overwrite=args.overwrite)
    except TrainingDiverged as e:
        print(f"dap train: error: {e}", file=sys.stderr)
        return 1
    except (RunFolderError, StoreError, ValueError, FileNotFoundError) as e:
        print(f"dap train: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\ndap train: interrupted; continue with: dap train --data {args.data} --out {args.out} --resume",
              file=sys.stderr)
        return 130
    print(f"run folder: {out}  (model: {out / 'model'})")
    return 0
