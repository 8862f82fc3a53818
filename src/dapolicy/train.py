"""`dap train`: train any registered method's stages (for DAP: VAE, dynamics model, policy) into a run folder.

    dap train --data runs/data --out runs/dap --config small
    dap train --out runs/dap --resume                                   # continue a killed run, bit-exact
    dap train --data runs/data --out runs/dap --stage policy --steps 3000   # retrain one stage
    dap train --data runs/data --out runs/fm --method fm --steps vae=900,policy=2200
    dap train --data runs/data --out runs/gt --init-from runs/dap --stage policy --set next_obs_mix.ground_truth=1 \
        --set next_obs_mix.dynamics=0 --set next_obs_mix.null=0     # an ablation: reuse VAE + dynamics
    torchrun --nproc_per_node 4 -m dapolicy.train --data runs/data --out runs/dap   # data-parallel, 4 GPUs

`python -m dapolicy.train ...` is `dap train ...`. Under torchrun (WORLD_SIZE > 1) every process runs the
same call: rank 0 writes the run folder, each process computes its slice of every step's batch
(`training/distributed.py`; docs/your-data.md, "Multi-GPU and multi-node training").

Python: `train(data_dir, out_dir, method="dap", config="small") -> Path` (the run folder; its `model/`
loads with `dapolicy.policies.load_pretrained`). The run folder layout is described in `training/rundir.py`.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch

from dapolicy import __version__
from dapolicy.training import distributed
from dapolicy.training.config import TrainConfig, auto_threads, parse_steps
from dapolicy.training.distributed import DistEnv, on_main
from dapolicy.training.loop import TrainingDiverged
from dapolicy.training.rundir import RunDir, RunFolderError
from dapolicy.training.trainer import Trainer, TrainRequest, environment_info

__all__ = ["TrainConfig", "TrainingDiverged", "RunFolderError", "train", "configure_parser", "run"]


def _parse_stages(stage: str | Sequence[str] | None, known: tuple[str, ...]) -> tuple[str, ...] | None:
    """"all" / None -> None (every stage); "dynamics,policy" or a sequence -> those stages; "dynamics+" -> that
    stage and every later one (what retraining from a stage means: its successors were trained on its output)."""
    if stage is None:
        return None
    names = stage.split(",") if isinstance(stage, str) else list(stage)
    names = [n.strip() for n in names if n.strip()]
    if names in ([], ["all"]):
        return None
    if len(names) == 1 and names[0].endswith("+"):
        first = names[0][:-1].strip()
        if first not in known:
            raise ValueError(f"unknown stage {first!r} in {names[0]!r}: expected one of {', '.join(known)}")
        return known[known.index(first):]
    bad = [n for n in names if n not in known]
    if bad:
        raise ValueError(f"unknown stage(s) {bad}: expected 'all' or a comma list of {', '.join(known)}")
    return tuple(names)


def _resolve_device(device: str | torch.device | None) -> torch.device:
    """auto / cpu / cuda / cuda:N -> a torch device; the one rule of every command (`cli_options`)."""
    from dapolicy.cli_options import resolve_device

    if isinstance(device, torch.device):
        device = str(device)
    return torch.device(resolve_device(device))


def _clear_run(run: RunDir) -> None:
    """Remove what a previous run wrote (only the files `dap train` owns)."""
    for p in (run.config, run.state_file, run.metrics):  # (the lock file stays: we hold it)
        p.unlink(missing_ok=True)
    for d in (run.plots, run.checkpoints, run.cache, run.model, run.root / "tensorboard"):
        shutil.rmtree(d, ignore_errors=True)


def train(data_dir: str | Path, out_dir: str | Path, method: str | None = None, config: str | None = None,
          stage: str | Sequence[str] | None = "all", steps: int | str | dict[str, int] | None = None,
          seed: int | None = None, resume: bool = False, *, overrides: Iterable[str] | Mapping[str, Any] | None = None,
          config_file: str | Path | None = None, init_from: str | Path | None = None,
          batch_size: int | str | dict[str, int] | None = None, lr: float | None = None,
          device: str | torch.device | None = "auto", threads: int | None = None, logger: str | None = None,
          progress: bool | None = None, use_best: bool | None = None, amp: bool | None = None,
          augment: bool | None = None, stop_after: int | None = None, overwrite: bool = False,
          train_config: TrainConfig | None = None,
          policy_factory: Callable[[Any], Any] | None = None, grad_accum: int | None = None,
          compile: bool | None = None, lean_data: bool | None = None, wandb_project: str | None = None) -> Path:
    """Train a policy on the episode store in `data_dir`; returns the run folder `out_dir`.

    method, config: a registered method ("dap", "fm", ...; `dap info` lists them) and a named size ("tiny",
        "small", "paper"). Default: those of the run being resumed or extended, else "dap" and "small".
    overrides: config fields by dotted name (["flow.steps=5", "next_obs_mix.null=0.2"] or a dict), applied
        after `config_file` (JSON/TOML of fields). Only for a new run: an existing run keeps its config.
    init_from: a run or model folder; the stages before the first trained one are copied from it (weights
        and normalisers) instead of trained. With it, `stage` defaults to the last stage. Other shapes refuse
        the copy; a config that differs only in settings is named in a note (the copied models keep the
        source's, e.g. its prediction horizon, until their stage is retrained).
    stage: "all", one stage, or a list; a later stage alone loads the earlier stages from `out_dir/model`.
    steps / batch_size / lr: per-stage budgets over the method's presets (N for every selected stage,
        "vae=900,policy=2200", or a dict). batch_size is the global batch of a step, over all processes.
    resume: continue the run in `out_dir` from `checkpoints/last.pt` (finished stages are skipped). The
        result is bit-identical to an uninterrupted run with the same seed, device, thread count and number
        of processes; on another number of processes it is the same up to float rounding.
    stop_after: stop cleanly after this many optimizer steps in this call (checkpoint written); continue
        with resume=True.
    overwrite: start over in an `out_dir` that already holds a run (deletes its checkpoints and model).
    train_config: a full TrainConfig to start from instead of the size's defaults.
    policy_factory: build the policy from the EnvSpec instead of the registry (any `Policy` works).
    grad_accum: micro-batches per process and step (default 1, or what a resumed run used): the run's micro-batch
        count becomes processes x grad_accum and is stored with the run. amp: bfloat16 autocast on CUDA.
        compile: `torch.compile` the loss. lean_data: memory-mapped images (`EpisodeStore.load(lazy=True)`).
        amp, compile and lean_data are stored with the run too (None keeps the stored value).
    augment: apply the config's random-shift augmentation while training (default True; stored with the run).
    logger: "none", "tensorboard" or "wandb" (None keeps the stored one); its package must be installed, checked
        before anything is written. wandb_project: the wandb project (default $WANDB_PROJECT, else "dapolicy").
    Under torchrun (WORLD_SIZE > 1) the call joins the process group (gloo on CPU, NCCL on CUDA, each process on
    cuda:LOCAL_RANK) unless the caller already did, and leaves it at the end if it joined it.
    Raises TrainingDiverged (loss became NaN/inf), RunFolderError, StoreError, ValueError.
    """
    from dapolicy.training.metrics import check_logger

    check_logger(logger)  # before anything is stored: a retry without --logger must find a clean folder
    env = distributed.env_from_os()
    dev = distributed.device_for(env, _resolve_device(device))
    created = distributed.init(env, dev)
    try:
        result = _train(data_dir, out_dir, method, config, stage, steps, seed, resume, overrides=overrides,
                        config_file=config_file, init_from=init_from, batch_size=batch_size, lr=lr, dev=dev,
                        threads=threads, logger=logger, progress=progress, use_best=use_best, amp=amp,
                        augment=augment, stop_after=stop_after, overwrite=overwrite, train_config=train_config,
                        policy_factory=policy_factory, grad_accum=grad_accum, compile=compile, lean_data=lean_data,
                        wandb_project=wandb_project, env=distributed.current())
    except BaseException:
        distributed.shutdown(created)
        raise
    distributed.shutdown(created, synchronise=True)
    return result


def _train(data_dir: str | Path, out_dir: str | Path, method: str | None, config: str | None,
           stage: str | Sequence[str] | None, steps: Any, seed: int | None, resume: bool, *, overrides: Any,
           config_file: Any, init_from: Any, batch_size: Any, lr: float | None, dev: torch.device,
           threads: int | None, logger: str | None, progress: bool | None, use_best: bool | None,
           amp: bool | None, augment: bool | None, stop_after: int | None, overwrite: bool,
           train_config: TrainConfig | None,
           policy_factory: Callable[[Any], Any] | None, grad_accum: int | None, compile: bool | None,
           lean_data: bool | None, wandb_project: str | None, env: DistEnv) -> Path:
    """`train` in one process of the job (all of it in a single process); see `train`."""
    from dapolicy.data.store import EpisodeStore
    from dapolicy.policies.registry import SIZES, get_method
    from dapolicy.training.checkpoint import seed_everything
    from dapolicy.training.metrics import check_logger

    if grad_accum is not None and grad_accum < 1:
        raise ValueError(f"--grad-accum must be >= 1, got {grad_accum}")
    store = EpisodeStore.open(data_dir)  # fails before anything is written to out_dir
    run = RunDir(Path(out_dir))
    with ExitStack() as held:
        on_main(held.enter_context, run.lock())  # one trainer per run folder (rank 0 holds the lock)
        all_stages = stage is None or (isinstance(stage, str) and stage.strip() in ("", "all"))
        stored = on_main(_check_run_folder, run, method, config, seed, all_stages and init_from is None, resume,
                         overwrite, Path(init_from).resolve() if init_from is not None else None)
        method = method or (stored or {}).get("method", "dap")
        config = config or (stored or {}).get("config", "small")
        seed = seed if seed is not None else (stored or {}).get("seed", 0)
        entry = get_method(method)
        if config not in SIZES:
            raise ValueError(f"config must be one of {SIZES}, got {config!r}")
        policy_config = _policy_config(entry, config, stored, overrides, config_file, run)
        seed_everything(seed)
        init = policy_factory(store.spec) if policy_factory else entry.policy_class(policy_config, store.spec)
        names = tuple(init.stage_names)
        stages = _parse_stages(stage, names)
        if init_from is not None and stages is None and not (stored or {}).get("init_from"):
            stages = names[-1:]
        base = train_config or (TrainConfig.from_dict(stored["train"]) if stored and "train" in stored
                                else TrainConfig.preset(config))
        cfg = _apply_overrides(base, stages or names, names, steps=steps, batch_size=batch_size, lr=lr,
                               threads=threads, logger=logger, progress=progress, use_best=use_best, amp=amp,
                               augment=augment, compile=compile, lean_data=lean_data, wandb_project=wandb_project)
        if logger is None and cfg.logger != "none":  # a stored run's logger, whose package may have gone since
            try:
                check_logger(cfg.logger)
            except ValueError as err:
                raise ValueError(f"{run.root} was trained with --logger {cfg.logger}: {err}") from None
        cfg = _resolve_micro_batches(cfg, grad_accum, env, stored is not None and resume)
        cfg = distributed.broadcast_object(cfg)  # rank 0's resolution (e.g. of auto threads) holds for all
        data_path = Path(data_dir).resolve()
        if stored is not None and stored.get("data") not in (None, str(data_path)) and env.is_main:
            print(f"[dap train] note: {run.root} was trained on {stored['data']}, now {data_path}: the stages "
                  f"trained now fit their action/proprio statistics on the new data", file=sys.stderr)
        if cfg.amp and dev.type != "cuda" and env.is_main:
            print("[dap train] note: --amp (bfloat16 autocast) applies on CUDA only; training in float32",
                  file=sys.stderr)
        stored_train = (stored or {}).get("train")
        if stored_train is not None and env.is_main:
            before = bool(stored_train.get("augment", False))
            if augment is not None and augment != before:
                print(f"[dap train] note: {run.root} trained {'with' if before else 'without'} augmentation so far; "
                      f"the stages trained now {'use' if augment else 'skip'} it", file=sys.stderr)
            elif "augment" not in stored_train:
                print(f"[dap train] note: {run.root} was started before augmentation took effect in training "
                      f"(2026-11-27) and goes on without it (--augment turns it on)", file=sys.stderr)
        source = Path(init_from).resolve() if init_from is not None else None
        request = TrainRequest(data_dir=data_path, run=run, method=method, config=config, stages=stages, seed=seed,
                               resume=resume, device=dev, stop_after=stop_after, init_from=source)
        run_config = {"method": method, "config": config, "seed": seed, "data": str(data_path),
                      "train": cfg.to_dict(), "dapolicy_version": __version__,
                      "environment": environment_info(dev, env),
                      "init_from": str(source) if source else (stored or {}).get("init_from")}
        trainer = Trainer(request, cfg, init, run_config, store, env=env)
        threads_before = torch.get_num_threads()
        torch.set_num_threads(cfg.threads)
        try:
            return trainer.run_all()
        finally:
            torch.set_num_threads(threads_before)  # a library call leaves the process as it found it


def _resolve_micro_batches(cfg: TrainConfig, grad_accum: int | None, env: DistEnv, resuming: bool) -> TrainConfig:
    """The run's micro-batch count: processes x grad_accum when given or new; a stored run keeps its own, so a
    resume on another number of processes accumulates instead of changing the noise of each step."""
    stored = cfg.micro_batches
    if grad_accum is not None:
        count = grad_accum * env.world_size
        if resuming and stored and count != stored and env.is_main:
            print(f"[dap train] warning: this run used {stored} micro-batch(es) per step, now {count} "
                  f"({env.world_size} process(es) x --grad-accum {grad_accum}): each step's noise changes, the "
                  f"result will differ from an uninterrupted run", file=sys.stderr)
    else:
        count = stored or env.world_size
    if env.is_main and env.enabled and count % env.world_size:
        print(f"[dap train] note: {count} micro-batch(es) per step over {env.world_size} processes: "
              f"{'some processes idle' if count < env.world_size else 'an uneven share'} (the run keeps its "
              f"micro-batch count; pass --grad-accum to re-split it)", file=sys.stderr)
    return cfg.with_overrides(micro_batches=count)


def _policy_config(entry: Any, size: str, stored: dict[str, Any] | None, overrides: Any, config_file: Any,
                   run: RunDir) -> Any:
    """The method config of this run: the stored one for an existing run (which `--set` may not change,
    except the training budgets), else the named size with the file's and the command line's fields."""
    from dapolicy.configuration import from_dict
    from dapolicy.overrides import apply_overrides, differences, load_config_file
    from dapolicy.policies.registry import make_config

    fresh = make_config(entry.name, size, overrides, config_file)
    if not stored or stored.get("policy") is None:
        return fresh
    kept = from_dict(entry.config_class, stored["policy"], f"{run.config}: policy")
    if overrides is None and config_file is None:
        return kept
    requested = apply_overrides(kept, load_config_file(config_file), "config") if config_file else kept
    requested = apply_overrides(requested, overrides, "config")
    changed = differences(kept, requested, ignore=("training.",))
    if changed:
        raise RunFolderError(
            f"{run.root} was trained with other settings ({', '.join(changed[:4])}); a finished stage would "
            f"silently keep the old ones. Start a new run that reuses its trained stages instead: "
            f"dap train --data DATA --out NEW --init-from {run.root} --stage STAGE --set ...")
    return requested


def _check_run_folder(run: RunDir, method: str | None, config: str | None, seed: int | None, all_stages: bool,
                      resume: bool, overwrite: bool, init_from: Path | None = None) -> dict[str, Any] | None:
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
    if seed is not None and seed != stored["seed"]:  # its trained stages used the stored seed
        raise RunFolderError(f"{run.root} was trained with seed {stored['seed']}, not {seed}: drop --seed, or "
                             f"--overwrite to start over")
    started = bool(state["stages_done"]) or run.last.exists()
    if not resume and all_stages and started:
        raise RunFolderError(f"{run.root} already holds a training run: pass --resume to continue it, "
                             f"--overwrite to start over, or choose another --out")
    if init_from is not None and started:
        # copying happens into a fresh run only: into a started one it would be skipped (or, without
        # --resume, the copied stages retrained from scratch)
        before = stored.get("init_from")
        if not resume:
            raise RunFolderError(f"{run.root} already holds a run" + (f" started from {before}" if before else "")
                                 + ": pass --resume (without --init-from) to continue it, --overwrite to start "
                                   "over, or choose another --out")
        if before != str(init_from):
            raise RunFolderError(f"{run.root} was started from {before or 'scratch'}, not --init-from {init_from}")
    return stored


def _apply_overrides(cfg: TrainConfig, chosen: Sequence[str], known: tuple[str, ...], steps: Any, batch_size: Any,
                     lr: float | None, **plain: Any) -> TrainConfig:
    """Command-line style overrides on a TrainConfig; per-stage ones touch only the `chosen` stages."""
    cfg = cfg.with_overrides(**plain)
    batches = parse_steps(batch_size, tuple(chosen), what="--batch-size", known=known)
    if any(n < 1 for n in batches.values()):
        raise ValueError(f"--batch-size must be >= 1, got {batch_size!r}")
    budgets = parse_steps(steps, tuple(chosen), known=known)
    cfg = cfg.with_overrides(stage_batch_size={**cfg.stage_batch_size, **batches}, steps={**cfg.steps, **budgets})
    if lr is not None:
        cfg = cfg.with_overrides(lr={**cfg.lr, **{s: float(lr) for s in chosen}})
    if cfg.threads == 0:  # resolved now and stored with the run, so a resume uses the same count
        cfg = cfg.with_overrides(threads=auto_threads(int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
    return cfg


# ---------------------------------------------------------------------------------------------------- CLI
def configure_parser(parser: argparse.ArgumentParser) -> None:
    from dapolicy.cli_options import add_device, add_out, add_quiet, add_seed, add_threads, positive_int
    from dapolicy.policies.registry import SIZES, method_names

    parser.add_argument("--data", default=None,
                        help="episode store (a `dap collect` output folder); required for a new run, a --resume "
                             "uses the one stored in OUT/config.json")
    add_out(parser, "run folder (config, metrics, plots, checkpoints, model)", required=True)

    parser.add_argument("--method", choices=method_names(), default=None,
                        help="method (default: dap, or the stored one of an existing run); `dap info` lists them")
    parser.add_argument("--config", choices=SIZES, default=None, help="model size (default: small)")
    parser.add_argument("--set", dest="overrides", action="append", default=None, metavar="NAME=VALUE",
                        help="set any config field by dotted name, e.g. --set flow.steps=5 --set "
                             "next_obs_mix.null=0.2 (repeatable; `dap info --fields` lists them)")
    parser.add_argument("--config-file", default=None,
                        help="JSON or TOML file of config fields (applied before --set)")
    parser.add_argument("--init-from", default=None, metavar="RUN",
                        help="start from another run's (or model folder's) trained stages: the stages before "
                             "the first one trained here are copied (default --stage: the last stage only)")
    parser.add_argument("--stage", default="all",
                        help="all (default), one/several of vae,dynamics,policy (comma separated), or NAME+ "
                             "(that stage and every later one, e.g. dynamics+); a later stage alone loads the "
                             "earlier ones from OUT/model or --init-from")
    parser.add_argument("--steps", default=None,
                        help="optimizer steps: N for every selected stage, or vae=900,dynamics=1500,policy=2200")
    add_seed(parser, None, "run seed (default 0, or the stored one of a resumed run)")
    parser.add_argument("--resume", action="store_true", help="continue the run in OUT from its last checkpoint")
    parser.add_argument("--overwrite", action="store_true", help="start over in an OUT that holds a run")
    parser.add_argument("--batch-size", default=None,
                        help="N for every selected stage, or vae=32,policy=64 (default 64; VAE 32 frames; tiny 8); "
                             "the global batch of a step, shared by all processes")
    parser.add_argument("--lr", type=float, default=None, help="peak learning rate of the selected stages")
    add_device(parser, "training runs")
    add_threads(parser, None, "the cores the load average leaves free; stored with the run so --resume uses the "
                              "same count")
    parser.add_argument("--logger", choices=("none", "tensorboard", "wandb"), default=None,
                        help="extra metrics sink besides metrics.jsonl (its package must be installed; stored with "
                             "the run, --logger none turns it off)")
    parser.add_argument("--wandb-project", default=None, metavar="NAME",
                        help="wandb project of --logger wandb (default: $WANDB_PROJECT, else dapolicy)")
    parser.add_argument("--use-best", action=argparse.BooleanOptionalAction, default=None,
                        help="save the best-validation EMA weights instead of the last ones (stored with the run; "
                             "--no-use-best turns it off)")
    parser.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                        help="bfloat16 autocast on CUDA (stored with the run; --no-amp turns it off)")
    parser.add_argument("--augment", action=argparse.BooleanOptionalAction, default=None,
                        help="random-shift image augmentation while training, as the config's image_shift / "
                             "latent_shift say (default on; stored with the run; --no-augment turns it off)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="torch.compile the training loss (stored with the run; --no-compile turns it off)")
    parser.add_argument("--grad-accum", type=positive_int, default=None, metavar="K",
                        help="micro-batches per process and step (the global --batch-size is cut into processes x "
                             "K pieces; default 1, or the stored split of a resumed run)")
    parser.add_argument("--lean-data", action=argparse.BooleanOptionalAction, default=None,
                        help="memory-mapped images instead of loading them into RAM (for stores larger than "
                             "memory; shared by the processes of a machine; stored with the run)")
    parser.add_argument("--stop-after", type=positive_int, default=None,
                        help="stop cleanly after N optimizer steps in this call (continue with --resume)")
    add_quiet(parser, "--no-progress")


def stored_data_path(out: str | Path) -> str:
    """The episode store a run in `out` was trained on (what `dap train --out RUN --resume` continues with)."""
    run = RunDir(Path(out))
    stored = run.read_config()
    if stored is None:
        raise ValueError(f"--data is required: {out} holds no run to resume (no {run.config.name}); pass --data to "
                         f"start a new one")
    data = stored.get("data")
    if not isinstance(data, str):
        raise ValueError(f"{run.config} records no training data: pass --data")
    if not Path(data).exists():
        raise FileNotFoundError(f"the training data of {out} is not at {data} any more (the path in {run.config}): "
                                f"pass its new location with --data")
    return data


def run(args: argparse.Namespace) -> int:
    from dapolicy.data.store import StoreError

    try:
        if args.data is None and not args.resume:
            raise ValueError("--data is required for a new run (a --resume reads it from OUT/config.json)")
        data = args.data if args.data is not None else stored_data_path(args.out)
        progress = False if args.quiet else None  # None keeps the run's stored setting
        out = train(data, args.out, method=args.method, config=args.config, stage=args.stage,
                    overrides=args.overrides, config_file=args.config_file, init_from=args.init_from,
                    steps=args.steps, seed=args.seed, resume=args.resume, batch_size=args.batch_size,
                    lr=args.lr, device=args.device, threads=args.threads, logger=args.logger,
                    progress=progress, use_best=args.use_best, amp=args.amp, augment=args.augment,
                    stop_after=args.stop_after,
                    overwrite=args.overwrite, grad_accum=args.grad_accum, compile=args.compile,
                    lean_data=args.lean_data, wandb_project=args.wandb_project)
    except TrainingDiverged as e:
        print(f"dap train: error{_rank_tag()}: {e}", file=sys.stderr)
        return 1
    except (RunFolderError, StoreError, ValueError, FileNotFoundError) as e:
        print(f"dap train: error{_rank_tag()}: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if distributed.is_main():
            print(f"\ndap train: interrupted; continue with: dap train --out {args.out} --resume", file=sys.stderr)
        return 130
    if distributed.is_main():
        print(f"run folder: {out}  (model: {out / 'model'})")
    return 0


def _rank_tag() -> str:
    """" (rank N)" for the processes other than rank 0 of a data-parallel job, whose errors repeat rank 0's."""
    env = distributed.current()
    return "" if env.is_main else f" (rank {env.rank})"


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m dapolicy.train ...` (what torchrun starts): exactly `dap train ...`."""
    from dapolicy.cli import main as cli_main

    return cli_main(["train", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
