"""`dap collect`: generate expert and random episodes into an episode store (docs/benchmark.md).

Three sources, recorded in every episode's meta:
  expert        the env's scripted expert from `reset(seed)`, stopped a few steps after success or at the
                step cap; failures are kept with success=False (the policy trainer filters them).
  random        smoothed random actions from the task's start states, so the dynamics model sees actions and
                states the expert never produces (Ornstein-Uhlenbeck noise in normalised action space; for
                absolute-position actions such as PushT's, a random walk of the target around the agent).
  noisy_expert  expert actions plus Gaussian noise scaled to the action range: contacts and near-misses.

Seeds: expert episode i uses seed S+i; random/noisy episode j uses S+RANDOM_SEED_OFFSET+j (disjoint ranges),
so `--resume` can tell exactly which episodes exist and continue with the next ones.

Output: DIR/episodes.zarr (the store; `EpisodeStore.open(DIR)` finds it) and DIR/summary.json.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from dapolicy.data.store import COLLECT_STORE_NAME, SOURCES, Episode, EpisodeStore, StoreError, write_json_atomic
from dapolicy.envs.base import Env, make_env
from dapolicy.spec import EnvSpec

RANDOM_SEED_OFFSET = 1_000_000
SUMMARY_FILE = "summary.json"
Actor = Callable[[dict[str, Any]], np.ndarray]


@dataclass
class CollectConfig:
    """Settings of one collection run (all are saved in summary.json).

    env: task name for `make_env` ("pusht", "metaworld/<task-v3>").
    out: output directory (holds episodes.zarr and summary.json).
    expert_episodes / random_episodes: how many of each; "random" counts both random kinds.
    seed: first expert seed; random episodes use seed + RANDOM_SEED_OFFSET + j.
    image_size: rendered image side in pixels.
    cameras: camera names (None = the env's defaults).
    resume: continue an interrupted collection in `out` instead of refusing a non-empty directory.
    noisy_fraction: share of the random episodes that are noise-perturbed expert rollouts (the rest are
        smoothed random actions); spread evenly over the sequence.
    action_noise: std of the noisy expert's Gaussian noise, as a fraction of the half action range.
    max_steps: cap on expert and noisy-expert episode length (None = the env's max_steps).
    random_length: length of smoothed-random episodes and cap of noisy-expert ones
        (None = min(100, max_steps)).
    steps_after_success: an expert (noisy or not) episode ends this many steps after its first success.
    random_mode: "ou" (smoothed noise in normalised action space), "walk" (random walk of an absolute target
        around the agent's position, read from the first action_dim proprio entries), or "auto"
        ("walk" for pusht, "ou" otherwise).
    ou_theta / ou_sigma: OU mean reversion per step and per-step noise std (normalised action units).
    walk_step: walk mode: std of the target velocity's per-step change, fraction of the half action range.
    walk_momentum: walk mode: velocity persistence in [0, 1) (higher = longer straight strokes).
    walk_radius: walk mode: max distance of the target from the agent, fraction of the half action range.
    """

    env: str
    out: str
    expert_episodes: int = 50
    random_episodes: int = 50
    seed: int = 0
    image_size: int = 64
    cameras: tuple[str, ...] | None = None
    resume: bool = False
    noisy_fraction: float = 0.5
    action_noise: float = 0.1
    max_steps: int | None = None
    random_length: int | None = None
    steps_after_success: int = 5
    random_mode: str = "auto"
    ou_theta: float = 0.1
    ou_sigma: float = 0.2
    walk_step: float = 0.04
    walk_momentum: float = 0.85
    walk_radius: float = 0.3

    def __post_init__(self) -> None:
        if self.expert_episodes < 0 or self.random_episodes < 0:
            raise ValueError("expert_episodes and random_episodes must be >= 0")
        if not 0.0 <= self.noisy_fraction <= 1.0:
            raise ValueError(f"noisy_fraction must be in [0, 1], got {self.noisy_fraction}")
        if self.action_noise < 0:
            raise ValueError(f"action_noise must be >= 0, got {self.action_noise}")
        for name in ("max_steps", "random_length", "image_size"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ValueError(f"{name} must be >= 1, got {v}")
        if self.random_mode not in ("auto", "ou", "walk"):
            raise ValueError(f"random_mode must be auto, ou or walk, got {self.random_mode!r}")
        if self.expert_episodes > RANDOM_SEED_OFFSET:
            raise ValueError(f"at most {RANDOM_SEED_OFFSET} expert episodes (seed ranges must stay disjoint)")
        if not 0.0 <= self.walk_momentum < 1.0:
            raise ValueError(f"walk_momentum must be in [0, 1), got {self.walk_momentum}")
        if self.cameras is not None:
            self.cameras = tuple(self.cameras)


@dataclass(frozen=True)
class Job:
    """One planned episode."""

    source: str
    seed: int


def plan_jobs(cfg: CollectConfig) -> list[Job]:
    """The full, deterministic list of episodes this configuration asks for (experts first)."""
    jobs = [Job("expert", cfg.seed + i) for i in range(cfg.expert_episodes)]
    for j in range(cfg.random_episodes):
        noisy = math.floor((j + 1) * cfg.noisy_fraction) > math.floor(j * cfg.noisy_fraction)
        jobs.append(Job("noisy_expert" if noisy else "random", cfg.seed + RANDOM_SEED_OFFSET + j))
    return jobs


# ------------------------------------------------------------------------------------------------ actors


def _bounds(spec: EnvSpec) -> tuple[np.ndarray, np.ndarray]:
    low, high = np.asarray(spec.action_low, np.float64), np.asarray(spec.action_high, np.float64)
    if low.shape != (spec.action_dim,) or high.shape != (spec.action_dim,) or not (high > low).all():
        raise ValueError(f"env {spec.name!r} has no usable action bounds in its spec "
                         f"(action_low={spec.action_low}, action_high={spec.action_high})")
    return low, high


def _to_env(u: np.ndarray, low: np.ndarray, high: np.ndarray) -> np.ndarray:
    return (low + (np.clip(u, -1.0, 1.0) + 1.0) * 0.5 * (high - low)).astype(np.float32)


def _to_unit(a: np.ndarray, low: np.ndarray, high: np.ndarray) -> np.ndarray:
    return 2.0 * (np.asarray(a, np.float64) - low) / (high - low) - 1.0


def expert_actor(env: Env) -> Actor:
    return lambda obs: np.asarray(env.expert_action(), np.float32)


def noisy_expert_actor(env: Env, rng: np.random.Generator, noise: float) -> Actor:
    """Expert action + N(0, (noise * half range)^2), clipped to the action bounds."""
    low, high = _bounds(env.spec)
    scale = noise * 0.5 * (high - low)

    def act(obs: dict[str, Any]) -> np.ndarray:
        a = np.asarray(env.expert_action(), np.float64) + rng.normal(size=low.shape) * scale
        return np.clip(a, low, high).astype(np.float32)

    return act


def ou_actor(spec: EnvSpec, rng: np.random.Generator, theta: float, sigma: float) -> Actor:
    """Ornstein-Uhlenbeck noise in [-1, 1] action units: temporally smooth, covers the whole range."""
    low, high = _bounds(spec)
    state = np.zeros(spec.action_dim)

    def act(obs: dict[str, Any]) -> np.ndarray:
        nonlocal state
        state = np.clip(state - theta * state + sigma * rng.normal(size=state.shape), -1.0, 1.0)
        return _to_env(state, low, high)

    return act


def walk_actor(spec: EnvSpec, rng: np.random.Generator, step: float, momentum: float, radius: float) -> Actor:
    """Random walk of an absolute target around the agent (whose position is proprio[:action_dim]).

    Uniform random targets make the agent dash across the table; a target that wanders near the agent gives
    the slow pushes and contacts that expert data lacks.
    """
    low, high = _bounds(spec)
    if spec.proprio_dim < spec.action_dim:
        raise ValueError(f"walk mode reads the agent position from proprio[:{spec.action_dim}], but "
                         f"{spec.name!r} has proprio_dim={spec.proprio_dim}; use random_mode='ou'")
    velocity = np.zeros(spec.action_dim)
    target: np.ndarray | None = None

    def act(obs: dict[str, Any]) -> np.ndarray:
        nonlocal velocity, target
        pos = _to_unit(np.asarray(obs["proprio"])[:spec.action_dim], low, high)
        target = pos.copy() if target is None else target
        velocity = momentum * velocity + step * rng.normal(size=velocity.shape)
        target = np.clip(target + velocity, -1.0, 1.0)
        offset = target - pos
        norm = float(np.linalg.norm(offset))
        if norm > radius:  # keep the target near the agent and turn the walk back inwards
            radial = offset / norm
            target = pos + radial * radius
            velocity -= 2.0 * max(0.0, float(velocity @ radial)) * radial
        return _to_env(target, low, high)

    return act


def make_actor(job: Job, env: Env, cfg: CollectConfig) -> Actor:
    """The action source of one planned episode; its randomness comes only from the episode seed."""
    rng = np.random.default_rng([job.seed, SOURCES.index(job.source), 0xC011])
    if job.source == "expert":
        return expert_actor(env)
    if job.source == "noisy_expert":
        return noisy_expert_actor(env, rng, cfg.action_noise)
    mode = cfg.random_mode if cfg.random_mode != "auto" else ("walk" if env.spec.name == "pusht" else "ou")
    if mode == "walk":
        return walk_actor(env.spec, rng, cfg.walk_step, cfg.walk_momentum, cfg.walk_radius)
    return ou_actor(env.spec, rng, cfg.ou_theta, cfg.ou_sigma)


# ----------------------------------------------------------------------------------------------- rollout


def episode_cap(job: Job, spec: EnvSpec, cfg: CollectConfig) -> int:
    """Maximum number of steps of this job's episode."""
    cap = min(cfg.max_steps or spec.max_steps, spec.max_steps)
    if job.source == "expert":
        return cap
    return min(cfg.random_length or min(100, cap), spec.max_steps)


def rollout(env: Env, job: Job, cfg: CollectConfig) -> Episode:
    """Run one episode and return it with its meta. Frame t is the observation the action t was chosen on."""
    actor = make_actor(job, env, cfg)
    cap = episode_cap(job, env.spec, cfg)
    stop_on_success = job.source in ("expert", "noisy_expert")
    cams = env.spec.cameras
    images: dict[str, list[np.ndarray]] = {c: [] for c in cams}
    proprio, actions = [], []
    first_success, max_score = None, 0.0
    obs = env.reset(job.seed)
    for t in range(cap):
        action = actor(obs)
        for c in cams:
            images[c].append(obs["images"][c])
        proprio.append(obs["proprio"])
        actions.append(action)
        obs, result = env.step(action)
        max_score = max(max_score, float(result.score))
        if result.success and first_success is None:
            first_success = t
        if result.done or (stop_on_success and first_success is not None
                           and t - first_success >= cfg.steps_after_success):
            break
    meta = {"source": job.source, "seed": int(job.seed), "success": first_success is not None,
            "first_success_step": first_success, "max_score": max_score, "env": env.spec.name}
    if job.source == "noisy_expert":
        meta["action_noise"] = cfg.action_noise
    return Episode(images={c: np.stack(v) for c, v in images.items()}, proprio=np.stack(proprio),
                   action=np.stack(actions), meta=meta)


# ------------------------------------------------------------------------------------------------ driver


def _wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float] | None:
    if n == 0:
        return None
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def summarize(store: EpisodeStore, cfg: CollectConfig, complete: bool, seconds: float) -> dict[str, Any]:
    """What summary.json holds: counts per source, expert success rate (with 95% Wilson interval), settings."""
    meta = store.meta
    sources = {}
    for src in SOURCES:
        ms = [m for m in meta if m["source"] == src]
        sources[src] = {"episodes": len(ms), "frames": sum(m["length"] for m in ms),
                        "successes": sum(bool(m["success"]) for m in ms)}
    n_exp, k_exp = sources["expert"]["episodes"], sources["expert"]["successes"]
    return {
        "env": cfg.env,
        "store": COLLECT_STORE_NAME,
        "episodes": len(meta),
        "frames": sum(m["length"] for m in meta),
        "expert_success_rate": k_exp / n_exp if n_exp else None,
        "expert_success_ci95": _wilson(k_exp, n_exp),
        "sources": sources,
        "complete": complete,
        "seconds_this_run": round(seconds, 2),
        "spec": store.spec.to_dict(),
        "settings": asdict(cfg),
    }


def _check_out_dir(cfg: CollectConfig) -> None:
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {out} is a file, not a directory")
    if out.exists() and any(out.iterdir()) and not cfg.resume:
        raise FileExistsError(f"{out} exists and is not empty; pass --resume to continue that collection "
                              f"or choose another --out")


def _open_or_create(cfg: CollectConfig, spec: EnvSpec) -> EpisodeStore:
    out = Path(cfg.out)
    store_path = out / COLLECT_STORE_NAME
    if (store_path / "index.json").exists():
        store = EpisodeStore.open(store_path, spec=spec)
        _check_resume_settings(out, cfg)
        return store
    if store_path.exists():  # creation itself was interrupted: nothing was published yet
        shutil.rmtree(store_path)
    out.mkdir(parents=True, exist_ok=True)
    return EpisodeStore.create(store_path, spec)


def _check_resume_settings(out: Path, cfg: CollectConfig) -> None:
    """A resumed run must use the seeds and env of the original one, or episodes would be mixed up."""
    summary_path = out / SUMMARY_FILE
    if not summary_path.exists():
        return
    old = json.loads(summary_path.read_text()).get("settings", {})
    for key in ("env", "seed", "image_size"):
        if key in old and old[key] != getattr(cfg, key):
            raise ValueError(f"--resume with {key}={getattr(cfg, key)!r}, but {out} was collected with "
                             f"{key}={old[key]!r}")


def collect_with_config(cfg: CollectConfig, progress: bool = True,
                        on_episode: Callable[[int, dict[str, Any]], None] | None = None,
                        env_kwargs: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run a collection; returns the summary (also written to OUT/summary.json, atomically, after each episode).

    on_episode(store_index, meta) is called after each episode is stored (progress hooks, tests).
    """
    from tqdm import tqdm

    _check_out_dir(cfg)
    env = make_env(cfg.env, image_size=cfg.image_size, cameras=cfg.cameras, **(env_kwargs or {}))
    start = time.perf_counter()
    store: EpisodeStore | None = None
    complete = False
    try:
        store = _open_or_create(cfg, env.spec)
        done_seeds = {int(m["seed"]) for m in store.meta}
        jobs = plan_jobs(cfg)
        todo = [j for j in jobs if j.seed not in done_seeds]
        summary_path = Path(cfg.out) / SUMMARY_FILE
        write_json_atomic(summary_path, summarize(store, cfg, False, 0.0))
        bar = tqdm(total=len(jobs), initial=len(jobs) - len(todo), desc=f"collect {cfg.env}", unit="ep",
                   disable=not progress, dynamic_ncols=True)
        with bar:
            for job in todo:
                episode = rollout(env, job, cfg)
                index = store.append_episode(episode)
                write_json_atomic(summary_path, summarize(store, cfg, False, time.perf_counter() - start))
                bar.update(1)
                bar.set_postfix(source=job.source, len=len(episode), ok=episode.meta["success"])
                if on_episode is not None:
                    on_episode(index, store.meta[index])
        complete = True
    finally:
        env.close()
        if store is not None:
            summary = summarize(store, cfg, complete, time.perf_counter() - start)
            write_json_atomic(Path(cfg.out) / SUMMARY_FILE, summary)
    return summary


def collect(env_name: str, out: str | Path, expert_episodes: int = 50, random_episodes: int = 50, seed: int = 0,
            image_size: int = 64, resume: bool = False, *, progress: bool = True,
            on_episode: Callable[[int, dict[str, Any]], None] | None = None,
            env_kwargs: dict[str, Any] | None = None, **options: Any) -> dict[str, Any]:
    """Collect expert and random episodes into OUT/episodes.zarr; returns the summary dict.

    options: any other `CollectConfig` field (noisy_fraction, action_noise, max_steps, random_length, ...).
    """
    cfg = CollectConfig(env=env_name, out=str(out), expert_episodes=expert_episodes,
                        random_episodes=random_episodes, seed=seed, image_size=image_size, resume=resume,
                        **options)
    return collect_with_config(cfg, progress=progress, on_episode=on_episode, env_kwargs=env_kwargs)


# ---------------------------------------------------------------------------------------------------- CLI


def configure_parser(p: argparse.ArgumentParser) -> None:
    from dapolicy.cli_options import add_out, add_quiet, add_seed

    p.add_argument("env", help='task: "pusht" or "metaworld/<task-v3>" (e.g. metaworld/button-press-v3)')
    add_out(p, "output directory (episodes.zarr + summary.json)", required=True)
    p.add_argument("--expert-episodes", type=int, default=50, help="scripted-expert episodes (default 50)")
    p.add_argument("--random-episodes", type=int, default=50,
                   help="random + noisy-expert episodes for the dynamics model (default 50)")
    add_seed(p, 0, "first expert seed (default 0); random ones start at SEED+1e6")
    p.add_argument("--image-size", type=int, default=64, help="image side in pixels (default 64)")
    p.add_argument("--cameras", default=None, help="comma-separated camera names (default: the env's)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted collection in --out")
    p.add_argument("--noisy-fraction", type=float, default=0.5,
                   help="share of the random episodes that are noisy-expert rollouts (default 0.5)")
    p.add_argument("--action-noise", type=float, default=0.1,
                   help="noisy expert: noise std as a fraction of the half action range (default 0.1)")
    p.add_argument("--max-steps", type=int, default=None, help="cap on expert episode length (default: env's)")
    p.add_argument("--random-length", type=int, default=None,
                   help="length of random episodes, cap of noisy-expert ones (default: min(100, max steps))")
    p.add_argument("--random-mode", choices=("auto", "ou", "walk"), default="auto",
                   help="smoothed random actions: OU noise, or a target random walk (auto: walk for pusht)")
    add_quiet(p)


def run(args: argparse.Namespace) -> int:
    cameras = tuple(c for c in args.cameras.split(",") if c) if args.cameras else None
    try:
        summary = collect(args.env, args.out, args.expert_episodes, args.random_episodes, seed=args.seed,
                          image_size=args.image_size, resume=args.resume, progress=not args.quiet,
                          noisy_fraction=args.noisy_fraction, action_noise=args.action_noise,
                          max_steps=args.max_steps, random_length=args.random_length,
                          random_mode=args.random_mode, cameras=cameras)
    except (FileExistsError, StoreError, ValueError) as e:
        print(f"dap collect: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ndap collect: interrupted; the stored episodes are intact - continue with --resume",
              file=sys.stderr)
        return 130
    rate = summary["expert_success_rate"]
    print(f"{summary['episodes']} episodes, {summary['frames']} frames in {Path(args.out) / COLLECT_STORE_NAME}"
          f"; expert success {'n/a' if rate is None else f'{rate:.0%}'}; summary: {Path(args.out) / SUMMARY_FILE}")
    return 0
